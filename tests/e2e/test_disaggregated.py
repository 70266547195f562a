"""Prefill and decode as separate processes on loopback, KV pages crossing over tcp.

Oracles: the single-process engine (``LLM``, itself token-exact against HF transformers in
tests/unit) for the tokens; the services' own load reports (read through the generated stubs)
for "every page came back"; gRPC status codes for the failure cases.
"""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from services import Service, start_all

from engine import LLM, SamplingParams
from protos import common_pb2, decode_pb2, decode_pb2_grpc
from protos.convert import sampling_to_proto

ENGINE_ARGS = (
    "--page-size",
    "4",
    "--max-num-batched-tokens",
    "32",
    "--max-num-seqs",
    "64",
    "--kv-cache-mib",
    "16",
)
RPC_TIMEOUT_S = 60


@pytest.fixture(scope="module")
def cluster(tiny_model, tmp_path_factory):
    """A prefill/decode pair, a prefill with a slow KV link, a decode whose page size differs
    (layout mismatch) and a decode that runs one sequence at a time."""
    logs = tmp_path_factory.mktemp("logs")
    services = start_all(
        [
            ("prefill", tiny_model, ENGINE_ARGS),
            ("decode", tiny_model, ENGINE_ARGS),
            ("prefill", tiny_model, (*ENGINE_ARGS, "--kv-fault-delay-ms", "400")),
            (
                "decode",
                tiny_model,
                ("--page-size", "8", "--max-num-batched-tokens", "32", "--kv-cache-mib", "16"),
            ),
            ("decode", tiny_model, (*ENGINE_ARGS[:4], "--max-num-seqs", "1", "--kv-cache-mib", "16")),
        ],
        logs,
    )
    names = ["prefill", "decode", "slow_prefill", "decode_page8", "decode_one_seq"]
    yield dict(zip(names, services, strict=True))
    for s in services:
        s.stop()


def generate_request(prompt, params: SamplingParams, prefill: Service, request_id="", deadline_s=None):
    deadline_ns = time.time_ns() + int(deadline_s * 1e9) if deadline_s else 0
    return decode_pb2.GenerateRequest(
        request_id=request_id,
        prompt_token_ids=prompt,
        sampling=sampling_to_proto(params),
        prefill_address=prefill.address,
        deadline_unix_ns=deadline_ns,
    )


def run_stream(decode: Service, request) -> list[decode_pb2.GenerateResponse]:
    stub = decode_pb2_grpc.DecodeServiceStub(decode.channel)
    return list(stub.Generate(request, timeout=RPC_TIMEOUT_S))


def collect(responses):
    tokens = [t for r in responses for t in r.token_ids]
    logprobs = [lp for r in responses for lp in r.logprobs]
    return tokens, "".join(r.text for r in responses), logprobs, responses[-1]


def test_health_and_reflection(cluster):
    for name in ("prefill", "decode"):
        db = ProtoReflectionDescriptorDatabase(cluster[name].channel)
        services = set(db.get_services())
        assert "grpc.health.v1.Health" in services
        assert "grpc.reflection.v1alpha.ServerReflection" in services
    assert "pdserve.v1.PrefillService" in set(
        ProtoReflectionDescriptorDatabase(cluster["prefill"].channel).get_services()
    )
    decode_services = set(ProtoReflectionDescriptorDatabase(cluster["decode"].channel).get_services())
    assert {"pdserve.v1.DecodeService", "pdserve.v1.KVTransfer"} <= decode_services


