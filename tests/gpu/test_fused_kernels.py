"""Fused layer kernels (engine/layers/triton_ops.py) against the torch ops they replace, the engine on
them against HF, and the kernel count of one decode step (GPU box; errors and counts printed, -s).

The op tests also run on the CPU under ``TRITON_INTERPRET=1`` (with triton installed), except
bfloat16: the interpreter truncates float32 -> bfloat16 where the GPU rounds to nearest.
"""

from __future__ import annotations

import os

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (torch.cuda.is_available() or INTERPRET), reason="needs CUDA"),
]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Largest |fused - torch| over the largest |torch|: about two units in the last place of the dtype
# (a reduction summed in another order may flip one rounding of an intermediate).
BOUNDS = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
DTYPES = [
    torch.float32,
    torch.float16,
    pytest.param(
        torch.bfloat16,
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="interpreter rounds bf16 differently"),
    ),
]


def _ops():
    from engine.layers.kernels import LayerOps
    from engine.layers.triton_ops import TritonOps

    return LayerOps(), TritonOps()


def _randn(*shape: int, dtype: torch.dtype, seed: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    return (torch.randn(*shape, device=DEVICE, generator=g) * scale).to(dtype)


def _check(
    name: str, got: torch.Tensor, want: torch.Tensor, bounds: dict | None = None, max_differ: float = 0.01
) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype, f"{name}: {got.shape}/{got.dtype}"
    assert not got.isnan().any(), f"{name}: NaN"
    err = ((got.double() - want.double()).abs().max() / want.double().abs().max()).item()
    differ = (got != want).double().mean().item()
    bound = (bounds or BOUNDS)[got.dtype]
    print(f"{name}: max err {err:.1e} (bound {bound:.0e}), elements differing {differ:.2%}")
    assert err <= bound, f"{name}: max rel err {err:.2e}"
    # Same roundings as torch: a low-precision result rarely differs at all.
    assert got.dtype == torch.float32 or differ < max_differ, f"{name}: {differ:.2%} of elements differ"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,dim", [(1, 1024), (7, 4096), (33, 896), (300, 128)])
def test_rms_norm(dtype, rows, dim):
    ref, fused = _ops()
    wide = _randn(rows, dim + 64, dtype=dtype, seed=rows + dim, scale=3.0)
    x = wide[:, 32 : 32 + dim]  # a strided view: rows are not dim apart
    residual = _randn(rows, dim, dtype=dtype, seed=dim)
    weight = 1 + 0.1 * _randn(dim, dtype=dtype, seed=1)
    _check(f"rms_norm {dtype} {rows}x{dim}", fused.rms_norm(x, weight, 1e-6), ref.rms_norm(x, weight, 1e-6))
    got, want = fused.add_rms_norm(x, residual, weight, 1e-6), ref.add_rms_norm(x, residual, weight, 1e-6)
    assert torch.equal(got[1], want[1]), "x + residual is one rounded add, as in torch"
    _check(f"add_rms_norm {dtype} {rows}x{dim}", got[0], want[0])


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_ops_run_on_their_tensors_device_not_the_threads_current_one():
    """An engine on cuda:1 stepped from a thread whose current device is cuda:0 (Triton launches on
    the current device's stream unless guarded): the op must follow cuda:1's stream, so it sees
    the input written there after a long sleep, not the stale zeros."""
    ref, fused = _ops()
    dev = torch.device("cuda", 1)
    src = torch.randn(7, 1024, device=dev)
    weight = 1 + 0.1 * torch.randn(1024, device=dev)
    with torch.cuda.device(0):
        x = torch.zeros(7, 1024, device=dev)
        torch.cuda.synchronize(dev)
        with torch.cuda.stream(torch.cuda.current_stream(dev)):
            torch.cuda._sleep(200_000_000)  # cuda:1's stream is busy for a while
            x.copy_(src)
        got = fused.rms_norm(x, weight, 1e-6)
    _check("rms_norm on cuda:1 from cuda:0", got, ref.rms_norm(src, weight, 1e-6))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_over_heads(dtype):
    """The per-head norm shape: [tokens, heads, head_dim], a view into a packed projection."""
    ref, fused = _ops()
    packed = _randn(9, 6 * 128, dtype=dtype, seed=3)
    x = packed[:, 128 : 5 * 128].view(9, 4, 128)
    weight = 1 + 0.1 * _randn(128, dtype=dtype, seed=4)
    _check(f"rms_norm heads {dtype}", fused.rms_norm(x, weight, 1e-6), ref.rms_norm(x, weight, 1e-6))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 3072), (5, 12288), (17, 1000), (2, 3, 64)])
