"""``pdserve up`` placing several instances on one GPU: their KV pools split the device instead of
the first instance taking what the utilization allows and the next finding nothing left."""

from __future__ import annotations

import argparse

from pdserve.cli import build_parser
from pdserve.serve import add_gateway_args
from pdserve.up import gateway_flags, up_instance_args


def utilization(argv: list[str]) -> float:
    """What the instance's own parser resolves (the last --gpu-memory-utilization wins)."""
    return build_parser().parse_args(["prefill", *argv]).gpu_memory_utilization


def test_instances_on_one_gpu_split_its_memory():
    args = build_parser().parse_args(
        ["up", "--device", "cuda:0", "--kv-backend", "cuda_ipc", "--gpu-memory-utilization", "0.9"]
    )
    prefill, decode = up_instance_args(args, ["--gpu-memory-utilization", "0.9"])
    assert [utilization(argv) for argv in prefill + decode] == [0.45, 0.45]


def test_instances_on_their_own_gpus_keep_the_whole_utilization():
    args = build_parser().parse_args(["up", "--prefill-device", "cuda:0", "--decode-device", "cuda:1,cuda:0",
                                      "--num-decode", "2", "--kv-backend", "cuda_ipc"])  # fmt: skip
    prefill, decode = up_instance_args(args, ["--gpu-memory-utilization", "0.85"])
    assert [utilization(argv) for argv in prefill + decode] == [0.425, 0.85, 0.425]


def test_explicit_pool_sizes_and_the_cpu_are_left_alone():
    cpu = build_parser().parse_args(["up", "--num-decode", "2"])
    sized = build_parser().parse_args(
        ["up", "--device", "cuda:0", "--kv-cache-mib", "4096", "--kv-backend", "cuda_ipc"]
    )
    for args in (cpu, sized):
        prefill, decode = up_instance_args(args, [])
        assert all("--gpu-memory-utilization" not in argv for argv in prefill + decode)


def test_up_passes_every_gateway_flag_it_was_given_to_the_gateway():
    """Each flag of ``add_gateway_args`` set to a non-default value on ``pdserve up`` reaches the
    gateway child's command line, and the gateway's parser reads the same value back."""
    spec = argparse.ArgumentParser(add_help=False)
    add_gateway_args(spec, with_model_len=False)
    given: list[str] = []
    for action in spec._actions:
        if not action.option_strings or action.dest in ("host", "port", "grpc_port"):
            continue
        flag = action.option_strings[0]
        if isinstance(action, argparse._StoreTrueAction):
            given.append(flag)
        elif action.type in (int, float):
            given += [flag, "7"]
        else:
            given += [flag, "round_robin" if "policy" in action.dest else "x-value"]
    up_args = build_parser().parse_args(["up", *given])
    forwarded = gateway_flags(up_args)
    gw_args = build_parser().parse_args(["gateway", "--decode", "127.0.0.1:1", *forwarded])
    for action in spec._actions:
        if action.option_strings and action.dest not in ("host", "port", "grpc_port"):
            assert getattr(gw_args, action.dest) == getattr(up_args, action.dest), action.dest
    assert gateway_flags(build_parser().parse_args(["up"])) == []  # defaults: nothing to say
