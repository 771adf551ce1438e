"""Sliding windows and attention sinks on the ring vs the naive reference (tests/reference.py).

Windows smaller than a zigzag chunk, between a chunk and a shard, larger than a shard and larger
than the sequence; contiguous and zigzag; GQA; plain, packed and padded rows; with and without
sinks; fp64 (1e-10) and fp32 (1e-5); forward and every gradient (dq, dk, dv, dsinks) at SP
1, 2, 3 and 4 (one spawned gloo group per world size runs every case); the fp64 cases again at
SP 1-3 on the torch kernel planned and checked like the fused ones (`tests/_fused_like.py`:
bands rebuilt by `kernels/band.py`, short document calls as varlen calls, FlashAttention's
window arguments checked). Also: the window geometry against a brute-force mask, and the bytes a
windowed layer sends.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from _dist import run_distributed
from _exact import make_inputs, single_thread
from _fused_like import fused_like_kernel
from reference import window_reference

from seqpar_ring import comm as C
from seqpar_ring import groups as sp_groups
from seqpar_ring.layout import shard
from seqpar_ring.ring import ring_attention
from seqpar_ring.ulysses import ulysses_ring_attention
from seqpar_ring.window import window_rect

SEQ, BATCH, HEADS, KV_HEADS, DIM = 24, 2, 4, 2, 8
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
TIMEOUT_S = 400.0


def _visible_by_band(sq: int, sk: int, causal: bool, band) -> torch.Tensor:
    """FlashAttention's window rule (bottom-right aligned), written out independently."""
    i = torch.arange(sq).view(-1, 1)
    j = torch.arange(sk).view(1, -1)
    if band is None:
        return (j <= i) if causal else torch.ones(sq, sk, dtype=torch.bool)
    left, right = band
    lo = i + (sk - sq) - left
    ok = j >= lo
    if right is not None:
        ok &= j <= i + (sk - sq) + right
    return ok


def test_window_rect_matches_brute_force():
    for n, w in itertools.product((1, 2, 3, 5, 8), (1, 2, 3, 4, 7, 9, 16, 40)):
        for q0, k0 in itertools.product(range(0, 24, 1), range(0, 24, 1)):
            diag = q0 == k0
            if not diag and k0 + n > q0:
                continue
            i = torch.arange(q0, q0 + n).view(-1, 1)
            j = torch.arange(k0, k0 + n).view(1, -1)
            want = (j <= i) & (i - j < w)
            rect = window_rect(q0, q0 + n, k0, k0 + n, diag, w)
            got = torch.zeros(n, n, dtype=torch.bool)
            if rect is not None:
                a, b, c, d, causal, band = rect
                assert q0 <= a < b <= q0 + n and k0 <= c < d <= k0 + n
                if band is not None:
                    assert band[0] >= 0 and (band[1] is None or band[1] >= 0)
                vis = _visible_by_band(b - a, d - c, causal, band)
                assert vis.any(1).all(), f"empty query row n={n} w={w} q0={q0} k0={k0}"
                got[a - q0:b - q0, c - k0:d - k0] = vis
            assert torch.equal(got, want), f"n={n} w={w} q0={q0} k0={k0} rect={rect}"


def _rows(kind: str) -> torch.Tensor | None:
    """Document ids (BATCH, SEQ): packed rows, or padded rows (left, middle, trailing)."""
    if kind == "plain":
        return None
    if kind == "packed":  # documents of 5, 11, 8 and 3, 2, 19 tokens
        lens = [[5, 11, 8], [3, 2, 19]]
        return torch.stack([torch.cat([torch.full((n,), d) for d, n in enumerate(row)])
                            for row in lens])
    ids = torch.zeros(BATCH, SEQ, dtype=torch.long)
    ids[0, -7:] = -1          # trailing padding (joins the document before it)
    ids[1, :3] = -1           # left padding
    ids[1, 3:14], ids[1, 14:16], ids[1, 16:] = 0, -1, 1  # a gap of padding between documents
    return ids