def test_silu_and_mul(dtype, shape):
    ref, fused = _ops()
    *lead, inter = shape
    gate_up = _randn(*lead, 2 * inter, dtype=dtype, seed=inter, scale=4.0)  # reaches silu's tails
    _check(f"silu_and_mul {dtype} {shape}", fused.silu_and_mul(gate_up), ref.silu_and_mul(gate_up))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize(
    "tokens,num_heads,num_kv_heads,head_dim",
    [(1, 16, 8, 128), (7, 32, 8, 128), (64, 4, 2, 64), (3, 8, 1, 80)],
)
def test_qk_norm_rope(dtype, qk_norm, tokens, num_heads, num_kv_heads, head_dim):
    from engine.config import RopeConfig
    from engine.layers.rotary import RotaryEmbedding

    ref, fused = _ops()
    rope = RopeConfig(theta=1e6, scaling="llama3", factor=8.0, original_max_position_embeddings=64)
    rotary = RotaryEmbedding(head_dim, 4096, rope).to(DEVICE)
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    qkv = _randn(tokens, q_size + 2 * kv_size, dtype=dtype, seed=tokens * head_dim, scale=2.0)
    q = qkv[:, :q_size].view(tokens, num_heads, head_dim)  # views, as the attention layer passes them
    k = qkv[:, q_size : q_size + kv_size].view(tokens, num_kv_heads, head_dim)
    g = torch.Generator(device=DEVICE).manual_seed(tokens)
    positions = torch.randint(0, 4096, (tokens,), device=DEVICE, generator=g)
    positions[0] = 4095  # the table's last row
    weights = (None, None)
    if qk_norm:
        weights = (
            1 + 0.1 * _randn(head_dim, dtype=dtype, seed=5),
            1 + 0.1 * _randn(head_dim, dtype=dtype, seed=6),
        )
    args = (positions, q, k, rotary.cos_cache, rotary.sin_cache, *weights, 1e-6)
    got, want = fused.qk_norm_rope(*args), ref.qk_norm_rope(*args)
    for name, a, b in zip(("q", "k"), got, want, strict=True):
        if qk_norm:
            _check(f"qk_norm_rope {name} {dtype} {tokens}x{num_heads}/{num_kv_heads}x{head_dim}", a, b)
        else:  # no reduction: every value is rounded exactly where torch rounds it
            assert torch.equal(a, b), (
                f"rope {name} {dtype}: max diff {(a.double() - b.double()).abs().max():.2e}"
            )
    # The same with the KV-cache store fused in: q and k unchanged, the rotated k and the raw v in
    # their slots (shuffled, distinct), every other slot untouched (NaN-poisoned).
    v = qkv[:, q_size + kv_size :].view(tokens, num_kv_heads, head_dim)
    slots = torch.randperm(3 * tokens, device=DEVICE, generator=g)[:tokens]
    k_cache = torch.full((3 * tokens, num_kv_heads, head_dim), float("nan"), dtype=dtype, device=DEVICE)
    v_cache = k_cache.clone()
    got_q, got_k = fused.qk_norm_rope_store(*args[:3], v, *args[3:], k_cache, v_cache, slots)
    assert torch.equal(got_q, got[0]) and torch.equal(got_k, got[1])
    assert torch.equal(k_cache[slots], got_k) and torch.equal(v_cache[slots], v)
    untouched = torch.ones(3 * tokens, dtype=torch.bool, device=DEVICE)
    untouched[slots] = False
    assert k_cache[untouched].isnan().all() and v_cache[untouched].isnan().all()


# -- the engine on the fused kernels -------------------------------------------------------------------

SHAPE = dict(arch="qwen3", num_layers=4, hidden_size=256, intermediate_size=768, num_heads=8, num_kv_heads=2,
             head_dim=64, seed=9)  # fmt: skip


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory):
    from engine.make_model import make_model

    return make_model(tmp_path_factory.mktemp("fused") / "qwen3", **SHAPE)


