"""The offline API: ``LLM(model_dir).generate(prompts, params)`` with continuous batching.

This single-process engine is also the colocated baseline that disaggregated runs are compared with.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from engine.config import EngineConfig
from engine.engine import Engine
from engine.output import TokenLogprob
from engine.sampling_params import SamplingParams


@dataclass
class CompletionOutput:
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    num_cached_tokens: int = 0


class LLM:
    def __init__(self, model: str, **engine_options: Any) -> None:
        self.engine = Engine(EngineConfig(model=model, **engine_options))
        self.tokenizer = self.engine.tokenizer

    def generate(
        self,
        prompts: str | Sequence[str] | Sequence[Sequence[int]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[CompletionOutput]:
        """Generate for every prompt (text, or token ids); results come back in prompt order."""
        if isinstance(prompts, str):
            prompts = [prompts]
        token_lists = [self.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]
        params = sampling_params or SamplingParams()
        per_prompt = [params] * len(token_lists) if isinstance(params, SamplingParams) else list(params)
        if len(per_prompt) != len(token_lists):
            raise ValueError(f"sampling_params: {len(per_prompt)} given for {len(token_lists)} prompts")
        results = {}
        for i, (ids, p) in enumerate(zip(token_lists, per_prompt, strict=True)):
            self.engine.add_request(f"offline-{i}", ids, p)
            results[f"offline-{i}"] = CompletionOutput(prompt_token_ids=ids)
        with tqdm(total=len(token_lists), disable=not use_tqdm, desc="generate", unit="req") as bar:
            while self.engine.has_unfinished():
                for out in self.engine.step():
                    res = results[out.request_id]
                    res.token_ids += out.new_token_ids
                    res.text += out.new_text
                    res.logprobs += out.logprobs
                    res.num_cached_tokens = out.num_cached_tokens
                    if out.finished:
                        res.finish_reason = out.finish_reason
                        bar.update(1)
        return list(results.values())
