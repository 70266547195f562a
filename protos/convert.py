"""Wire messages ↔ engine types, so every service maps them the same way (torch-free)."""

from __future__ import annotations

import os
import time
from typing import overload

from engine.load import EngineLoad
from engine.output import TokenLogprob
from engine.sampling_params import SamplingParams
from protos import common_pb2

# Trailing-metadata key decode sets when the prefill instance (not decode) failed a request, so a
# router knows which instance to avoid on retry.
FAULT_METADATA_KEY = "pdserve-fault"


def sampling_from_proto(msg: common_pb2.SamplingParams) -> SamplingParams:
    """Unset optional fields take the engine defaults. Raises ValueError naming the bad field."""
    defaults = SamplingParams()
    return SamplingParams(
        temperature=msg.temperature if msg.HasField("temperature") else defaults.temperature,
        top_k=msg.top_k if msg.top_k > 0 else -1,
        top_p=msg.top_p if msg.HasField("top_p") else defaults.top_p,
        seed=msg.seed if msg.HasField("seed") else None,
        max_tokens=msg.max_tokens if msg.HasField("max_tokens") else defaults.max_tokens,
        stop=tuple(msg.stop),
        stop_token_ids=tuple(msg.stop_token_ids),
        ignore_eos=msg.ignore_eos,
        logprobs=msg.logprobs if msg.HasField("logprobs") else None,
        skip_special_tokens=(
            msg.skip_special_tokens if msg.HasField("skip_special_tokens") else defaults.skip_special_tokens
        ),
        presence_penalty=msg.presence_penalty,
        frequency_penalty=msg.frequency_penalty,
        repetition_penalty=(
            msg.repetition_penalty if msg.HasField("repetition_penalty") else defaults.repetition_penalty
        ),
        min_p=msg.min_p,
        min_tokens=msg.min_tokens,
        logit_bias=tuple(msg.logit_bias.items()),
    )


def sampling_to_proto(params: SamplingParams) -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(
        temperature=params.temperature,
        top_k=params.top_k,
        top_p=params.top_p,
        seed=params.seed,
        max_tokens=params.max_tokens,
        stop=list(params.stop),
        stop_token_ids=list(params.stop_token_ids),
        ignore_eos=params.ignore_eos,
        logprobs=params.logprobs,
        skip_special_tokens=params.skip_special_tokens,
        presence_penalty=params.presence_penalty,
        frequency_penalty=params.frequency_penalty,
        repetition_penalty=params.repetition_penalty,
        min_p=params.min_p,
        min_tokens=params.min_tokens,
        logit_bias=dict(params.logit_bias),
    )


@overload
def logprob_to_proto(lp: TokenLogprob) -> common_pb2.TokenLogprob: ...
@overload
def logprob_to_proto(lp: None) -> None: ...
def logprob_to_proto(lp: TokenLogprob | None) -> common_pb2.TokenLogprob | None:
    if lp is None:
        return None
    return common_pb2.TokenLogprob(
        token_id=lp.token_id,
        logprob=lp.logprob,
        top_token_ids=[t for t, _ in lp.top],
        top_logprobs=[p for _, p in lp.top],
    )


def logprob_from_proto(msg: common_pb2.TokenLogprob) -> TokenLogprob:
    top = list(zip(msg.top_token_ids, msg.top_logprobs, strict=True))
    return TokenLogprob(msg.token_id, msg.logprob, top)


def deadline_ns(requested_ns: int, default_timeout_s: float) -> int:
    """The request's deadline (unix ns): as requested, or now + the server's default timeout."""
    return requested_ns or time.time_ns() + int(default_timeout_s * 1e9)


def load_report(
    load: EngineLoad, role: str, num_held_pages: int, num_pending_transfers: int, kv_bytes: int
) -> common_pb2.LoadReport:
    """The instance's load: the engine's from its last snapshot (``AsyncEngine.load``), the
    service's own counts as given."""
    return common_pb2.LoadReport(
        role=role,
        num_total_pages=load.num_total_pages,
        num_free_pages=load.num_free_pages,
        num_cached_pages=load.num_cached_pages,
        num_evictable_pages=load.num_evictable_pages,
        page_size=load.page_size,
        num_running=load.num_running,
        num_waiting=load.num_waiting,
        num_held_pages=num_held_pages,
        num_pending_transfers=num_pending_transfers,
        max_num_seqs=load.max_num_seqs,
        kv_bytes_transferred=kv_bytes,
        rss_bytes=rss_bytes(),
        cpu_seconds=time.process_time(),
    )


def is_idle(load: common_pb2.LoadReport) -> bool:
    """Nothing running, queued, held or in transfer, and every page free or only cached."""
    return load.num_free_pages + load.num_cached_pages == load.num_total_pages and not (
        load.num_running or load.num_waiting or load.num_held_pages or load.num_pending_transfers
    )


def rss_bytes() -> int:
    """Resident set size of this process now (Linux /proc; peak RSS elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