def _llm(path, fused: bool, **kw):
    from engine import LLM

    options = dict(device="cuda", attention_backend="triton", kv_cache_bytes=256 << 20, fused_kernels=fused)
    return LLM(str(path), **(options | kw))


# The GEMV sums up to K float32 products in another order than cuBLAS: a float32 result moves by
# ~sqrt(K) ulps; a rounded low-precision one flips a last bit where the sum lies near a tie (float16,
# with 3 more mantissa bits than bfloat16, flips ~8x as often: up to 3 % of elements seen).
GEMV_BOUNDS = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
GEMV_MAX_DIFFER = 0.05


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "rows,n,k",
    [(1, 4096, 1024), (1, 3001, 5000), (2, 1024, 2048), (3, 1000, 3000), (4, 6144, 4096), (16, 512, 768)],
)
@pytest.mark.parametrize("variant", ["plain", "bias", "norm", "norm_residual", "gated"])
def test_gemv_matches_the_torch_ops(dtype, rows, n, k, variant):
    """The skinny projection with its fused norm / activation (engine/layers/triton_gemv.py) against
    the torch ops it replaces: norm (+ residual add), F.linear, SiLU·up. Odd sizes hit the masks
    (rows < the block's, N and K not multiples of theirs); outputs start as NaN where the allocator
    can hand back freed memory."""
    from engine.layers import triton_gemv

    torch_ops, _ = _ops()
    gated = variant == "gated"
    x = _randn(rows, k, dtype=dtype, seed=rows * k, scale=2.0)
    weight = _randn(2 * n if gated else n, k, dtype=dtype, seed=n, scale=k**-0.5)
    bias = _randn(n, dtype=dtype, seed=3) if variant == "bias" else None
    residual = _randn(rows, k, dtype=dtype, seed=4) if variant in ("norm_residual", "gated") else None
    norm_w = (_randn(k, dtype=dtype, seed=5) * 0.2 + 1).to(dtype)
    norm = triton_gemv.NormIn(norm_w, 1e-6, residual) if variant not in ("plain", "bias") else None
    torch.empty(rows * (n + k) * 4, dtype=torch.float32, device=DEVICE).fill_(float("nan"))  # freed: poison
    got, summed = triton_gemv.gemv(x, weight, bias, norm, gated)
    if gated:
        want, want_sum = torch_ops.norm_gate_up(x, residual, norm_w, 1e-6, weight)
    elif norm is not None:
        want, want_sum = torch_ops.norm_linear(x, residual, norm_w, 1e-6, weight)
    else:
        want, want_sum = torch_ops.linear(x, weight, bias), x
    _check(
        f"gemv {variant} {dtype} {rows}x{n}x{k}",
        got,
        want,
        GEMV_BOUNDS,
        GEMV_MAX_DIFFER,
    )
    if residual is None:
        assert summed is None
    elif dtype != torch.bfloat16 or not INTERPRET:
        assert torch.equal(summed, want_sum), "the residual sum is the add torch does"


@needs_cuda
@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9, reason="PDL needs sm_90+"
)
def test_gemv_chain_launched_with_pdl_in_a_graph_changes_no_bit():
    """Projections launched as programmatic dependents (each may start while the previous one runs
    and loads its first weights before waiting for it) and replayed from a CUDA graph give the
    bits of the plain eager chain: every kernel still reads its input after its producer wrote it.
    The chain is a decode layer's: norm + residual -> qkv-sized, -> o-sized, norm -> gate/up, down."""
    from engine.layers import triton_gemv

    hidden, inter = 1024, 1536
    x = _randn(1, hidden, dtype=torch.bfloat16, seed=1)
    residual = _randn(1, hidden, dtype=torch.bfloat16, seed=2)
    norm_w = (_randn(hidden, dtype=torch.bfloat16, seed=3) * 0.2 + 1).to(torch.bfloat16)
    w_in = _randn(hidden, hidden, dtype=torch.bfloat16, seed=4, scale=hidden**-0.5)
    w_o = _randn(hidden, hidden, dtype=torch.bfloat16, seed=5, scale=hidden**-0.5)
    w_gu = _randn(2 * inter, hidden, dtype=torch.bfloat16, seed=6, scale=hidden**-0.5)
    w_down = _randn(hidden, inter, dtype=torch.bfloat16, seed=7, scale=inter**-0.5)

    def chain(pdl: bool) -> list[torch.Tensor]:
        def cfg(n, k, gated=False):
            return triton_gemv.gemv_config(1, n, k, gated, pdl)

        a, summed = triton_gemv.gemv(
            x, w_in, None, triton_gemv.NormIn(norm_w, 1e-6, residual), config=cfg(hidden, hidden)
        )
        b, _ = triton_gemv.gemv(a, w_o, config=cfg(hidden, hidden))
        c, summed2 = triton_gemv.gemv(
            b,
            w_gu,
            None,
            triton_gemv.NormIn(norm_w, 1e-6, summed),
            gated=True,
            config=cfg(inter, hidden, True),
        )
        d, _ = triton_gemv.gemv(c, w_down, config=cfg(hidden, inter))
        return [a, summed, b, c, summed2, d]

    want = [t.clone() for t in chain(pdl=False)]
    chain(pdl=True)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = chain(pdl=True)
    for t in got:
        t.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert torch.equal(g, w), f"output {i} of the chain differs under PDL"


