"""Row plans of dilated branches (seqpar_ring/sparse.py): strided and indexed paths agree with a
plain advanced-indexing reference, and every (kv head, offset) a query head needs is carried."""

from __future__ import annotations

import itertools

import pytest
import torch

from seqpar_ring.sparse import branch_heads

PLANS = list(itertools.product([(32, 32), (32, 8), (8, 2), (4, 1), (6, 3)], [1, 2, 3, 4, 8]))


def _reference_take(x, rows):
    n = x.shape[1]
    return x.unflatten(1, (n // rows.r, rows.r))[:, :, rows.offsets, rows.heads]


@pytest.mark.parametrize("heads,r", PLANS, ids=str)
def test_take_put_add_match_indexing(heads, r):
    h, hkv = heads
    plan = branch_heads(h, hkv, r, "cpu")
    n = 48
    for rows, dense in ((plan.q, h), (plan.kv, hkv)):
        x = torch.randn(2, n, dense, 5, dtype=torch.float64)
        sparse = rows.take(x)
        assert torch.equal(sparse, _reference_take(x, rows))
        # add_to twice == 2 x scatter-add (repeated pairs accumulate)
        got = torch.zeros_like(x)
        rows.add_to(got, sparse)
        rows.add_to(got, sparse)
        want = torch.zeros_like(x)
        b, m = sparse.shape[:2]
        idx = (torch.arange(b).view(b, 1, 1), torch.arange(m).view(1, m, 1),
               rows.offsets.view(1, 1, -1), rows.heads.view(1, 1, -1))
        want.unflatten(1, (n // r, r)).index_put_(idx, 2 * sparse, accumulate=True)
        assert torch.equal(got, want)
        if rows.unique:
            back = torch.zeros_like(x)
            rows.put(back, sparse)
            assert torch.equal(rows.take(back), sparse)


@pytest.mark.parametrize("heads,r", PLANS, ids=str)
def test_query_heads_read_their_kv_pair(heads, r):
    """Sparse query head i reads sparse kv head i // (H / U): that pair must be (h // g, h % r)."""
    h, hkv = heads
    plan = branch_heads(h, hkv, r, "cpu")
    u = len(plan.kv.heads)
    assert h % u == 0
    for i, (qh, qo) in enumerate(zip(plan.q.heads.tolist(), plan.q.offsets.tolist())):
        j = i // (h // u)
        assert qo == qh % r
        assert (plan.kv.heads[j].item(), plan.kv.offsets[j].item()) == (qh // (h // hkv), qo)
    assert sorted(plan.q.heads.tolist()) == list(range(h))


@pytest.mark.parametrize("heads,r", [p for p in PLANS if p[1] in (2, 4, 8)], ids=str)
def test_nested_rows_select_the_same_rows(heads, r):
    """Branch r's rows, read in the coordinates of rate 2, are exactly branch r's rows."""
    from seqpar_ring.sparse import nested_heads

    h, hkv = heads
    outer, inner = branch_heads(h, hkv, 2, "cpu"), branch_heads(h, hkv, r, "cpu")
    nest = nested_heads(h, hkv, 2, r, "cpu")
    for side, dense in (("q", h), ("kv", hkv)):
        x = torch.randn(2, 48, dense, 8).to(torch.bfloat16)  # bf16, D=8: the 8-byte copy path
        rows_o, rows_i, rows_n = (getattr(p, side) for p in (outer, inner, nest))
        assert torch.equal(rows_n.take(rows_o.take(x)), rows_i.take(x))
        assert torch.equal(rows_i.take(x), _reference_take(x, rows_i))


def test_weighted_take_and_add():
    plan = branch_heads(8, 8, 4, "cpu")
    x = torch.randn(1, 32, 8, 3, dtype=torch.float64)
    w = torch.rand(1, 8, 8, dtype=torch.float64)
    want = _reference_take(x, plan.q) * w.unsqueeze(-1)
    assert torch.equal(plan.q.take(x, w), want)
    got = torch.zeros_like(x)
    plan.q.add_to(got, _reference_take(x, plan.q), w)
    back = torch.zeros_like(x)
    plan.q.put(back, want)
    assert torch.equal(got, back)
