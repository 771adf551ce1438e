"""The document planner against brute force: the (query, key) pairs its calls make visible.

For random packed rows with padding, every world size 1-4, both layouts, causal and not, and
dense / varlen thresholds, the calls of every (rank, origin) pair are expanded into the set of
(global query, global key) pairs they compute; that set must equal the visibility of the
reference (same document, key not after query when causal) on every row whose output is
specified, each pair computed exactly once, and pairs sharing no document must cost no call.
"""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from seqpar_ring.documents import FUSED_MIN_ROWS, document_runs, plan_documents
from seqpar_ring.layout import chunk_ranges, local_positions


def _random_row(rng: random.Random, seq: int) -> list[int]:
    row, doc = [], 0
    while len(row) < seq:
        n = rng.choice([1, 2, 3, 5, 8, 13, 24])
        if rng.random() < 0.2:
            row += [-1] * n
        else:
            row += [doc] * n
            doc += 1
    return row[:seq]


def _visible_by_calls(plan, me, p, seq, layout, rows):
    """{(row, q_global, k_global)} the plan's calls compute for rank ``me``."""
    seen = {}
    mine = local_positions(seq, p, me, layout).tolist()
    for origin in range(p):
        theirs = local_positions(seq, p, origin, layout).tolist()
        calls = plan.calls(origin) if not plan.trivial else []
        for c in calls:
            for r in (range(rows) if c.row is None else [c.row]):
                for qi, kj, causal in _pairs(c):
                    if causal and kj > qi:
                        continue
                    key = (r, mine[c.q.start + qi], theirs[c.k.start + kj])
                    seen[key] = seen.get(key, 0) + 1
    return seen


def _pairs(c):
    """(local q offset, local k offset, causal) of every pair a call could compute."""
    nq, nk = c.q.stop - c.q.start, c.k.stop - c.k.start
    if c.varlen is not None:
        qa = ka = 0
        for ql, kl in c.varlen.seqs:
            assert not c.causal or ql == kl or 0 in (ql, kl)
            yield from ((qa + i, ka + j, c.causal) for i in range(ql) for j in range(kl))
            qa, ka = qa + ql, ka + kl
        assert (qa, ka) == (nq, nk), "varlen sequences must tile the call's rows"
    elif c.window is not None:
        w = c.window
        assert nq == nk and nq % w == 0
        yield from ((s + i, s + j, c.causal) for s in range(0, nq, w)
                    for i in range(w) for j in range(w))
    else:
        yield from ((i, j, c.causal) for i in range(nq) for j in range(nk))


def _expected(ids: torch.Tensor, causal: bool, me, p, seq, layout):
    """Reference pairs of rank ``me``'s queries, and its rows whose output is unspecified."""
    want, free = set(), set()
    mine = local_positions(seq, p, me, layout).tolist()
    for r, row in enumerate(ids.tolist()):
        last_real = max((i for i, d in enumerate(row) if d >= 0), default=-1)
        for qg in mine:
            if causal and row[qg] < 0 and qg > last_real:
                free.add((r, qg))  # trailing padding: joins the last document
                continue
            for kg in range(seq):
                if row[qg] >= 0 and row[kg] == row[qg] and not (causal and kg > qg):
                    want.add((r, qg, kg))
    return want, free


@pytest.mark.parametrize("p", [1, 2, 3, 4])
def test_plan_computes_exactly_the_visible_pairs(p):
    rng = random.Random(p)
    seq = 48
    for trial, layout, causal, (min_dense, min_rows) in itertools.product(
            range(6), ("contiguous", "zigzag"), (True, False),
            ((1, 1), (4, 1), (4, 3), (10**9, 1), (4, FUSED_MIN_ROWS))):
        ids = torch.tensor([_random_row(rng, seq) for _ in range(2)])
        if trial == 0:
            ids[1] = ids[0]  # identical rows: calls shared by the batch (row=None)
        runs = document_runs(ids, causal)
        for me in range(p):
            plan = plan_documents(runs, seq, list(range(p)), me,
                                  lambda r: chunk_ranges(seq, p, r, layout), causal, min_dense,
                                  min_rows)
            if plan.trivial:  # every row one document: the plain path, no plan
                assert all(rr == [(0, seq)] for rr in runs)
                continue
            got = _visible_by_calls(plan, me, p, seq, layout, ids.shape[0])
            want, free = _expected(ids, causal, me, p, seq, layout)
            ctx = (f"p={p} me={me} layout={layout} causal={causal} min_dense={min_dense} "
                   f"min_rows={min_rows} ids={ids}")
            twice = [k for k, n in got.items() if n > 1]
            assert not twice, f"{ctx}: pairs computed twice {twice[:5]}"
            got = {k for k in got if (k[0], k[1]) not in free}
            missing, extra = sorted(want - got)[:5], sorted(got - want)[:5]
            assert got == want, f"{ctx}: missing {missing} extra {extra}"


