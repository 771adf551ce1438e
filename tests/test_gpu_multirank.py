"""Every multi-rank feature on the fused GPU kernels, with the ranks sharing one GPU.

Skipped without CUDA; run with ``python -m pytest -q -s -m gpu tests``. Each test spawns one
gloo group whose ranks all compute on cuda:0 (collectives staged through pinned host memory,
`seqpar_ring.stage`) and runs many cases against a one-process fp32 reference, forward and
every gradient, with the bf16 rule of `tests/_gpu.py` (max |err| <= 2e-2 + 2e-2 max |ref|):

- ring at SP = 2, 3, 4: contiguous and zigzag, causal and not, GQA, ring and all-gather comm;
- packed documents: 30 seeded random patterns each at SP = 2 and 4 (documents of 1...5,000
  tokens, padding runs, two rows that differ);
- dilated attention at SP = 2 and 4, segments spanning ranks;
- sliding windows at SP = 2 and 4: windows shorter than a W-block, longer than a shard and
  longer than the row, plain and packed rows, both layouts (the windowed peer exchange and the
  cuDNN band calls of `kernels/band.py`);
- Ulysses x ring 2 x 2 and 4 x 1 with K/V heads not a multiple of the Ulysses size (GQA/MQA).

References: packed rows and dense rows — one fp32 SDPA call per document (`doc_reference`,
independent of the planner); dilated — the one-process fp32 torch kernel on the whole row.
Each test prints its largest error as a fraction of the bound ("GPU-ERR ...").
"""

from __future__ import annotations

import itertools
import random

import pytest
import torch
import torch.distributed as dist
from _dist import run_distributed
from _gpu import (compare, dev, cuda_worker_env, doc_reference, ids_of, inputs, random_lengths,
                  run_sharded, shards_of, unspecified)

import seqpar_ring
from seqpar_ring import groups as G
from seqpar_ring.layout import shard

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

TIMEOUT_S = 420.0
H, HKV, D = 8, 2, 128
FUZZ_PER_WORLD = 30
SEQ, CHUNK = 8192, 1024  # tokens of a packed / dilated row; ring rows are 2 * p * CHUNK


def _ring_cases(p: int, me: int, group) -> dict:
    """Dense rows: layouts x causal x (MHA, GQA) x comm."""
    worst = {}
    seq = 2 * p * CHUNK
    for i, ((layout, causal, (h, hkv)), comm) in enumerate(itertools.product(
            itertools.product(("contiguous", "zigzag"), (True, False), ((8, 8), (H, HKV))),
            ("ring", "allgather"))):
        if comm == "allgather" and (h, layout) != (H, "zigzag"):
            continue
        full = inputs(10 * p + i, 1, seq, h, hkv, D)  # the same on every rank
        want = shards_of(doc_reference(*full, None, causal), p, me, layout)
        got = run_sharded(lambda q, k, v: seqpar_ring.ring_attention(
            q, k, v, group, causal=causal, layout=layout, comm=comm), *full, p, me, layout)
        ctx = f"ring sp={p} {layout} causal={causal} heads={h}/{hkv} comm={comm}"
        worst[ctx] = compare(got, want, ctx)
    return worst


