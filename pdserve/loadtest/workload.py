"""Workloads of the serving load test (``pdserve bench``, load_test.py): what each request asks, and when it is sent.

Seeded and pure, so a run can be repeated exactly and the distributions are unit-tested.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RequestSpec:
    """One request of the workload: a prompt (text, or token ids sent as-is) and its output length."""

    prompt: str | list[int]
    max_tokens: int


def random_workload(
    num_requests: int,
    input_len: tuple[int, int],
    output_len: tuple[int, int],
    vocab: tuple[int, int],
    seed: int,
) -> list[RequestSpec]:
    """Prompts of uniform random token ids; lengths uniform in the inclusive ranges, reproducible by seed."""
    rng = random.Random(seed)
    specs = []
    for _ in range(num_requests):
        num_prompt = rng.randint(*input_len)
        prompt = [rng.randrange(*vocab) for _ in range(num_prompt)]
        specs.append(RequestSpec(prompt, rng.randint(*output_len)))
    return specs


def load_jsonl(path: Path) -> list[RequestSpec]:
    """Read ``{"prompt": "text" | [ids], "max_tokens": N}`` lines; a bad line raises naming file:line."""
    specs = []
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            prompt, max_tokens = obj["prompt"], obj["max_tokens"]
            ok_prompt = isinstance(prompt, str) or (
                isinstance(prompt, list) and all(isinstance(t, int) and t >= 0 for t in prompt)
            )
            if not ok_prompt or not prompt:
                raise ValueError("'prompt' must be a non-empty string or list of token ids")
            if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
                raise ValueError("'max_tokens' must be a positive integer")
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            reason = f"missing key {exc}" if isinstance(exc, KeyError) else str(exc)
            raise ValueError(f"{path}:{lineno}: bad request line: {reason}") from exc
        specs.append(RequestSpec(prompt, max_tokens))
    if not specs:
        raise ValueError(f"{path}: no requests in the dataset")
    return specs


def arrival_times(num_requests: int, request_rate: float, seed: int) -> list[float]:
    """Send offsets (s) of a Poisson process at ``request_rate`` req/s, first at 0; ``inf`` = all at 0."""
    if math.isinf(request_rate):
        return [0.0] * num_requests
    rng = random.Random(f"arrivals:{seed}")  # not Random(seed): gaps independent of the prompt lengths
    times, now = [], 0.0
    for _ in range(num_requests):
        times.append(now)
        now += rng.expovariate(request_rate)
    return times


async def served_vocab_size(base_url: str, headers: dict[str, str]) -> int:
    """The served model's vocabulary size, from the gateway's model card (``vocab_size`` in GET
    /v1/models; ``ModelInfo.vocab_size`` over gRPC, ``grpc_vocab_size``): random prompts drawn
    from ``[0, vocab_size)`` are all valid for that model."""
    import httpx

    try:
        async with httpx.AsyncClient(
            base_url=base_url, timeout=30, trust_env=False, headers=headers
        ) as client:
            resp = await client.get("/v1/models")
            resp.raise_for_status()
            return int(resp.json()["data"][0]["vocab_size"])
    except (httpx.HTTPError, ValueError, KeyError, IndexError) as exc:
        raise RuntimeError(
            f"cannot read the model's vocab_size at {base_url}/v1/models ({exc!r}); pass --vocab-high"
        ) from exc


async def grpc_vocab_size(address: str, metadata: tuple[tuple[str, str], ...]) -> int:
    """``served_vocab_size`` through the gateway's gRPC API (ListModels)."""
    import grpc

    from protos import gateway_pb2, gateway_pb2_grpc

    async with grpc.aio.insecure_channel(address) as channel:
        try:
            reply = await gateway_pb2_grpc.GatewayServiceStub(channel).ListModels(
                gateway_pb2.ModelsRequest(), timeout=30, metadata=metadata
            )
        except grpc.aio.AioRpcError as exc:
            raise RuntimeError(
                f"cannot list models at {address} ({exc.code().name}); pass --vocab-high"
            ) from exc
    if not reply.models or not reply.models[0].vocab_size:
        raise RuntimeError(f"the gateway at {address} names no vocab_size; pass --vocab-high")
    return reply.models[0].vocab_size
