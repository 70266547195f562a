"""The pipeline both APIs share: check and tokenize → pick a (prefill, decode) pair → stream from
decode → detokenize, observe metrics. With no prefill instances the gateway is *colocated*: it
picks a decode instance only, which runs the prompt itself (the non-disaggregated baseline).

Retries: an instance that refuses *before any work began* — decode answering RESOURCE_EXHAUSTED
(no pages / slots), or UNAVAILABLE for a decode or prefill that cannot be reached (decode tells
which in the ``pdserve-fault`` trailer) — is skipped and the request goes to another one. Once a
token has streamed, a failure is the client's error. Leaving the stream early (the client went
away) cancels the decode call, which frees the request's pages on both instances.
"""

from __future__ import annotations

import asyncio
import functools
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import grpc

from engine.config import ModelConfig
from engine.output import TextStream, TokenLogprob
from engine.sampling_params import SamplingParams
from engine.tokenizer import Tokenizer
from gateway.decode_session import DecodeError, DecodeSession
from gateway.errors import APIError
from gateway.limits import INLINE_CHARS, PromptGuard, PromptTooLong, check_text
from gateway.metrics import Metrics
from gateway.pool import Instance, Pool
from protos import common_pb2, decode_pb2
from protos.convert import logprob_from_proto, sampling_to_proto


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


@dataclass
class Chunk:
    """One streamed step: new tokens, their text (stop strings cut), logprobs; the last one is final."""

    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    usage: Usage | None = None
    timing: common_pb2.TimingMarks | None = None


class _Chunker:
    """Decode's responses of one request → the client's chunks: detokenized in one go per batch,
    text cut at stop strings, and deltas held back until ``stream_interval`` tokens accumulated
    (never the first token, never the end). Every response that arrived since the last chunk joins
    the next one, so a consumer that fell behind catches up in one event with exact token counts."""

    def __init__(self, gen: Generator, prompt_ids: list[int], params: SamplingParams) -> None:
        self.text = TextStream(gen.tokenizer, prompt_ids, params.stop, params.skip_special_tokens)
        self.stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else gen.eos_token_ids)
        self.interval, self.num_prompt = gen.stream_interval, len(prompt_ids)
        self.token_ids: list[int] = []
        self.logprobs: list[TokenLogprob] = []
        self.num_sent = 0
        self.num_received = 0  # output tokens decode sent so far

    def add(self, batch: list[decode_pb2.GenerateResponse]) -> Chunk | None:
        new = [t for msg in batch for t in msg.token_ids]
        self.token_ids += new
        self.num_received += len(new)
        self.logprobs += [logprob_from_proto(lp) for msg in batch for lp in msg.logprobs]
        self.text.push_many([t for t in new if t not in self.stop_ids])
        end = batch[-1]
        final = bool(end.finish_reason)
        if not final and self.num_sent and len(self.token_ids) < self.interval:
            return None
        chunk = Chunk(self.token_ids, self.text.take(final), self.logprobs, end.finish_reason or None)
        self.num_sent += len(self.token_ids)
        self.token_ids, self.logprobs = [], []
        if final:
            chunk.usage = Usage(self.num_prompt, end.usage.completion_tokens, end.usage.cached_tokens)
            chunk.timing = end.timing
        return chunk