def test_concurrent_requests_match_the_single_process_engine(cluster, tiny_model):
    """36 concurrent requests, prompts 1..120 tokens (chunk = 32), a second wave sharing prefixes
    with the first (prefix-cache hits on prefill), greedy and seeded sampling, logprobs."""
    prefill, decode = cluster["prefill"], cluster["decode"]
    rng = random.Random(0)
    reference = LLM(str(tiny_model), page_size=4, max_num_batched_tokens=32, kv_cache_bytes=16 << 20)
    vocab = reference.engine.model_config.vocab_size
    first = [
        [rng.randrange(vocab) for _ in range(n)]
        for n in [1, 2, 3, 4, 5, 7, 9, 16, 17, 31, 33, 40, 64, 100, 120, 77, 50, 25]
    ]
    second = [p + [rng.randrange(vocab) for _ in range(rng.randrange(1, 20))] for p in first if len(p) >= 8]
    second += [[*first[-1][:60], 1, 2, 3]] * 2  # identical prompts at once
    assert len(first) + len(second) >= 32

    def params_for(i: int) -> SamplingParams:
        if i % 5 == 3:
            return SamplingParams(
                temperature=0.8, top_p=0.9, seed=1000 + i, max_tokens=12 + i % 7, ignore_eos=True
            )
        return SamplingParams(
            temperature=0, max_tokens=8 + i % 13, ignore_eos=True, logprobs=2 if i % 4 == 0 else None
        )

    results = {}
    for wave, offset in ((first, 0), (second, len(first))):
        requests = [
            generate_request(p, params_for(offset + i), prefill, f"req-{offset + i}")
            for i, p in enumerate(wave)
        ]
        with ThreadPoolExecutor(len(requests)) as pool:
            for i, responses in enumerate(pool.map(lambda r: run_stream(decode, r), requests)):
                results[offset + i] = collect(responses)

    prompts = first + second
    expected = reference.generate(prompts, [params_for(i) for i in range(len(prompts))])
    for i, (prompt, ref) in enumerate(zip(prompts, expected, strict=True)):
        tokens, text, logprobs, last = results[i]
        assert tokens == ref.token_ids, f"request {i} ({len(prompt)} prompt tokens)"
        assert text == ref.text
        assert last.finish_reason == ref.finish_reason == "length"
        assert last.usage.prompt_tokens == len(prompt)
        assert last.usage.completion_tokens == len(tokens)
        if params_for(i).logprobs:
            assert [lp.token_id for lp in logprobs] == tokens
            for got, want in zip(logprobs, ref.logprobs, strict=True):
                assert got.logprob == pytest.approx(want.logprob, abs=1e-4)
                assert list(got.top_token_ids) == [t for t, _ in want.top]
    hits = [results[len(first) + i][3].usage.cached_tokens for i in range(len(second))]
    assert sum(h > 0 for h in hits) >= len(second) // 2, (
        f"second wave should hit prefill's prefix cache: {hits}"
    )
    prefill.wait_idle()
    decode.wait_idle()


def test_timing_marks_break_down_ttft(cluster):
    prefill, decode = cluster["prefill"], cluster["decode"]
    responses = run_stream(
        decode,
        generate_request(
            list(range(10, 60)), SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), prefill
        ),
    )
    t = responses[-1].timing
    marks = [
        t.decode_received_ns, t.decode_admitted_ns, t.prefill_received_ns, t.prefill_started_ns,
        t.prefill_done_ns, t.transfer_done_ns, t.first_decode_token_ns, t.finished_ns,
    ]  # fmt: skip
    assert all(m > 0 for m in marks), t
    assert marks == sorted(marks), f"marks out of order: {t}"
    assert responses[0].HasField("timing") and responses[0].timing.transfer_done_ns > 0
    assert marks[-1] - marks[0] < 30e9


def test_stop_strings_tokens_and_max_tokens_end_the_stream(cluster, tiny_model):
    prefill, decode = cluster["prefill"], cluster["decode"]
    prompt = list(range(30, 45))
    free_run = collect(
        run_stream(
            decode,
            generate_request(prompt, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True), prefill),
        )
    )
    tokens, text = free_run[0], free_run[1]
    stop_token = tokens[5]
    by_token = collect(
        run_stream(
            decode,
            generate_request(
                prompt, SamplingParams(temperature=0, max_tokens=30, stop_token_ids=(stop_token,)), prefill
            ),
        )
    )
    assert by_token[0] == tokens[: tokens.index(stop_token) + 1] and by_token[3].finish_reason == "stop"
    one = collect(
        run_stream(decode, generate_request(prompt, SamplingParams(temperature=0, max_tokens=1), prefill))
    )
    assert one[0] == tokens[:1] and one[3].finish_reason == "length"
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    if stop.strip():
        by_string = collect(
            run_stream(
                decode,
                generate_request(
                    prompt,
                    SamplingParams(temperature=0, max_tokens=30, stop=(stop,), ignore_eos=True),
                    prefill,
                ),
            )
        )
        assert by_string[1] == text[: text.index(stop)] and by_string[3].finish_reason == "stop"
    decode.wait_idle()


def test_client_cancel_mid_decode_frees_pages(cluster):
    prefill, decode = cluster["prefill"], cluster["decode"]
    stub = decode_pb2_grpc.DecodeServiceStub(decode.channel)
    call = stub.Generate(
        generate_request(
            list(range(100, 180)), SamplingParams(temperature=0, max_tokens=3000, ignore_eos=True), prefill
        ),
        timeout=RPC_TIMEOUT_S,
    )
    received = [next(call) for _ in range(3)]
    assert all(r.token_ids for r in received)
    assert decode.load().num_running == 1
    call.cancel()
    with pytest.raises(grpc.RpcError) as err:
        list(call)
    assert err.value.code() is grpc.StatusCode.CANCELLED
    decode.wait_idle(timeout_s=10)
    prefill.wait_idle(timeout_s=10)