@needs_cuda
def test_lm_head_runs_the_gemv_at_one_row():
    """The LM head goes through ``LayerOps.linear``: at one row ``TritonOps`` runs it as the GEMV
    (one kernel, the vocabulary's odd row count hitting the N mask) and the logits match
    ``F.linear``'s."""
    import torch.nn.functional as F
    from torch.profiler import ProfilerActivity, profile

    from engine.layers.embedding import ParallelLMHead

    _, fused = _ops()
    vocab, hidden = 50_001, 1024
    head = ParallelLMHead(vocab, hidden, ops=fused).to(DEVICE, torch.bfloat16)
    with torch.no_grad():
        head.weight.copy_(_randn(vocab, hidden, dtype=torch.bfloat16, seed=11, scale=hidden**-0.5))
    x = _randn(1, hidden, dtype=torch.bfloat16, seed=12, scale=2.0)
    head(x)  # compile outside the profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        got = head(x)
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert [n for n in names if not n.startswith(("Memcpy", "Memset"))] == [
        n for n in names if "_gemv_kernel" in n
    ]
    assert any("_gemv_kernel" in n for n in names), names
    _check("LM head via TritonOps, 1 row", got, F.linear(x, head.weight), GEMV_BOUNDS, GEMV_MAX_DIFFER)


@needs_cuda
def test_triton_ops_take_the_gemv_at_few_rows_only():
    """``TritonOps`` projections: the GEMV up to ``MAX_ROWS`` rows whatever the weight's size,
    cuBLAS above; both agree with the torch ops."""
    from torch.profiler import ProfilerActivity, profile

    from engine.layers import triton_gemv

    torch_ops, fused = _ops()
    small = _randn(2048, 1024, dtype=torch.bfloat16, seed=1, scale=1 / 32)
    large = _randn(2 * 12288, 4096, dtype=torch.bfloat16, seed=2, scale=1 / 64)  # Qwen3-8B's gate/up
    cases = [(1, small, True), (triton_gemv.MAX_ROWS, small, True), (triton_gemv.MAX_ROWS + 1, small, False)]
    cases += [(64, small, False), (1, large, True)]
    for rows, weight, want_gemv in cases:
        dim = weight.shape[1]
        x = _randn(rows, dim, dtype=torch.bfloat16, seed=rows)
        residual = _randn(rows, dim, dtype=torch.bfloat16, seed=rows + 1)
        norm_w = torch.ones(dim, dtype=torch.bfloat16, device=DEVICE)
        fused.norm_gate_up(x, residual, norm_w, 1e-6, weight)  # compile outside the profile
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            got, got_sum = fused.norm_gate_up(x, residual, norm_w, 1e-6, weight)
            torch.cuda.synchronize()
        names = [
            e.name
            for e in prof.events()
            if e.device_type == torch.autograd.DeviceType.CUDA and not e.name.startswith(("Memcpy", "Memset"))
        ]
        uses_gemv = any("_gemv_kernel" in name for name in names)
        assert uses_gemv == want_gemv, (rows, tuple(weight.shape), names)
        assert len(names) == 1 if uses_gemv else len(names) >= 3, names  # GEMV alone; norm, GEMM(s), SiLU·up
        want, want_sum = torch_ops.norm_gate_up(x, residual, norm_w, 1e-6, weight)
        _check(
            f"norm_gate_up via TritonOps, {rows} x {tuple(weight.shape)}",
            got,
            want,
            GEMV_BOUNDS,
            GEMV_MAX_DIFFER,
        )
        assert torch.equal(got_sum, want_sum)