def _cases(world: int):
    windows = (1, 2, 4, 7, 9, 13, 30)
    for w, layout, kind in itertools.product(windows, ("contiguous", "zigzag"),
                                             ("plain", "packed", "pad")):
        sinks = (w + len(kind)) % 2 == 0
        yield dict(window=w, layout=layout, kind=kind, sinks=sinks, dtype=torch.float64,
                   comm="ring", bucket=None)
    for w, layout in itertools.product((3, 9, 30), ("contiguous", "zigzag")):
        yield dict(window=w, layout=layout, kind="packed", sinks=True, dtype=torch.float32,
                   comm="ring", bucket=4)
    if world > 1:
        yield dict(window=5, layout="zigzag", kind="packed", sinks=True, dtype=torch.float64,
                   comm="allgather", bucket=None)
    if world in (2, 4):  # Ulysses x ring (u = 2): pure Ulysses at SP 2, 2 x 2 at SP 4
        for w, layout, kind in ((3, "zigzag", "packed"), (9, "contiguous", "plain"),
                                (7, "zigzag", "pad")):
            yield dict(window=w, layout=layout, kind=kind, sinks=True, dtype=torch.float64,
                       comm="ring", bucket=None, ulysses=2)


def _check(rank: int, world: int, case: dict, seed: int) -> None:
    data = make_inputs(seed, BATCH, SEQ, HEADS, KV_HEADS, DIM)
    sinks = torch.randn(HEADS, generator=torch.Generator().manual_seed(seed)) \
        if case["sinks"] else None
    doc = _rows(case["kind"])
    real = torch.ones(BATCH, SEQ, dtype=torch.bool) if doc is None else doc >= 0
    dout = data["dout"] * real[..., None, None]  # padding rows carry no loss
    # reference in fp64 on the full rows
    leaves = [data[n].double().requires_grad_(True) for n in ("q", "k", "v")]
    s64 = None if sinks is None else sinks.double().requires_grad_(True)
    ref = window_reference(*leaves, case["window"], doc_ids=doc, sinks=s64)
    want = torch.autograd.grad(ref, leaves + ([s64] if s64 is not None else []), dout.double())
    lay, dt, u = case["layout"], case["dtype"], case.get("ulysses", 1)

    def sh(x):
        return shard(x, world, rank, lay, dim=1, ulysses_size=u).contiguous() \
            if world > 1 else x

    q, k, v = (sh(data[n].to(dt)).requires_grad_(True) for n in ("q", "k", "v"))
    s = None if sinks is None else sinks.to(dt).requires_grad_(True)
    group = torch.distributed.group.WORLD if world > 1 else None
    kw = dict(layout=lay, comm=case["comm"], window=case["window"], sinks=s,
              doc_ids=None if doc is None else sh(doc), bucket_size=case["bucket"])
    if u > 1:
        out = ulysses_ring_attention(q, k, v, sp_groups.initialize(world, ulysses_size=u), **kw)
    else:
        out = ring_attention(q, k, v, group, **kw)
    got = torch.autograd.grad(out, [q, k, v] + ([s] if s is not None else []), sh(dout.to(dt)))
    if s is not None and world > 1:  # each rank holds its rows' share of the sink gradient
        ds = got[3].clone()
        torch.distributed.all_reduce(ds)
        got = (*got[:3], ds)
    tol = TOL[dt]
    mask = sh(real)[..., None, None]
    pairs = [("out", out * mask, sh(ref.detach()) * mask)] + [
        (n, g, sh(w) if n != "dsinks" else w) for n, g, w in
        zip(("dq", "dk", "dv", "dsinks"), got, want)]
    for name, a, b in pairs:
        err = (a.double() - b.double()).abs().max().item()
        scale = max(b.abs().max().item(), 1.0)
        assert err <= tol * scale, f"rank {rank}/{world} {case}: {name} err {err:.3e}"