def test_pairs_sharing_no_document_cost_nothing():
    """Documents inside each rank's shard: only the rank's own block has calls."""
    seq, p = 64, 4
    ids = (torch.arange(seq) // 8).expand(2, seq)  # 8 documents of 8: 2 per shard of 16
    runs = document_runs(ids, True)
    for me in range(p):
        plan = plan_documents(runs, seq, list(range(p)), me,
                              lambda r: chunk_ranges(seq, p, r, "contiguous"), True, 4,
                              min_rows=1)
        assert [o for o in range(p) if plan.calls(o)] == [me]
        (call,) = plan.calls(me)
        assert call.window == 8 and call.row is None  # two equal documents: one batched call


def test_runs_padding_rules_and_errors():
    ids = torch.tensor([[0, 0, -1, 1, 1, -1, -1]])
    assert document_runs(ids, causal=True) == [[(0, 2), (3, 7)]]   # trailing padding joins
    assert document_runs(ids, causal=False) == [[(0, 2), (3, 5)]]
    assert document_runs(torch.tensor([[0, 0, 0, -1]]), causal=True) == [[(0, 4)]]
    plan = plan_documents(document_runs(torch.tensor([[0, 0, 0, -1]]), True), 4, [0], 0,
                          lambda r: [(0, 4)], True)
    assert plan.trivial  # a right-padded row is the plain path
    with pytest.raises(ValueError, match="two separate runs"):
        document_runs(torch.tensor([[0, 0, 1, 0]]), causal=True)


def test_default_threshold_mixes_dense_and_varlen_calls():
    """Long documents get dense calls, the short ones between them share one varlen call."""
    seq = 4096
    lens = [1500, 300, 200, 96, 2000]
    ids = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))[None]
    plan = plan_documents(document_runs(ids, True), seq, [0], 0, lambda r: [(0, seq)], True)
    kinds = [("varlen" if c.varlen else "dense", c.q.start, c.q.stop) for c in plan.calls(0)]
    assert kinds == [("dense", 0, 1500), ("varlen", 1500, 2096), ("dense", 2096, 4096)], kinds


def _ids_of(lengths, seq):
    """A row of documents of ``lengths`` (negative length: a padding run) filling ``seq``."""
    row = []
    doc = 0
    for n in lengths:
        row += [-1] * -n if n < 0 else [doc] * n
        doc += n > 0
    assert len(row) == seq
    return row


