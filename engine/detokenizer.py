"""Incremental, UTF-8-safe detokenization and stop-string search, for streaming (torch-free).

A token can end in the middle of a multi-byte character (byte-level BPE splits é, 中 and emoji across
tokens), and some decoders change a token's text depending on its neighbours (SentencePiece strips
the leading space of the first token). So the text of token i is never `decode([i])`: the text of a
short window of recent tokens is decoded without and with the new one and the difference emitted
(the prefix/read-offset technique of HF TGI and vLLM), and a window whose text ends in an incomplete
character is held back until a later token completes it (or `flush`). The `tokenizers` library
implements exactly that in Rust (`DecodeStream`, what vLLM's fast detokenizer uses): one call per
token instead of two decodes and the bookkeeping in Python — this runs once per streamed token.
"""

from __future__ import annotations

from collections.abc import Sequence

from engine.tokenizer import Tokenizer

_REPLACEMENT = "\ufffd"
# Prompt tokens decoded with the first output tokens, so context-dependent decoders (SentencePiece's
# leading space) render the first output token as it reads after the prompt.
_PROMPT_CONTEXT_TOKENS = 5
# Held tokens past which the held bytes can never complete a character (see ``_unstick``), and how
# many of the newest stay held then (they may still start one).
_MAX_HELD, _KEEP_HELD = 8, 3


class IncrementalDetokenizer:
    """Turns a stream of output token ids into a stream of text deltas.

    Contract: for output ids t1..tn, "".join(push(t) for t in ids) + flush() equals
    tokenizer.decode(ids) for byte-level tokenizers (decoders whose output does not depend on what
    precedes the first token) — but for runs of bytes that form no character, where the number of
    U+FFFD may differ; push() never returns text ending in a partial character, and costs the same
    whatever came before.
    """

    def __init__(
        self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = (), skip_special_tokens: bool = True
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self.output_ids: list[int] = []
        self._text_parts: list[str] = []
        self._held = 0  # output tokens at the end whose text is held back (an incomplete character)
        self._restart(prompt_ids)

    @property
    def text(self) -> str:
        """All text returned by push() and flush() so far."""
        if len(self._text_parts) > 1:
            self._text_parts = ["".join(self._text_parts)]
        return self._text_parts[0] if self._text_parts else ""

    def push(self, token_id: int) -> str:
        """Add one output token; return the newly completed text ("" while a character is
        incomplete or the token has no text, e.g. a skipped special token)."""
        self.output_ids.append(token_id)
        delta = self._step(token_id)
        if delta is None:
            self._held += 1
            return self._unstick() if self._held > _MAX_HELD else ""
        self._held = 0
        if delta:
            self._text_parts.append(delta)
        return delta

    def _unstick(self) -> str:
        """Many tokens held: their bytes end in something no later token can complete (a UTF-8
        character is at most 4 bytes), yet every push would decode the growing window again. Emit
        all but the last ``_KEEP_HELD`` tokens' text (as U+FFFD, as decode() shows it) and go on
        from there."""
        keep = self.output_ids[-_KEEP_HELD:]
        del self.output_ids[-_KEEP_HELD:]
        self._held -= _KEEP_HELD
        delta = self.flush()
        for token_id in keep:  # through the fresh stream, as pushes
            delta += self.push(token_id)
        return delta

    def push_many(self, token_ids: Sequence[int]) -> str:
        """Add several output tokens at once: the text ``push`` would have returned for them
        together."""
        return "".join([self.push(t) for t in token_ids])

    def flush(self) -> str:
        """Return the held-back text (a trailing partial character as U+FFFD), as when the request
        ends; the stream is then consistent with decode(output_ids)."""
        if not self._held:
            return ""
        held = self.output_ids[-self._held :]
        before = self.output_ids[
            max(0, len(self.output_ids) - self._held - _PROMPT_CONTEXT_TOKENS) : -self._held
        ]
        delta = self._decode(before + held)[len(self._decode(before)) :]
        self._held = 0
        self._restart(self.output_ids)
        if delta:
            self._text_parts.append(delta)
        return delta

    def _restart(self, seen: Sequence[int]) -> None:
        """A fresh stream that has seen the last few of ``seen`` as context."""
        context = list(seen[max(0, len(seen) - _PROMPT_CONTEXT_TOKENS) :])
        if self._decode(context).endswith(_REPLACEMENT):
            # The context ends inside a character (or in bytes that form none): it would make our
            # deltas inconsistent.
            context = []
        self._step = self._tokenizer.decode_stream(self._skip_special, context)

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special) if ids else ""


def find_stop(text: str, stop: Sequence[str], new_text_len: int) -> int | None:
    """Index in `text` where the earliest stop string starts, among occurrences that end inside the
    last `new_text_len` characters (older occurrences were found by earlier calls); None if none.

    Stop strings may straddle the old/new boundary: "\\n\\n" is found when each "\\n" arrives in a
    different delta.
    """
    if new_text_len <= 0:
        return None
    old_len = len(text) - new_text_len
    best: int | None = None
    for s in stop:
        # Any match starting here or later ends past old_len, i.e. inside the new text.
        at = text.find(s, max(0, old_len - len(s) + 1))
        if at != -1 and (best is None or at < best):
            best = at
    return best
