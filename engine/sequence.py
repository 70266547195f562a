"""A request's state inside an engine (torch-free).

Token bookkeeping: ``token_ids`` = prompt + generated tokens whose values are known on the host.
``num_computed`` tokens have their KV in the pool (in ``pages``, ``page_size`` tokens a page) or
are being computed by a launched step. The next forward computes positions
``num_computed : num_computed + n``; when that reaches the end, its logits give the next token. A
decode step is the case n == 1; a preempted sequence simply starts again from ``num_computed = 0``
(or from a prefix-cache hit).

Overlap scheduling (``Engine``): a launched step's sampled token stays on the device until the
engine reads it back, one step later. Meanwhile it counts in ``num_inflight`` and the next decode
step takes it as input straight from the device (``inflight_row``: its row in the launched step),
so positions ``len(token_ids) .. len(token_ids) + num_inflight - 1`` exist without host values.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

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
    kv_watch: Any = None  # called once with (pages, progress) when its prompt's last step launches
    stream_text: bool = True  # False: text only in the final output (detokenized once, at the end)
    admitted_ns: int = 0  # wall clock of the first admission by the scheduler (0 = not yet)
    status: SeqStatus = SeqStatus.WAITING
    finish_reason: str | None = None
    num_inflight: int = 0  # sampled by launched steps, values not read back yet (0, 1 or 2)
    inflight_row: int = -1  # row of the latest launched step that samples this sequence's next token

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
        """Positions not computed yet (a token sampled but not read back counts: it has a position)."""
        return len(self.token_ids) + self.num_inflight - self.num_computed

    @property
    def next_input_row(self) -> int:
        """-1 if the next position's token is known on the host (``token_ids[num_computed]``), else
        the row of the launched step whose sampled token it is (read on the device)."""
        return -1 if self.num_computed < len(self.token_ids) else self.inflight_row

    @property
    def finished(self) -> bool:
        return self.status is SeqStatus.FINISHED
