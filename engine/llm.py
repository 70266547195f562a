"""The offline API: ``LLM(model_dir).generate(prompts, params)`` with continuous batching.

This single-process engine is also the colocated baseline that disaggregated runs are compared with.
"""

from __future__ import annotations

import itertools
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
        self._attach(Engine(EngineConfig(model=model, **engine_options)))

    @classmethod
    def from_engine(cls, engine: Engine) -> LLM:
        llm = cls.__new__(cls)
        llm._attach(engine)
        return llm

    def _attach(self, engine: Engine) -> None:
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self._ids = itertools.count()

    def close(self) -> None:
        """Stop the engine's other ranks (``tp`` or ``cp`` > 1); nothing to do for one rank."""
        self.engine.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

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
        results: dict[str, CompletionOutput] = {}
        try:
            for ids, p in zip(token_lists, per_prompt, strict=True):
                request_id = f"offline-{next(self._ids)}"
                self.engine.add_request(request_id, ids, p, stream_text=False)  # text read at the end
                results[request_id] = CompletionOutput(prompt_token_ids=ids)
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
        finally:
            # A rejected prompt, Ctrl-C or a failing step: leave nothing of this call in the engine.
            for request_id, res in results.items():
                if res.finish_reason is None:
                    self.engine.abort(request_id)
        return list(results.values())
