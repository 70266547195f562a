"""A request's KV out of and into a tensor-parallel engine as whole heads.

The oracle is one rank's pool: after the same prefill, the whole heads gathered from N gloo ranks
(``KVExportPlan``) equal the one-rank pool's pages, and the one-rank pages scattered into N ranks
(``KVImportPlan``) leave each rank's pool holding exactly its heads — for kv heads split over the
ranks (4 over 2) and replicated (2 over 4: each head on two ranks, taken once on export).
"""

from __future__ import annotations

import pytest
import torch
from tp_ranks import IMPORT_PAGES, kv_move_run, run_ranks

from engine.config import ModelConfig
from engine.distributed.kv_shards import MOVE_BYTES, join_heads, kv_head_ranges, layer_ranges, split_heads
from engine.make_model import make_model

TOL = 1e-5  # the sharded prefill's all-reduces sum in another order than one rank's GEMMs


def test_head_ranges_follow_the_pool_rule():
    assert kv_head_ranges(4, 2) == [range(0, 2), range(2, 4)]
    assert kv_head_ranges(2, 4) == [range(0, 1), range(0, 1), range(1, 2), range(1, 2)]
    assert kv_head_ranges(1, 4) == [range(0, 1)] * 4
    assert kv_head_ranges(8, 1) == [range(0, 8)]


@pytest.mark.parametrize(("num_kv_heads", "tp"), [(4, 2), (2, 4), (1, 2), (8, 8), (3, 1)])
def test_split_then_join_is_the_identity_and_takes_each_head_once(num_kv_heads, tp):
    whole = torch.randn(2, 2, 3, 4, num_kv_heads, 8)  # [layers, k/v, pages, page_size, heads, dim]
    parts = split_heads(whole, tp)
    assert [p.shape[-2] for p in parts] == [max(1, num_kv_heads // tp)] * tp
    # A replica that is not its head's first holder is never read: poison it.
    replicas = max(1, tp // num_kv_heads)
    parts = [
        p.clone() if r % replicas == 0 else torch.full_like(p, float("nan")) for r, p in enumerate(parts)
    ]
    assert torch.equal(join_heads(parts, num_kv_heads), whole)


def test_layer_ranges_bound_the_bytes_of_one_move(tiny_model):
    m = ModelConfig.from_dir(tiny_model)  # 2 layers, 2 kv heads x 32 dims, float32
    page_layer_bytes = 2 * 4 * 2 * 32 * 4
    assert layer_ranges(m, 4, 10) == [range(0, 2)]
    many = MOVE_BYTES // page_layer_bytes  # pages whose one layer fills a move
    assert layer_ranges(m, 4, many) == [range(0, 1), range(1, 2)]
    assert layer_ranges(m, 4, 3 * many) == [range(0, 1), range(1, 2)]  # never less than a layer


@pytest.fixture(scope="module")
def kv4_model(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("kv4"), num_heads=4, num_kv_heads=4, head_dim=16, seed=3)


@pytest.mark.parametrize("case", ["4 kv heads over 2 ranks", "2 kv heads over 4 ranks"])
def test_export_and_import_match_one_rank(case, tiny_model, kv4_model, tmp_path):
    model, tp, num_kv_heads = (kv4_model, 2, 4) if case.startswith("4") else (tiny_model, 4, 2)
    ranks = run_ranks(tp, {"kv": (str(model), False)}, tmp_path, fn=kv_move_run)
    results = [r["kv"] for r in ranks]
    rank0 = results[0]
    one_rank = rank0["one_rank"]  # [layers, 2, pages, page_size, kv heads, head_dim]
    assert one_rank.shape[-2] == num_kv_heads
    assert rank0["exported"].shape == one_rank.shape
    torch.testing.assert_close(rank0["exported"], one_rank, rtol=TOL, atol=TOL)
    assert float(one_rank.abs().max()) > 0, "the prefill wrote the pages"
    expected = split_heads(one_rank, tp)
    for r, result in enumerate(results):
        assert result["imported"].shape[2] == len(IMPORT_PAGES)
        assert torch.equal(result["imported"], expected[r]), f"rank {r} holds its heads, exactly"
        if r > 0:
            assert result["exported"] is None and result["reexported"] is None
    assert torch.equal(rank0["reexported"], one_rank), "import then export is the identity"