class Generator:
    def __init__(
        self,
        model_dir: str,
        prefill: Pool,
        decode: Pool,
        metrics: Metrics,
        request_timeout_s: float,
        max_model_len: int | None = None,
        max_prompt_tokens: int | None = None,
        max_concurrent_requests: int = 1024,
        stream_interval: int = 1,
        queue_timeout_s: float = 30.0,
    ) -> None:
        self.stream_interval, self.queue_timeout_s = stream_interval, queue_timeout_s
        self.max_prompt_tokens, self.max_concurrent_requests = max_prompt_tokens, max_concurrent_requests
        self.num_in_flight = 0
        self.prefill, self.decode, self.metrics = prefill, decode, metrics
        self.request_timeout_s = request_timeout_s
        self.tokenizer = Tokenizer.from_dir(model_dir)
        model_cfg = ModelConfig.from_dir(model_dir)
        self.vocab_size = model_cfg.vocab_size
        self.max_model_len = min(
            max_model_len or model_cfg.max_position_embeddings, model_cfg.max_position_embeddings
        )
        self.eos_token_ids = frozenset(model_cfg.eos_token_ids) | self.tokenizer.eos_token_ids
        self.model_name = Path(model_dir).name
        self._sessions: dict[str, DecodeSession] = {}  # by decode address

    # -- input -------------------------------------------------------------------------------------
    @functools.cached_property
    def prompts(self) -> PromptGuard:
        """Bounds tokenization by the longest prompt this gateway accepts."""
        return PromptGuard(self.tokenizer, self._max_prompt_len)

    @property
    def _max_prompt_len(self) -> int:
        context = self.max_model_len - 1  # at least one token is generated
        return min(self.max_prompt_tokens, context) if self.max_prompt_tokens else context

    def check_prompt_chars(self, num_chars: int, param: str = "prompt") -> None:
        """Refuse text that cannot fit before any work on it (the chat template, tokenizing)."""
        try:
            self.prompts.check_chars(num_chars)
        except PromptTooLong as e:
            self._too_long(param, e.at_least, at_least=True)

    async def tokenize_async(
        self, prompt: str | list[int], param: str = "prompt", add_special_tokens: bool = True
    ) -> list[int]:
        """``tokenize``, long text on the tokenizer pool: encoding it must not stall every other
        stream on the event loop."""
        if isinstance(prompt, str) and len(prompt) > INLINE_CHARS:
            self.check_prompt_chars(len(prompt), param)
            return await self.prompts.run(self.tokenize, prompt, param, add_special_tokens)
        return self.tokenize(prompt, param, add_special_tokens)

    def tokenize(
        self, prompt: str | list[int], param: str = "prompt", add_special_tokens: bool = True
    ) -> list[int]:
        if isinstance(prompt, str):
            check_text(prompt, param)
            try:
                ids = self.prompts.encode(prompt, add_special_tokens)
            except PromptTooLong as e:
                self._too_long(param, e.at_least, at_least=True)
        else:
            ids = list(prompt)
        if not ids:
            raise APIError.invalid(param, "must not be empty")
        if min(ids) < 0 or max(ids) >= self.vocab_size:
            raise APIError.invalid(param, f"token ids must be in [0, {self.vocab_size})")
        if len(ids) > self._max_prompt_len:
            self._too_long(param, len(ids))
        return ids

    def _too_long(self, param: str, num_tokens: int, at_least: bool = False) -> NoReturn:
        counted = f"{'at least ' if at_least else ''}{num_tokens} tokens"
        if self.max_prompt_tokens is not None and self.max_prompt_tokens <= self.max_model_len - 1:
            raise APIError(
                413, f"{param}: {counted} exceed this server's limit of {self.max_prompt_tokens}", param
            )
        raise APIError.invalid(
            param, f"{counted} leave no room to generate within the context of {self.max_model_len}"
        )

    def room(self, prompt_ids: list[int]) -> int:
        """Tokens that can still be generated after the prompt."""
        return self.max_model_len - len(prompt_ids)

    def check_max_tokens(self, prompt_ids: list[int], params: SamplingParams) -> None:
        if params.max_tokens > self.room(prompt_ids):
            raise APIError.invalid(
                "max_tokens",
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the context "
                f"of {self.max_model_len}",
            )

    # -- the stream --------------------------------------------------------------------------------
    async def generate(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        api: str,
        request_id: str | None = None,
        timeout_s: float | None = None,
    ) -> AsyncIterator[Chunk]:
        self.check_max_tokens(prompt_ids, params)
        if self.num_in_flight >= self.max_concurrent_requests:
            raise APIError(
                429, f"the gateway is at its limit of {self.max_concurrent_requests} concurrent requests; retry later",
                type="rate_limit_error",
            )  # fmt: skip
        m = self.metrics
        start = last = time.monotonic()
        deadline_ns = time.time_ns() + int((timeout_s or self.request_timeout_s) * 1e9)
        request = decode_pb2.GenerateRequest(
            # Internal ids are always fresh: two clients sending the same id must not collide.
            request_id=f"{request_id or 'req'}-{uuid.uuid4().hex[:12]}",
            prompt_token_ids=prompt_ids,
            sampling=sampling_to_proto(params),
            deadline_unix_ns=deadline_ns,
        )
        chunks = _Chunker(self, prompt_ids, params)
        num_out, status = 0, "error"
        m.in_flight.inc()
        m.prompt_tokens.inc(len(prompt_ids))
        self.num_in_flight += 1
        dispatch = self._dispatch(request, prompt_ids)
        try:
            async for batch in dispatch:
                now = time.monotonic()
                chunk = chunks.add(batch)
                if chunks.num_received > num_out:
                    (m.ttft if num_out == 0 else m.itl).observe(now - last)
                    last, num_out = now, chunks.num_received
                if chunk is None:
                    continue
                if chunk.timing is not None:
                    self._observe_final(chunk.timing, num_out, now - start)
                yield chunk
            status = "ok"
        except APIError as e:
            status = str(e.status)
            e.counted = True
            raise
        except BaseException:
            status = "cancelled"
            raise
        finally:
            await dispatch.aclose()  # now, not when the generator is collected: decode is told at once
            self.num_in_flight -= 1
            m.in_flight.dec()
            m.requests.labels(api, status).inc()
            m.e2e.observe(time.monotonic() - start)

    def _observe_final(self, t: common_pb2.TimingMarks, num_out: int, e2e_s: float) -> None:
        m = self.metrics
        if t.prefill_started_ns and t.prefill_received_ns:
            m.queue.observe((t.prefill_started_ns - t.prefill_received_ns) / 1e9)
            m.prefill.observe((t.prefill_done_ns - t.prefill_started_ns) / 1e9)
            m.kv_transfer.observe((t.transfer_done_ns - t.prefill_done_ns) / 1e9)
        if t.transfer_started_ns and t.prefill_done_ns:  # disaggregated (colocated transfers nothing)
            m.kv_transfer_hidden.observe(max(0, t.prefill_done_ns - t.transfer_started_ns) / 1e9)
        if num_out > 1 and t.transfer_done_ns and t.finished_ns:
            m.tpot.observe((t.finished_ns - t.transfer_done_ns) / 1e9 / (num_out - 1))
        m.output_tokens.inc(num_out)

    async def _dispatch(
        self, request: decode_pb2.GenerateRequest, prompt_ids: list[int]
    ) -> AsyncGenerator[list[decode_pb2.GenerateResponse], None]:
        tried: dict[str, set[str]] = {"prefill": set(), "decode": set()}
        refused: APIError | None = None
        colocated = not self.prefill.instances  # each decode instance runs its prompts itself
        full: APIError | None = None  # a "no room" refusal, if any came: worth waiting for
        since, waits = time.monotonic(), 0
        while True:
            decode = self.decode.pick(prompt_ids, tried["decode"])
            prefill = None if colocated else self.prefill.pick(prompt_ids, tried["prefill"])
            if decode is None or (prefill is None and not colocated):
                if full is not None and await self._wait_for_room(since, waits, request):
                    tried, refused, full, waits = {"prefill": set(), "decode": set()}, None, None, waits + 1
                    continue
                refused = full or refused
                role = "decode" if decode is None else "prefill"
                raise refused or APIError(
                    503, f"no healthy {role} instance to serve the request", type="service_unavailable"
                )
            request.prefill_address = "" if prefill is None else prefill.address
            started = False
            decode.in_flight += 1
            if prefill is not None:
                prefill.in_flight += 1
            responses = self._session(decode).generate(request)
            try:
                async for batch in responses:
                    if not started:
                        started = True
                        if prefill is not None:
                            prefill.in_flight -= 1
                    yield batch
                return
            except DecodeError as e:
                if started:
                    raise APIError.from_grpc(e.code, e.details) from None
                refused = self._refusal(e, decode, prefill, tried)
                if refused is not None and refused.status == 429:
                    full = refused
                if refused is None:
                    raise APIError.from_grpc(e.code, e.details) from None
            finally:
                decode.in_flight -= 1
                if not started and prefill is not None:
                    prefill.in_flight -= 1
                await responses.aclose()  # given up early: decode cancels the request

    async def _wait_for_room(self, since: float, waits: int, request: decode_pb2.GenerateRequest) -> bool:
        """Every instance refused the request as full: wait a little (10 ms, doubling to 200 ms) and
        say whether to try them again — not past ``queue_timeout_s`` nor the request's deadline."""
        delay = min(0.2, 0.01 * 2**waits)
        if (
            time.monotonic() + delay - since > self.queue_timeout_s
            or time.time_ns() + delay * 1e9 > request.deadline_unix_ns
        ):
            return False
        self.metrics.queued.inc()
        try:
            await asyncio.sleep(delay)
        finally:
            self.metrics.queued.dec()
        return True

    def _session(self, decode: Instance) -> DecodeSession:
        session = self._sessions.get(decode.address)
        if session is None:
            session = self._sessions[decode.address] = DecodeSession(decode.channel, decode.address)
        return session

    async def close(self) -> None:
        await asyncio.gather(*(s.close() for s in self._sessions.values()))
        self._sessions.clear()

    def _refusal(
        self, e: DecodeError, decode: Instance, prefill: Instance | None, tried: dict[str, set[str]]
    ) -> APIError | None:
        """If ``e`` means "go elsewhere", note where not to go and return the error to report should
        every instance refuse; else None (the error is final)."""
        code, fault = e.code, e.fault
        if prefill is None:  # colocated: every fault is the decode instance's
            fault = None
        if code is grpc.StatusCode.RESOURCE_EXHAUSTED and fault == "prefill":
            assert prefill is not None
            tried["prefill"].add(prefill.address)
            self.metrics.retries.labels("prefill", "full").inc()
        elif code is grpc.StatusCode.RESOURCE_EXHAUSTED:
            tried["decode"].add(decode.address)
            self.metrics.retries.labels("decode", "full").inc()
        elif code is grpc.StatusCode.UNAVAILABLE and fault == "prefill":
            assert prefill is not None
            tried["prefill"].add(prefill.address)
            self.prefill.mark_unreachable(prefill, e.details or "unreachable")
            self.metrics.retries.labels("prefill", "unavailable").inc()
        elif code is grpc.StatusCode.UNAVAILABLE:
            tried["decode"].add(decode.address)
            self.decode.mark_unreachable(decode, e.details or "unreachable")
            self.metrics.retries.labels("decode", "unavailable").inc()
        else:
            return None
        return APIError.from_grpc(code, e.details or "")
