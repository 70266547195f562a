"""Turns sampled tokens into per-request outputs and decides when a request stops (torch-free).

Stop conditions, checked after every new token, in this order: EOS (unless ``ignore_eos``) or a
``stop_token_ids`` hit → "stop"; a stop string completed in the text → "stop" (the text is cut
before the stop string, OpenAI-style); ``max_tokens`` or the context limit → "length".
While a request runs, text that could be the start of a stop string is held back, so a streamed
client never sees text that is later cut.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.detokenizer import IncrementalDetokenizer, find_stop
from engine.sequence import Sequence
from engine.tokenizer import Tokenizer


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class RequestOutput:
    """What one step produced for one request: the delta, and the finish state."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0
    admitted_ns: int = 0  # when the scheduler first admitted the request
    # Set on the final output of a request added with hold_kv: its KV pages, on which the caller now
    # holds one reference and must give it back with Engine.free_pages.
    kv_pages: list[int] | None = None


class TextStream:
    """One request's output text as it streams: incremental detokenization, stop strings cut
    OpenAI-style, and text that could still turn into a stop string held back until it cannot.

    The engine's OutputProcessor and the gateway (which detokenizes the token stream it gets from
    decode) both use it, so the text a client sees is the text the engine stopped on.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_ids: list[int],
        stop: tuple[str, ...],
        skip_special_tokens: bool,
        incremental: bool = True,
    ) -> None:
        """``incremental=False``: nobody reads the text before the end (offline generation), so
        without stop strings the tokens are detokenized once, when the request ends."""
        self.detok = IncrementalDetokenizer(tokenizer, prompt_ids, skip_special_tokens)
        self.stop = stop
        self.emitted = 0  # characters of detok.text already returned
        self.holdback = max((len(s) for s in stop), default=1) - 1
        self.end: int | None = None  # where the text is cut by a stop string
        self.deferred: list[int] | None = None if incremental or stop else []  # tokens not decoded yet

    def push(self, token: int) -> bool:
        """Detokenize one token; True if that completed a stop string (the text ends before it)."""
        return self.push_many((token,))

    def push_many(self, tokens: list[int] | tuple[int, ...]) -> bool:
        """Detokenize several tokens with one decode of the window; True if they completed a stop
        string (the text ends at its earliest occurrence)."""
        if self.deferred is not None:
            self.deferred += tokens
            return False
        if self.end is not None:  # already cut: later tokens add nothing
            return False
        new_text = self.detok.push_many(tokens)
        if self.stop:
            stop_at = find_stop(self.detok.text, self.stop, len(new_text))
            if stop_at is not None:
                self.end = stop_at
                return True
        return False

    def take(self, final: bool) -> str:
        """Text not returned yet. ``final``: the request ended, so nothing is held back (a trailing
        partial character is flushed unless a stop string cut the text)."""
        if self.deferred is not None:
            if not final:
                return ""
            self.detok.push_many(self.deferred)
            self.deferred = []
        if final and self.end is None:
            self.detok.flush()
        text = self.detok.text if self.end is None else self.detok.text[: self.end]
        upto = len(text) if final else max(self.emitted, len(text) - self.holdback)
        new_text, self.emitted = text[self.emitted : upto], upto
        return new_text


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer, eos_token_ids: frozenset[int]) -> None:
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self._texts: dict[str, TextStream] = {}

    def process(
        self, seq: Sequence, token: int, logprob: TokenLogprob | None
    ) -> tuple[RequestOutput, str | None]:
        """Account for ``seq``'s newest token; returns its output and the finish reason (or None)."""
        state = self._text(seq)
        params = seq.params
        reason: str | None = None
        if (token in self.eos_token_ids and not params.ignore_eos) or token in params.stop_token_ids:
            reason = "stop"  # the stop token stays in token ids but adds no text
        elif state.push(token):
            reason = "stop"
        if reason is None and seq.num_tokens >= seq.max_len:  # max_tokens or the model's context
            reason = "length"
        return self._emit(seq, state, token, logprob, reason), reason

    def finish(self, seq: Sequence, reason: str) -> RequestOutput:
        """The final output of a request ended from outside (abort): flushes held-back text."""
        return self._emit(seq, self._text(seq), None, None, reason)

    def _text(self, seq: Sequence) -> TextStream:
        state = self._texts.get(seq.request_id)
        if state is None:
            params = seq.params
            state = TextStream(
                self.tokenizer, seq.prompt_ids, params.stop, params.skip_special_tokens, seq.stream_text
            )
            self._texts[seq.request_id] = state
        return state

    def _emit(
        self,
        seq: Sequence,
        state: TextStream,
        token: int | None,
        lp: TokenLogprob | None,
        reason: str | None,
    ) -> RequestOutput:
        new_text = state.take(final=reason is not None)
        if reason is not None:
            self._texts.pop(seq.request_id, None)
        return RequestOutput(
            request_id=seq.request_id,
            new_token_ids=[] if token is None else [token],
            new_text=new_text,
            finished=reason is not None,
            finish_reason=reason,
            logprobs=[] if lp is None else [lp],
            num_prompt_tokens=seq.num_prompt,
            num_output_tokens=seq.num_output,
            num_cached_tokens=seq.num_cached_prompt,
            admitted_ns=seq.admitted_ns,
        )
