"""Sliding windows on random packed rows, planned and checked as on the fused GPU kernels.

The GPU suite found two bugs that every CPU test missed, because the torch kernel plans
documents differently (it takes calls of any shape) and has no FlashAttention window
arguments. This fuzz runs the ring on `tests/_fused_like.py`'s kernel instead: short document
calls become varlen calls, windowed diagonals are rebuilt by `kernels/band.py`, every
FlashAttention window is checked through a model of the op's rules, and the rows are scaled down
(192-token shards, dense document calls from 80 tokens, varlen below 64 rows on a side) so a few
hundred tokens reach every kind of call.

Seeded random rows (documents of 1...400 tokens, padding runs, two rows that differ; the GPU
fuzz's generator), random windows (1 token ... longer than the row, or none) and layouts,
sinks on some cases; fp64, forward and
every gradient against the naive reference (tests/reference.py) within 1e-10; SP 1-4 (3
included; Ulysses 2 x ring 2 on some SP = 4 cases), one spawned gloo group per world size.
"""

from __future__ import annotations

import random

import pytest
import torch
from _dist import run_distributed
from _exact import make_inputs, single_thread
from _fused_like import fused_like_kernel
from _gpu import ids_of, random_lengths
from reference import window_reference

from seqpar_ring import documents, kernels
from seqpar_ring import groups as sp_groups
from seqpar_ring.layout import shard
from seqpar_ring.ring import ring_attention
from seqpar_ring.ulysses import ulysses_ring_attention

SHARD, HEADS, KV_HEADS, DIM = 192, 4, 2, 8
CASES = 12
TOL = 1e-10
WINDOWS = (1, 2, 3, 5, 17, 63, 64, 65, 100, 191, 192, 250, 10**6, None)  # None: no window


def _case(rank: int, world: int, i: int) -> None:
    rng = random.Random(1000 * world + i)
    seq = SHARD * world
    layout = rng.choice(("contiguous", "zigzag"))
    window = rng.choice(WINDOWS)
    ids = torch.stack([ids_of(random_lengths(rng, seq, longest=400)) for _ in range(2)])
    data = make_inputs(7 * world + i, 2, seq, HEADS, KV_HEADS, DIM)
    g = torch.Generator().manual_seed(i)
    sinks = torch.randn(HEADS, generator=g, dtype=torch.float64) if i % 3 == 0 else None
    real = ids >= 0
    dout = data["dout"].double() * real[..., None, None]  # padding rows carry no loss
    leaves = [data[n].double().requires_grad_(True) for n in ("q", "k", "v")]
    s_ref = None if sinks is None else sinks.clone().requires_grad_(True)
    ref = window_reference(*leaves, window, doc_ids=ids, sinks=s_ref)
    want = torch.autograd.grad(ref, leaves + ([s_ref] if s_ref is not None else []), dout)

    u = 2 if world == 4 and i % 3 == 1 else 1  # Ulysses 2 x ring 2 on some SP = 4 cases

    def sh(x):
        return shard(x, world, rank, layout, dim=1, ulysses_size=u).contiguous() \
            if world > 1 else x

    q, k, v = (sh(data[n].double()).requires_grad_(True) for n in ("q", "k", "v"))
    s = None if sinks is None else sinks.clone().requires_grad_(True)
    kw = dict(layout=layout, window=window, sinks=s, doc_ids=sh(ids))
    if u > 1:
        out = ulysses_ring_attention(q, k, v, sp_groups.initialize(world, ulysses_size=u), **kw)
    else:
        out = ring_attention(q, k, v, torch.distributed.group.WORLD if world > 1 else None, **kw)
    got = torch.autograd.grad(out, [q, k, v] + ([s] if s is not None else []), sh(dout))
    if s is not None and world > 1:
        ds = got[3].clone()
        torch.distributed.all_reduce(ds)
        got = (*got[:3], ds)
    ctx = (f"rank {rank}/{world} case {i} layout={layout} W={window} u={u} "
           f"sinks={sinks is not None}")
    mask = sh(real)[..., None, None]
    pairs = [("out", out * mask, sh(ref.detach()) * mask)] + [
        (n, a, sh(b) if n != "dsinks" else b)
        for n, a, b in zip(("dq", "dk", "dv", "dsinks"), got, want)]
    for name, a, b in pairs:
        err = (a - b).abs().max().item()
        assert err <= TOL * max(b.abs().max().item(), 1.0), f"{ctx}: {name} err {err:.3e}"


def _all_cases(rank: int, world: int) -> int:
    calls: list = []
    saved = kernels.KERNELS["torch"], documents.DENSE_MIN_TOKENS
    kernels.KERNELS["torch"] = fused_like_kernel(calls, min_rows=64)
    documents.DENSE_MIN_TOKENS = 80  # dense document calls at this row scale
    try:
        with single_thread():
            for i in range(CASES):
                _case(rank, world, i)
    finally:
        kernels.KERNELS["torch"], documents.DENSE_MIN_TOKENS = saved
        sp_groups.destroy()
    assert "causal" in calls and "band" in calls, "band.py's calls were not reached"
    return CASES


def test_window_fuzz_world1():
    assert _all_cases(0, 1) == CASES


@pytest.mark.parametrize("world", [2, 3, 4])
def test_window_fuzz(world):
    assert run_distributed(_all_cases, world, timeout=400.0) == [CASES] * world