@needs_cuda
@pytest.mark.parametrize("arch", ["qwen3", "qwen2", "llama"])
def test_fused_engine_matches_hf_greedy(model_dirs, arch):
    """float32: decode replayed from CUDA graphs where the attention kernel allows (head_dim >= 16)."""
    transformers = pytest.importorskip("transformers")
    from oracles import hf_greedy

    from engine import SamplingParams
    from engine.config import ModelConfig

    path = model_dirs[arch]
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).cuda().eval()
    backend = "triton" if ModelConfig.from_dir(path).head_dim >= 16 else "torch_native"
    llm = _llm(path, fused=True, dtype="float32", attention_backend=backend, max_num_seqs=8)
    assert llm.engine.runner.layer_ops.name == "triton"
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 1000, (n,), generator=g).tolist() for n in (3, 17, 40)]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))
    for prompt, out in zip(prompts, outs, strict=True):
        assert out.token_ids == hf_greedy(hf, prompt, 32)[0]


@needs_cuda
def test_fused_bf16_logits_match_unfused(qwen3_dir):
    """The same decode batch over the same KV, fused and unfused, eager and from the graph."""
    from decode_batches import decode_batch, mixed_lens, release, row_rel_err

    engines = [_llm(qwen3_dir, fused, dtype="bfloat16", max_num_seqs=16).engine for fused in (True, False)]
    assert [e.runner.layer_ops.name for e in engines] == ["triton", "torch"]
    engines[0].runner.kv_pool.kv_gpu.normal_()
    engines[1].runner.kv_pool.kv_gpu.copy_(engines[0].runner.kv_pool.kv_gpu)
    lens = mixed_lens(13, engines[0].cfg.page_size, seed=2)
    logits = []
    for engine in engines:
        for graphs in (False, True):
            batch = decode_batch(engine, lens, seed=2)
            logits.append(engine.runner.forward(engine.runner.prepare(batch, use_graphs=graphs)).clone())
            release(engine, batch)
    fused_eager, fused_graph, torch_eager, torch_graph = logits
    errs = [row_rel_err(fused_eager, torch_eager), row_rel_err(fused_graph, torch_graph)]
    print(f"bf16 fused vs torch ops, max row rel err: eager {errs[0]:.2e}, graph {errs[1]:.2e}")
    assert max(errs) < 1e-2


def _kernels_in_decode_step(engine, lens) -> tuple[int, float]:
    """(GPU kernels launched, their summed µs) by one eager decode forward, after a warm-up."""
    from decode_batches import decode_batch, release
    from torch.profiler import ProfilerActivity, profile

    runner = engine.runner
    batch = decode_batch(engine, lens, seed=4)
    runner.forward(runner.prepare(batch, use_graphs=False))  # compiles the Triton variants
    fb = runner.prepare(batch, use_graphs=False)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        runner.forward(fb)
        torch.cuda.synchronize()
    release(engine, batch)
    kernels = [
        e
        for e in prof.events()
        if e.device_type == torch.autograd.DeviceType.CUDA and not e.name.startswith(("Memcpy", "Memset"))
    ]
    return len(kernels), sum(e.time_range.elapsed_us() for e in kernels)


@needs_cuda
def test_fused_decode_step_launches_fewer_kernels(qwen3_dir):
    counts = {}
    for fused in (True, False):
        engine = _llm(qwen3_dir, fused, dtype="bfloat16", max_num_seqs=8, cuda_graphs=False).engine
        counts[fused] = _kernels_in_decode_step(engine, [100, 37, 1500, 16])
    (n_fused, us_fused), (n_torch, us_torch) = counts[True], counts[False]
    layers = SHAPE["num_layers"]
    print(
        f"one eager bf16 decode step, {layers} layers, bs 4: fused {n_fused} kernels ({us_fused:.0f} µs GPU), "
        f"torch ops {n_torch} kernels ({us_torch:.0f} µs GPU); ~{(n_torch - n_fused) / layers:.0f} fewer per layer"
    )
    assert n_fused * 3 <= n_torch, "the fused path should launch at most a third of the kernels"
