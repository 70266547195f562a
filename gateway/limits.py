"""Bounds on what a client can make the gateway spend before its request is known to be valid.

**Prompt text** (``PromptGuard``). Tokenizing is the one step whose cost grows with the text before
any length check can run: a 4 MB prompt took seconds and about 1 GB in ``tokenizers``. Two bounds,
both before the full encode:

- *Characters*: no token stands for more characters than its vocabulary string has (byte-level
  BPE maps each byte to one character, SentencePiece each character to one; added tokens are
  their content), so a text longer than ``max_tokens * longest token string`` cannot fit and is
  refused without being read. This bound is exact but loose (a 13-character longest token allows
  13 characters per token where English averages about 4).
- *Tokens, counted in pieces*: a longer text is encoded ``PIECE_CHARS`` at a time and refused as
  soon as the pieces hold more tokens than the limit (plus a slack of ``BOUNDARY_SLACK`` per cut,
  which falls just before whitespace, where byte-level BPE pieces encode as in the whole text, but
  for pre-tokenizers that treat a piece's start unlike a word's), so the work and memory spent on a
  hostile text stop near the limit. A text that passes is encoded whole, as the model expects.

Text over ``INLINE_CHARS`` is encoded on a small dedicated pool (``workers`` threads), so a burst of
big prompts queues there while short prompts keep being served from the event loop.

**HTTP** (``config.HTTPLimits``, ``guarded_protocol``). uvicorn's httptools protocol has no header-read
timeout and no header size limit (its h11 protocol caps the buffered header, but answers a plain
400). ``guarded_protocol`` adds both at the byte level, before the parser: the headers of each
request must arrive within ``header_timeout_s`` (of the connection opening or the previous
response ending; 408 and close otherwise) and fit ``max_header_bytes`` (431 and close otherwise);
every protocol-level error answers in the OpenAI envelope. Idle keep-alive connections close after
``keep_alive_s`` (uvicorn's own timer); a body must arrive within ``body_timeout_s``
(``http.BodyLimit``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from engine.tokenizer import Tokenizer
from gateway.config import HTTPLimits
from gateway.envelope import raw_response
from gateway.errors import APIError

T = TypeVar("T")
PIECE_CHARS = 16384  # encoded at a time while counting: a few MB of tokenizer memory, a few ms
BOUNDARY_SLACK = 2  # tokens a cut between two pieces may add to the count
INLINE_CHARS = 2048  # shorter text is encoded on the event loop (well under a millisecond)
_WHITESPACE_WINDOW = 256  # a cut looks this far back for whitespace, so words stay whole


class PromptTooLong(Exception):
    """The text holds more than ``limit`` tokens (``at_least`` counted before stopping)."""

    def __init__(self, at_least: int, limit: int) -> None:
        super().__init__(f"at least {at_least} tokens, over {limit}")
        self.at_least, self.limit = at_least, limit


def unicode_problem(text: str) -> str | None:
    """Why ``text`` cannot be encoded (JSON's ``\\ud800`` escapes decode to lone UTF-16 surrogates,
    which no tokenizer or protobuf accepts), or None."""
    if text.isascii():
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"not valid Unicode text (a lone surrogate at character {e.start})"
    return None


def check_text(text: str, param: str) -> None:
    if (problem := unicode_problem(text)) is not None:
        raise APIError.invalid(param, problem)


def longest_token_chars(tokenizer: Tokenizer) -> int:
    """Characters of the longest vocabulary string: no token covers more characters of text."""
    return max(len(tokenizer.id_to_token(i) or "") for i in range(tokenizer.vocab_size)) or 1


class PromptGuard:
    """Encodes prompt text with work bounded by ``max_tokens`` (see the module docstring)."""

    def __init__(self, tokenizer: Tokenizer, max_tokens: int, workers: int = 2) -> None:
        self.tokenizer, self.max_tokens = tokenizer, max_tokens
        self.max_chars = max_tokens * longest_token_chars(tokenizer)
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="tokenize")

    def check_chars(self, num_chars: int) -> None:
        if num_chars > self.max_chars:
            raise PromptTooLong(num_chars // (self.max_chars // self.max_tokens), self.max_tokens)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """The text's token ids; raises ``PromptTooLong`` having spent at most about
        ``max_tokens`` tokens' worth of encoding."""
        self.check_chars(len(text))
        if len(text) > PIECE_CHARS:
            self._count_in_pieces(text)
        return self.tokenizer.encode(text, add_special_tokens)

    def _count_in_pieces(self, text: str) -> None:
        counted, start, cuts = 0, 0, 0
        while start < len(text):
            end = min(start + PIECE_CHARS, len(text))
            if end < len(text):
                # Cut just before whitespace: pre-tokenizers start a word with its leading space,
                # so both sides encode as they would in the whole text.
                space = max(text.rfind(c, end - _WHITESPACE_WINDOW, end) for c in " \n")
                end = space if space > start else end
            counted += len(self.tokenizer.encode(text[start:end], add_special_tokens=False))
            if counted - BOUNDARY_SLACK * cuts > self.max_tokens:
                raise PromptTooLong(counted - BOUNDARY_SLACK * cuts, self.max_tokens)
            start, cuts = end, cuts + 1

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the tokenizer pool."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)


def guarded_protocol(limits: HTTPLimits) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol with a header-read timeout and a header size cap."""

    class Guarded(HttpToolsProtocol):
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._in_headers, self._header_bytes = True, 0
            self._header_timer: asyncio.TimerHandle | None = None
            self._arm()

        def _arm(self) -> None:
            if self._header_timer is None:
                self._header_timer = self.loop.call_later(limits.header_timeout_s, self._headers_too_slow)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def data_received(self, data: bytes) -> None:
            # While headers are awaited, feed at most what still fits under the cap: the parser's
            # callbacks (below) say where the headers ended, and nothing over the cap is buffered.
            while data and not self.transport.is_closing():
                if self._in_headers:
                    room = limits.max_header_bytes - self._header_bytes
                    if room <= 0:
                        return self._refuse(431, f"request headers over {limits.max_header_bytes} bytes")
                    piece, data = data[:room], data[room:]
                    self._header_bytes += len(piece)
                else:
                    piece, data = data, b""
                super().data_received(piece)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            if not self._in_headers:
                self._in_headers, self._header_bytes = True, 0

        def on_headers_complete(self) -> None:
            self._in_headers = False
            self._disarm()
            super().on_headers_complete()

        def on_response_complete(self) -> None:
            pipelined = bool(self.pipeline)  # its headers are in: nothing to wait for
            super().on_response_complete()
            if not self.transport.is_closing() and not pipelined:
                if not self._in_headers:
                    self._in_headers, self._header_bytes = True, 0
                self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            if self._in_headers:
                self._refuse(408, f"request headers not received within {limits.header_timeout_s:g} s")

        def send_400_response(self, msg: str) -> None:
            self._refuse(400, "the request is not valid HTTP/1.1")

        def _refuse(self, status: int, message: str) -> None:
            if self.transport.is_closing():
                return
            if self.cycle is None or self.cycle.response_complete:  # else a response is mid-way
                self.transport.write(raw_response(status, message))
            self.transport.close()

    return Guarded