def _doc_cases(p: int, me: int, group, n: int, seed: int) -> dict:
    """Seeded random packed rows (two rows that differ), both layouts, causal and not."""
    worst, rng, seq = {}, random.Random(seed), SEQ
    for i in range(n):
        ids = torch.stack([ids_of(random_lengths(rng, seq)) for _ in range(2)])
        causal, layout = i % 2 == 0, ("zigzag", "contiguous")[(i // 2) % 2]
        q, k, v, dout = inputs(seed * 1000 + i, 2, seq, H, HKV, D)
        free = unspecified(ids, causal)
        dout = dout.masked_fill(free.to(dev())[:, :, None, None], 0.0)  # no loss from them
        want = shards_of(doc_reference(q, k, v, dout, ids, causal), p, me, layout)
        doc = shard(ids, p, me, layout).to(dev()).contiguous()
        got = run_sharded(lambda q_, k_, v_: seqpar_ring.ring_attention(
            q_, k_, v_, group, causal=causal, layout=layout, doc_ids=doc),
            q, k, v, dout, p, me, layout)
        ctx = f"docs sp={p} #{i} {layout} causal={causal}"
        worst[ctx] = compare(got, want, ctx, shard(free, p, me, layout))
    return worst


def _dilated_cases(p: int, me: int, group) -> dict:
    worst, seq = {}, SEQ
    ws, rs = [seq // 4, seq // 2, seq], [1, 2, 4]
    for causal in (True, False):
        q, k, v, dout = inputs(50 + causal, 1, seq, H, HKV, D)
        leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
        out = seqpar_ring.dilated_attention(*leaves, None, segment_lengths=ws,
                                            dilation_rates=rs, causal=causal, kernel="torch",
                                            bucket_size=2048)
        out.backward(dout)
        want = shards_of([out.detach()] + [x.grad for x in leaves], p, me, "contiguous")
        got = run_sharded(lambda q_, k_, v_: seqpar_ring.dilated_attention(
            q_, k_, v_, group, segment_lengths=ws, dilation_rates=rs, causal=causal),
            q, k, v, dout, p, me, "contiguous")
        ctx = f"dilated sp={p} causal={causal} segments {ws} rates {rs}"
        worst[ctx] = compare(got, want, ctx)
    return worst


def _window_cases(p: int, me: int, group) -> dict:
    worst, rng, seq = {}, random.Random(90 + p), SEQ
    for i, (layout, w, docs) in enumerate(itertools.product(
            ("contiguous", "zigzag"), (300, 3000, SEQ // p + 700, 2 * SEQ), (False, True))):
        ids = torch.stack([ids_of(random_lengths(rng, seq)) for _ in range(2)]) if docs \
            else None
        q, k, v, dout = inputs(80 + i, 2, seq, H, HKV, D)
        free = unspecified(ids, True) if docs else torch.zeros(2, seq, dtype=torch.bool)
        dout = dout.masked_fill(free.to(dev())[:, :, None, None], 0.0)
        want = shards_of(doc_reference(q, k, v, dout, ids, True, window=w), p, me, layout)
        doc = None if ids is None else shard(ids, p, me, layout).to(dev()).contiguous()
        got = run_sharded(lambda q_, k_, v_: seqpar_ring.ring_attention(
            q_, k_, v_, group, causal=True, layout=layout, window=w, doc_ids=doc),
            q, k, v, dout, p, me, layout)
        ctx = f"window sp={p} {layout} W={w} docs={docs}"
        worst[ctx] = compare(got, want, ctx, shard(free, p, me, layout))
    return worst


def _ulysses_cases(world: int, u: int) -> dict:
    """Ulysses u x ring world/u: K/V heads not a multiple of u (replicated), packed rows."""
    from seqpar_ring.ulysses import ulysses_ring_attention

    groups = G.initialize(world, ulysses_size=u)
    worst, seq, me = {}, SEQ, groups.sp_rank
    heads = [(8, 1), (6, 3)] if u == 2 else [(12, 6), (8, 2)]
    rng = random.Random(70 + u)
    try:
        for (h, hkv), causal, docs in itertools.product(heads, (True, False), (False, True)):
            q, k, v, dout = inputs(60 + h + causal + 2 * docs, 2, seq, h, hkv, D)
            ids = torch.stack([ids_of(random_lengths(rng, seq)) for _ in range(2)]) \
                if docs else None
            free = unspecified(ids, causal) if docs else torch.zeros(2, seq, dtype=torch.bool)
            dout = dout.masked_fill(free.to(dev())[:, :, None, None], 0.0)
            want = shards_of(doc_reference(q, k, v, dout, ids, causal), world, me, "zigzag", u)
            doc = None if ids is None else shard(ids, world, me, "zigzag", ulysses_size=u) \
                .to(dev()).contiguous()
            got = run_sharded(lambda q_, k_, v_: ulysses_ring_attention(
                q_, k_, v_, groups, causal=causal, layout="zigzag", doc_ids=doc),
                q, k, v, dout, world, me, "zigzag", u)
            ctx = f"ulysses {u}x{world // u} heads={h}/{hkv} causal={causal} docs={docs}"
            worst[ctx] = compare(got, want, ctx, shard(free, world, me, "zigzag",
                                                       ulysses_size=u))
        q = torch.zeros(1, seq // world, u + 1, D, device=dev(), dtype=torch.bfloat16)
        with pytest.raises(ValueError, match="does not divide the number of query heads"):
            ulysses_ring_attention(q, q, q, groups)  # query heads not a multiple of u
    finally:
        G.destroy()
    return worst


def _worker(rank: int, world: int, what: tuple, smoke: dict | None = None) -> dict:
    if smoke:  # CPU smoke run of this suite's plumbing (tiny sizes, torch kernel)
        import _gpu

        _gpu.DEV = "cpu"
        globals().update(smoke)
    cuda_worker_env()
    group, worst = dist.group.WORLD, {}
    if "ring" in what:
        worst.update(_ring_cases(world, rank, group))
    if "docs" in what:
        worst.update(_doc_cases(world, rank, group, FUZZ_PER_WORLD, seed=world))
    if "dilated" in what:
        worst.update(_dilated_cases(world, rank, group))
    if "window" in what:
        worst.update(_window_cases(world, rank, group))
    if "ulysses" in what:
        worst.update(_ulysses_cases(world, 2))
        worst.update(_ulysses_cases(world, 4))
    if dev() == "cuda":
        torch.cuda.synchronize()
    return worst


def _report(name: str, results: list[dict]) -> None:
    merged = {}
    for r in results:
        for k, v in r.items():
            merged[k] = max(v, merged.get(k, 0.0))
    groups = {}
    for k, v in merged.items():
        g = k.split(" #")[0].split(" ")[0] + " " + k.split(" ")[1]
        groups[g] = max(v, groups.get(g, 0.0))
    for g, v in sorted(groups.items()):
        print(f"GPU-ERR {name} {g}: largest error {v:.3f} of the bound")
    assert merged, "no case ran"


@pytest.mark.parametrize("world, what", [
    (2, ("ring", "docs", "dilated", "window")),
    (3, ("ring",)),
    (4, ("ring", "docs", "dilated", "window", "ulysses")),
])
def test_multirank_shared_gpu(world, what):
    results = run_distributed(_worker, world, what, timeout=TIMEOUT_S)
    _report(f"world={world}", results)