def test_client_cancel_mid_transfer_frees_pages_on_both_sides(cluster):
    slow, decode = cluster["slow_prefill"], cluster["decode"]
    stub = decode_pb2_grpc.DecodeServiceStub(decode.channel)
    call = stub.Generate(
        generate_request(list(range(200, 300)), SamplingParams(temperature=0, max_tokens=5), slow),
        timeout=RPC_TIMEOUT_S,
    )
    deadline = time.monotonic() + 20
    while not (slow.load().num_pending_transfers and decode.load().num_pending_transfers):
        assert time.monotonic() < deadline, "the transfer never started"
        time.sleep(0.02)
    assert decode.load().num_held_pages == 25  # 100 tokens / page size 4
    call.cancel()
    decode.wait_idle(timeout_s=10)
    slow.wait_idle(timeout_s=10)


def test_deadline_in_decode_and_in_transfer(cluster):
    prefill, slow, decode = cluster["prefill"], cluster["slow_prefill"], cluster["decode"]
    long = SamplingParams(temperature=0, max_tokens=3000, ignore_eos=True)
    for source, deadline_s in ((prefill, 1.0), (slow, 0.3)):
        start = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            run_stream(decode, generate_request(list(range(50, 90)), long, source, deadline_s=deadline_s))
        assert err.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED, err.value.details()
        assert time.monotonic() - start < deadline_s + 5
        decode.wait_idle(timeout_s=10)
        source.wait_idle(timeout_s=10)


def test_kv_layout_mismatch_is_failed_precondition_with_both_values(cluster):
    prefill, decode8 = cluster["prefill"], cluster["decode_page8"]
    with pytest.raises(grpc.RpcError) as err:
        run_stream(
            decode8,
            generate_request(list(range(20, 40)), SamplingParams(temperature=0, max_tokens=4), prefill),
        )
    assert err.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert "page_size: ours=8 theirs=4" in err.value.details()
    decode8.wait_idle()
    prefill.wait_idle()


def test_full_decode_answers_resource_exhausted(cluster):
    prefill, one = cluster["prefill"], cluster["decode_one_seq"]
    stub = decode_pb2_grpc.DecodeServiceStub(one.channel)
    busy = stub.Generate(
        generate_request(
            list(range(60, 70)), SamplingParams(temperature=0, max_tokens=3000, ignore_eos=True), prefill
        ),
        timeout=RPC_TIMEOUT_S,
    )
    next(busy)
    with pytest.raises(grpc.RpcError) as err:
        run_stream(
            one, generate_request(list(range(70, 80)), SamplingParams(temperature=0, max_tokens=4), prefill)
        )
    assert err.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_num_seqs" in err.value.details()
    busy.cancel()
    one.wait_idle()
    # once the slot is free again, the same request is served
    assert collect(
        run_stream(
            one, generate_request(list(range(70, 80)), SamplingParams(temperature=0, max_tokens=4), prefill)
        )
    )[3].finish_reason


@pytest.mark.parametrize(
    ("prompt", "sampling", "field"),
    [
        ([], common_pb2.SamplingParams(), "prompt_token_ids"),
        ([10**7], common_pb2.SamplingParams(), "prompt"),
        ([1, 2], common_pb2.SamplingParams(top_p=2.0), "top_p"),
        ([1, 2], common_pb2.SamplingParams(temperature=-1.0), "temperature"),
        ([1, 2], common_pb2.SamplingParams(max_tokens=0), "max_tokens"),
        ([1] * 5000, common_pb2.SamplingParams(), "prompt"),
    ],
)
def test_bad_requests_are_invalid_argument_naming_the_field(cluster, prompt, sampling, field):
    prefill, decode = cluster["prefill"], cluster["decode"]
    request = decode_pb2.GenerateRequest(
        prompt_token_ids=prompt, sampling=sampling, prefill_address=prefill.address
    )
    with pytest.raises(grpc.RpcError) as err:
        run_stream(decode, request)
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert field in err.value.details()
    decode.wait_idle()


def test_unreachable_prefill_is_unavailable_and_frees_the_reservation(cluster):
    decode = cluster["decode"]
    request = decode_pb2.GenerateRequest(
        prompt_token_ids=[1, 2, 3],
        sampling=common_pb2.SamplingParams(max_tokens=2),
        prefill_address="127.0.0.1:1",
    )
    with pytest.raises(grpc.RpcError) as err:
        run_stream(decode, request)
    assert err.value.code() is grpc.StatusCode.UNAVAILABLE
    decode.wait_idle()


def test_services_keep_serving_after_faults(cluster):
    """Runs last in this module: after every fault above, a fresh batch is still exact and idle after."""
    prefill, decode = cluster["prefill"], cluster["decode"]
    errors = []

    def one(i):
        try:
            run_stream(
                decode,
                generate_request(
                    list(range(i, i + 20)),
                    SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
                    prefill,
                ),
            )
        except grpc.RpcError as e:
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=RPC_TIMEOUT_S)
    assert not errors
    decode.wait_idle()
    prefill.wait_idle()
