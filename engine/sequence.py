"""A request's state inside an engine (torch-free).

Token bookkeeping: ``token_ids`` = prompt + generated. ``num_computed`` tokens have their KV in the
pool (in ``pages``, ``page_size`` tokens a page). The next forward computes
``token_ids[num_computed : num_computed + n]``; when that reaches the end, its logits give the next
token. A decode step is the case n == 1; a preempted sequence simply starts again from
``num_computed = 0`` (or from a prefix-cache hit).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from engine.sampling_params import SamplingParams


class SeqStatus(enum.Enum):
    WAITING = "waiting"  # no pages; in the scheduler's waiting queue
    PREFILLING = "prefilling"  # admitted; more than the last token still to compute
    DECODING = "decoding"  # one token to compute per step
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    seed: int
    max_len: int  # prompt + max_tokens, capped by the model's context
    token_ids: list[int] = field(init=False)
    pages: list[int] = field(default_factory=list)
    num_computed: int = 0
    num_cached_prompt: int = 0  # prompt tokens served by the prefix cache at first admission
    preempted: bool = False
    hold_kv: bool = False  # on finish, keep a reference on the pages for the caller (KV transfer)
    admitted_ns: int = 0  # wall clock of the first admission by the scheduler (0 = not yet)
    status: SeqStatus = SeqStatus.WAITING
    finish_reason: str | None = None

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_ids)

    @property
    def num_prompt(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output(self) -> int:
        return len(self.token_ids) - len(self.prompt_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_ids) :]

    @property
    def num_pending(self) -> int:
        return len(self.token_ids) - self.num_computed

    @property
    def finished(self) -> bool:
        return self.status is SeqStatus.FINISHED
