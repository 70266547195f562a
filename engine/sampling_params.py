"""Per-request sampling parameters (torch-free, validated at construction).

Field names follow the OpenAI / vLLM conventions so the gateway can map request JSON onto them
one-to-one. Validation errors are ``ValueError`` whose message starts with the offending field name;
the service boundaries turn them into HTTP 400 / gRPC INVALID_ARGUMENT.
"""

from __future__ import annotations

from dataclasses import dataclass

_MAX_STOP_STRINGS = 16
_MAX_LOGPROBS = 20


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token and when to stop.

    temperature == 0 means greedy (top_k/top_p/seed are then irrelevant).
    top_k <= 0 disables top-k; top_p == 1.0 disables nucleus sampling.
    seed: same seed + same prompt + same params → the same tokens, whatever else is in the batch.
    logprobs: if set, return the log-probabilities of the sampled token and of the top-n tokens
    (from the model's raw distribution, before temperature / top-k / top-p).
    """

    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0
    seed: int | None = None
    max_tokens: int = 16
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        # Accept lists from JSON callers; store tuples so the object stays hashable and immutable.
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        _check(self.temperature >= 0.0, "temperature", f"must be >= 0, got {self.temperature}")
        _check(self.temperature <= 100.0, "temperature", f"must be <= 100, got {self.temperature}")
        _check(0.0 < self.top_p <= 1.0, "top_p", f"must be in (0, 1], got {self.top_p}")
        _check(isinstance(self.top_k, int), "top_k", f"must be an integer, got {self.top_k!r}")
        _check(self.top_k == -1 or self.top_k >= 1, "top_k", f"must be -1 (off) or >= 1, got {self.top_k}")
        _check(self.max_tokens >= 1, "max_tokens", f"must be >= 1, got {self.max_tokens}")
        if self.seed is not None:
            _check(0 <= self.seed < 2**63, "seed", f"must be in [0, 2**63), got {self.seed}")
        _check(len(self.stop) <= _MAX_STOP_STRINGS, "stop", f"at most {_MAX_STOP_STRINGS} stop strings")
        _check(all(isinstance(s, str) and s for s in self.stop), "stop", "stop strings must be non-empty")
        _check(all(t >= 0 for t in self.stop_token_ids), "stop_token_ids", "token ids must be >= 0")
        if self.logprobs is not None:
            _check(
                0 <= self.logprobs <= _MAX_LOGPROBS,
                "logprobs",
                f"must be in [0, {_MAX_LOGPROBS}], got {self.logprobs}",
            )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _check(cond: bool, name: str, message: str) -> None:
    if not cond:
        raise ValueError(f"{name}: {message}")