def _computed_mask(plan, me, p, seq, layout, rows):
    """(rows, seq, seq) bool: the (query, key) pairs rank ``me``'s calls compute, as tensors."""
    got = torch.zeros(rows, seq, seq, dtype=torch.int32)
    mine = local_positions(seq, p, me, layout)
    for origin in range(p):
        theirs = local_positions(seq, p, origin, layout)
        for c in plan.calls(origin):
            nq, nk = c.q.stop - c.q.start, c.k.stop - c.k.start
            m = torch.zeros(nq, nk, dtype=torch.int32)
            seqs = c.varlen.seqs if c.varlen is not None else (
                ((c.window, c.window),) * (nq // c.window) if c.window else ((nq, nk),))
            qa = ka = 0
            for ql, kl in seqs:
                block = torch.ones(ql, kl, dtype=torch.int32)
                m[qa:qa + ql, ka:ka + kl] = block.tril() if c.causal else block
                qa, ka = qa + ql, ka + kl
            qi, ki = mine[c.q][:, None], theirs[c.k][None, :]
            for r in (range(rows) if c.row is None else [c.row]):
                got[r].index_put_((qi.expand(nq, nk), ki.expand(nq, nk)), m, accumulate=True)
    return got


def _reference_mask(ids: torch.Tensor, causal: bool):
    """(rows, seq, seq) bool visibility, and (rows, seq) rows whose output is unspecified."""
    same = (ids[:, :, None] == ids[:, None, :]) & (ids[:, :, None] >= 0)
    if causal:
        same &= torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool).tril()
    real = ids >= 0
    trailing = ~real & (real.long().flip(1).cumsum(1).flip(1) == 0)
    return same, (trailing if causal else torch.zeros_like(trailing))


def _random_lengths(rng: random.Random, seq: int) -> list[int]:
    """Documents of 1...5,000 tokens (often 1-3) and padding runs, filling ``seq``."""
    out, left = [], seq
    while left:
        n = min(left, rng.choice([1, 1, 2, 3, rng.randint(1, 64), rng.randint(1, 5000)]))
        out.append(-n if rng.random() < 0.15 else n)
        left -= n
    return out


# The patterns that crashed cuDNN (a 1-token document between or after long ones), documents on
# chunk edges, padding runs left/middle/right (rows of 4,096 tokens).
EDGE_PATTERNS = [[2000, 1, 2095], [4095, 1], [1, 4095], [2047, 1, 1, 2047], [1024, 1, 3071],
                 [-300, 3795, 1], [1000, -1, 1, 3094], [2048, 2048], [4094, 1, -1]]


def _tiny_dense_calls(plan, p):
    return [c for o in range(p) for c in ([] if plan.trivial else plan.calls(o))
            if c.varlen is None and
            (c.window or min(c.q.stop - c.q.start, c.k.stop - c.k.start)) < FUSED_MIN_ROWS]


@pytest.mark.parametrize("p", [1, 2, 4])
def test_no_dense_call_below_fused_min_rows(p):
    """Every call a fused kernel gets as dense/segmented has >= FUSED_MIN_ROWS rows per side
    (cuDNN rejects s_q = s_kv = 1): edge patterns and fuzzed rows at the default thresholds."""
    seq = 4096
    rng = random.Random(100 + p)
    cases = [[_ids_of(x, seq)] for x in EDGE_PATTERNS]
    cases += [[_ids_of(_random_lengths(rng, seq), seq) for _ in range(2)] for _ in range(20)]
    for rows_, layout, causal in itertools.product(cases, ("contiguous", "zigzag"),
                                                   (True, False)):
        runs = document_runs(torch.tensor(rows_), causal)
        for me in range(p):
            plan = plan_documents(runs, seq, list(range(p)), me,
                                  lambda r: chunk_ranges(seq, p, r, layout), causal)
            tiny = _tiny_dense_calls(plan, p)
            assert not tiny, f"p={p} me={me} {layout} causal={causal}: {tiny[:3]}"


@pytest.mark.parametrize("p", [1, 2, 4])
def test_plan_with_tiny_calls_is_exact(p):
    """The calls (tiny ones turned varlen included) compute exactly the visible pairs, once:
    edge patterns scaled to 512-token rows, and fuzzed rows."""
    seq = 512
    rng = random.Random(200 + p)
    cases = []
    for x in EDGE_PATTERNS:
        lens = [n // 8 if abs(n) >= 8 else n for n in x]
        lens[-1] += seq - sum(abs(n) for n in lens) if lens[-1] > 0 else \
            -(seq - sum(abs(n) for n in lens))
        cases.append([_ids_of(lens, seq)])
    cases += [[_ids_of(_random_lengths(rng, seq), seq) for _ in range(2)] for _ in range(3)]
    for rows_, layout, causal in itertools.product(cases, ("contiguous", "zigzag"),
                                                   (True, False)):
        ids = torch.tensor(rows_)
        runs = document_runs(ids, causal)
        want, free = _reference_mask(ids, causal)
        for me in range(p):
            plan = plan_documents(runs, seq, list(range(p)), me,
                                  lambda r: chunk_ranges(seq, p, r, layout), causal, 128)
            ctx = f"p={p} me={me} layout={layout} causal={causal}"
            assert not _tiny_dense_calls(plan, p), ctx
            if plan.trivial:
                continue
            got = _computed_mask(plan, me, p, seq, layout, ids.shape[0])
            assert int(got.max()) <= 1, f"{ctx}: a pair computed twice"
            mine = local_positions(seq, p, me, layout)
            spec = ~free[:, mine]
            g, w = got[:, mine].bool(), want[:, mine]
            assert torch.equal(g[spec], w[spec]), f"{ctx}: visible pairs differ"