def _all_cases(rank: int, world: int, banded: bool = False) -> int:
    n, cases = 0, list(_cases(world))
    calls: list = []
    if banded:  # fp64 ring cases whose windows cut shards into several W-blocks
        from seqpar_ring import kernels

        # document calls under 4 rows go varlen: the fused kernels' 64, scaled to 24-token rows
        kernels.KERNELS["torch"] = fused_like_kernel(calls, min_rows=4)
        cases = [c for c in cases if c["dtype"] == torch.float64 and c["window"] in (2, 7, 9)
                 and c["comm"] == "ring" and "ulysses" not in c]
    with single_thread():
        for i, case in enumerate(cases):
            _check(rank, world, case, seed=100 + i)
            n += 1
    sp_groups.destroy()
    if banded:
        assert "causal" in calls, "no windowed call was rebuilt from causal calls"
    return n


def test_window_world1():
    assert _all_cases(0, 1) > 40


@pytest.mark.parametrize("world", [2, 3, 4])
def test_window_ring(world):
    run_distributed(_all_cases, world, timeout=TIMEOUT_S)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_window_ring_on_band_calls(world):
    """The cuDNN kernel's band decomposition inside whole windowed passes (diagonal W-blocks,
    reversed neighbour rectangles, documents), fp64 against the reference."""
    if world == 1:
        from seqpar_ring import kernels

        saved = kernels.KERNELS["torch"]
        try:
            assert _all_cases(0, 1, True) == 18
        finally:
            kernels.KERNELS["torch"] = saved
        return
    assert all(n == 18 for n in run_distributed(_all_cases, world, True, timeout=TIMEOUT_S))


def _bytes(rank: int, world: int) -> dict:
    """Bytes of K/V a windowed forward sends per rank vs the dense ring, per layout."""
    n_tok, w, b, hkv, d = 64, 16, 1, 2, 8
    seq = n_tok * world
    out = {}
    for layout, window in itertools.product(("contiguous", "zigzag"), (w, None)):
        g = torch.Generator().manual_seed(0)
        q = torch.randn(b, seq, 4, d, generator=g)
        k, v = (torch.randn(b, seq, hkv, d, generator=g) for _ in range(2))
        q, k, v = (shard(x, world, rank, layout, dim=1).contiguous() for x in (q, k, v))
        C.comm_stats.reset()
        with torch.no_grad():
            ring_attention(q, k, v, torch.distributed.group.WORLD, layout=layout,
                           window=window, agreed=True)
        out[(layout, window)] = C.comm_stats.bytes_sent
    return out


def test_window_sends_only_the_window():
    world, w, row = 4, 16, 2 * 1 * 2 * 8 * 4  # K and V, batch 1, 2 kv heads x 8 dims, fp32
    results = run_distributed(_bytes, world, timeout=TIMEOUT_S)
    for rank, got in enumerate(results):
        # contiguous: W - 1 rows to the next rank (the last rank's windows reach nobody)
        assert got[("contiguous", w)] == (0 if rank == world - 1 else (w - 1) * row), got
        # zigzag: W - 1 rows of each chunk to the rank its windows reach, at most two peers
        assert 0 < got[("zigzag", w)] <= 2 * (w - 1) * row, got
        # the dense ring sends the whole shard p - 1 times
        assert got[("contiguous", None)] == (world - 1) * 64 * row, got
        assert got[("zigzag", w)] * 6 < got[("zigzag", None)], got


def test_bench_counts_visible_pairs():
    from seqpar_ring.tools.bench.window import window_pairs

    for s, w in itertools.product((1, 7, 40), (1, 3, 40, None)):
        i = torch.arange(s).view(-1, 1)
        j = torch.arange(s).view(1, -1)
        want = ((j <= i) & ((i - j < w) if w else True)).sum().item()
        assert window_pairs(s, w) == want, (s, w)
