"""Per-request sampling parameters (torch-free, validated at construction).

Field names follow the OpenAI / vLLM conventions so the gateway can map request JSON onto them
one-to-one. Validation errors are ``ValueError`` whose message starts with the offending field name;
the service boundaries turn them into HTTP 400 / gRPC INVALID_ARGUMENT.
"""

from __future__ import annotations

from dataclasses import dataclass

_MAX_STOP_STRINGS = 16
_MAX_LOGPROBS = 20
_MAX_LOGIT_BIAS = 1024  # entries; each is one scattered element per step


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token and when to stop.

    temperature == 0 means greedy (top_k/top_p/seed are then irrelevant).
    top_k <= 0 disables top-k; top_p == 1.0 disables nucleus sampling.
    seed: same seed + same prompt + same params → the same tokens, whatever else is in the batch.
    logprobs: if set, return the log-probabilities of the sampled token and of the top-n tokens
    (from the model's raw distribution, before penalties, biases, temperature / top-k / top-p).

    Logit adjustments, applied to every row (greedy ones too) before temperature, in this order:
    repetition_penalty (HF / CTRL semantics over the prompt and the output so far: a seen token's
    positive logit is divided by it, a negative one multiplied), then frequency_penalty * count +
    presence_penalty * (count > 0) subtracted for each token of the output so far (OpenAI), then
    logit_bias added (token id → bias in [-100, 100]), then EOS (unless ignore_eos) and
    stop_token_ids masked out while fewer than min_tokens tokens were generated.
    min_p: after temperature, top-k and top-p, drop tokens whose probability is below min_p times
    the top token's.
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
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_p: float = 0.0
    min_tokens: int = 0
    logit_bias: tuple[tuple[int, float], ...] = ()

    def __post_init__(self) -> None:
        # Accept lists from JSON callers; store tuples so the object stays hashable and immutable.
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        bias = self.logit_bias.items() if isinstance(self.logit_bias, dict) else self.logit_bias
        object.__setattr__(self, "logit_bias", tuple(sorted((int(t), float(b)) for t, b in bias)))
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
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check(-2.0 <= value <= 2.0, name, f"must be in [-2, 2], got {value}")
        rp = self.repetition_penalty
        _check(0.0 < rp <= 100.0, "repetition_penalty", f"must be in (0, 100], got {rp}")
        _check(0.0 <= self.min_p <= 1.0, "min_p", f"must be in [0, 1], got {self.min_p}")
        _check(self.min_tokens >= 0, "min_tokens", f"must be >= 0, got {self.min_tokens}")
        _check(len(self.logit_bias) <= _MAX_LOGIT_BIAS, "logit_bias", f"at most {_MAX_LOGIT_BIAS} entries")
        ids = [t for t, _ in self.logit_bias]
        _check(len(set(ids)) == len(ids), "logit_bias", "a token id appears twice")
        _check(all(t >= 0 for t in ids), "logit_bias", "token ids must be >= 0")
        _check(
            all(-100.0 <= b <= 100.0 for _, b in self.logit_bias),
            "logit_bias",
            "biases must be in [-100, 100]",
        )
        if self.logprobs is not None:
            _check(
                0 <= self.logprobs <= _MAX_LOGPROBS,
                "logprobs",
                f"must be in [0, {_MAX_LOGPROBS}], got {self.logprobs}",
            )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        """Whether sampling depends on the tokens so far (the sampler then needs their counts)."""
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0

    @property
    def has_bias(self) -> bool:
        return bool(self.logit_bias) or self.min_tokens > 0


def _check(cond: bool, name: str, message: str) -> None:
    if not cond:
        raise ValueError(f"{name}: {message}")
