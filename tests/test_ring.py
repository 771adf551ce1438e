"""Exactness of ring_attention on 1-4 gloo ranks against the full-sequence SDPA reference.

One spawn per world size runs every case in a loop (process start-up dominates on 2 cores).
Each case shards full q/k/v (same seed on all ranks) with seqpar_ring.layout.shard, runs
forward + backward and compares out, dq, dk, dv with the rank's rows of the reference.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.distributed as dist
from _dist import run_distributed
from _exact import (
    DENSE_TOL,
    assert_close,
    expect_error,
    make_inputs,
    reference_fwd_bwd,
    shard_expected,
    sharded_fwd_bwd,
    single_thread,
)
from reference import sdpa_reference, shard_reference

import seqpar_ring

BATCH, SEQ, HEAD_DIM = 2, 48, 8  # 48 is a multiple of p and 2p for p = 1..4
HEADS = [(4, 4), (8, 2), (4, 1)]  # MHA, GQA 4:1, MQA
LAYOUTS = ("contiguous", "zigzag")
COMMS = ("ring", "allgather")
DTYPES = (torch.float32, torch.float64)
BUCKETS = (16, 5)
TIMEOUT_S = 240.0
# results of different bucket sizes differ only by summation order (a few fp32 ulps)
BUCKET_TOL = {torch.float32: (2e-6, 2e-6), torch.float64: (1e-12, 1e-12)}


def _doc_ids() -> torch.Tensor:
    """Packed documents with padding (-1) at the end, in the middle and at the start."""
    row0 = [0] * 11 + [1] * 17 + [2] * 14 + [-1] * 6
    row1 = [-1] * 3 + [7] * 20 + [-1] * 2 + [8] * 23
    return torch.tensor([row0, row1])


def _doc_patterns() -> dict[str, torch.Tensor]:
    """Rows of SEQ tokens: rows that differ, equal-length documents (batched dense calls),
    right padding only (causal: the plain path), one document crossing every shard."""
    same = [0] * 6 + [1] * 6 + [2] * 6 + [3] * 6 + [4] * 10 + [5] * 14
    return {
        "mixed": _doc_ids(),
        "equal": torch.tensor([same, same]),
        "right_padded": torch.tensor([[0] * 40 + [-1] * 8, [0] * SEQ]),
        "long_doc": torch.tensor([[0] * 5 + [1] * 40 + [2] * 3, [0] * 30 + [1] * 18]),
    }


def _loss_free(doc_ids: torch.Tensor, causal: bool) -> torch.Tensor:
    """Rows whose output is unspecified: under causal, a row's trailing padding (it joins the
    last document, invisible to every real token, and carries no loss)."""
    if not causal:
        return torch.zeros_like(doc_ids, dtype=torch.bool)
    real = (doc_ids >= 0).long()
    after_last = real.flip(1).cumsum(1).flip(1) == 0  # no real token at or after this one
    return after_last & (doc_ids < 0)


def _doc_reference(doc_ids, causal, data):
    """Reference out/grads with dout = 0 on loss-free rows (as in training), and their mask."""
    free = _loss_free(doc_ids, causal)
    data = dict(data, dout=data["dout"].masked_fill(free[:, :, None, None], 0.0))
    ref = reference_fwd_bwd(lambda q, k, v: sdpa_reference(q, k, v, causal, doc_ids=doc_ids), data)
    return data, ref, free


def _check_docs(got, want, free_local, pad_local, tol, ctx, dtype=None) -> None:
    """out is compared where specified; every gradient everywhere; other padding rows are 0."""
    got = [got[0].masked_fill(free_local[:, :, None, None], 0.0), *got[1:]]
    want = [want[0].masked_fill(free_local[:, :, None, None], 0.0), *want[1:]]
    assert_close(got, want, [tol], ctx, dtype)
    zero = pad_local & ~free_local
    if zero.any():
        # padding queries that see no key: exactly 0 (not NaN, not an average)
        assert (got[0][zero] == 0).all(), f"{ctx}: fully masked rows are not 0"
        assert (got[1][zero] == 0).all(), f"{ctx}: dq of fully masked rows is not 0"


def _ring(q, k, v, group, **kw):
    return seqpar_ring.ring_attention(q, k, v, group, kernel="torch", **kw)


def _check_layout_shard(p: int, rank: int) -> None:
    from seqpar_ring.layout import shard

    x = torch.arange(SEQ)[None, :, None]
    for layout in LAYOUTS:
        got, want = shard(x, p, rank, layout, dim=1), shard_reference(x, p, rank, layout)
        assert torch.equal(got, want), (
            f"layout.shard(p={p}, rank={rank}, {layout}) gives positions {got.flatten().tolist()}, "
            f"expected {want.flatten().tolist()}"
        )


def _dense_cases(p: int, rank: int, group, sp_rank: int, seed_base: int = 0) -> int:
    """Every causal x heads x layout x comm x dtype combination; returns the number checked."""
    n = 0
    for (ci, causal), (hi, (h, hkv)) in itertools.product(
        enumerate((True, False)), enumerate(HEADS)
    ):
        data = make_inputs(seed_base + 10 * ci + hi, BATCH, SEQ, h, hkv, HEAD_DIM)
        ref = reference_fwd_bwd(lambda q, k, v: sdpa_reference(q, k, v, causal), data)
        for layout, comm, dtype in itertools.product(LAYOUTS, COMMS, DTYPES):
            ctx = (
                f"ring_attention p={p} rank={rank} sp_rank={sp_rank} causal={causal} "
                f"H={h} Hkv={hkv} layout={layout} comm={comm} dtype={dtype}"
            )
            got = sharded_fwd_bwd(
                lambda q, k, v: _ring(q, k, v, group, causal=causal, layout=layout, comm=comm),
                data,
                p,
                sp_rank,
                layout,
                dtype,
            )
            want = shard_expected(ref, p, sp_rank, layout)
            assert_close(got, want, [DENSE_TOL[dtype]], ctx, dtype=dtype)
            n += 1
    return n


def _bucket_and_scale_cases(p: int, rank: int, group) -> int:
    n = 0
    h, hkv = 8, 2
    for causal, layout, comm, dtype in itertools.product((True, False), LAYOUTS, COMMS, DTYPES):
        data = make_inputs(100 + causal, BATCH, SEQ, h, hkv, HEAD_DIM)
        ref = reference_fwd_bwd(lambda q, k, v: sdpa_reference(q, k, v, causal), data)
        want = shard_expected(ref, p, rank, layout)
        runs = {}
        for bucket in (None,) + BUCKETS:
            ctx = (
                f"ring_attention p={p} rank={rank} bucket_size={bucket} causal={causal} "
                f"layout={layout} comm={comm} dtype={dtype}"
            )
            runs[bucket] = sharded_fwd_bwd(
                lambda q, k, v: _ring(
                    q, k, v, group, causal=causal, layout=layout, comm=comm, bucket_size=bucket
                ),
                data,
                p,
                rank,
                layout,
                dtype,
            )
            assert_close(runs[bucket], want, [DENSE_TOL[dtype]], ctx, dtype=dtype)
            if bucket is not None:
                same = BUCKET_TOL[dtype]
                assert_close(runs[bucket], runs[None], [same], ctx + " vs bucket_size=None")
            n += 1
    # a non-default softmax scale
    for causal, layout in itertools.product((True, False), LAYOUTS):
        data = make_inputs(200 + causal, BATCH, SEQ, h, hkv, HEAD_DIM)
        ref = reference_fwd_bwd(lambda q, k, v: sdpa_reference(q, k, v, causal, scale=0.3), data)
        for comm in COMMS:
            ctx = (
                f"ring_attention p={p} rank={rank} scale=0.3 causal={causal} layout={layout} {comm}"
            )
            got = sharded_fwd_bwd(
                lambda q, k, v: _ring(
                    q,
                    k,
                    v,
                    group,
                    causal=causal,
                    layout=layout,
                    comm=comm,
                    scale=0.3,
                    bucket_size=5,
                ),
                data,
                p,
                rank,
                layout,
                torch.float64,
            )
            assert_close(got, shard_expected(ref, p, rank, layout), [DENSE_TOL[torch.float64]], ctx)
            n += 1
    return n


def _doc_id_cases(p: int, rank: int, group) -> int:
    """Packed documents and padding: every pattern, layout and comm, with dense calls, batched
    (segmented) dense calls and varlen calls (``DENSE_MIN_TOKENS`` chooses which runs are dense)."""
    from seqpar_ring import documents
    from seqpar_ring.layout import shard

    n = 0
    h, hkv = 8, 2
    # (dtype, bucket_size, min_dense): varlen only, dense only, and a mix of both
    variants = [(torch.float32, None, 10**9), (torch.float64, 5, 1), (torch.float64, None, 6)]
    default = documents.DENSE_MIN_TOKENS
    try:
        for (name, doc_ids), causal in itertools.product(_doc_patterns().items(), (True, False)):
            data, ref, free = _doc_reference(
                doc_ids, causal, make_inputs(300 + causal + 2 * n, BATCH, SEQ, h, hkv, HEAD_DIM))
            for layout, comm, (dtype, bucket, min_dense) in itertools.product(
                    LAYOUTS, COMMS, variants):
                documents.DENSE_MIN_TOKENS = min_dense
                ids_local = shard(doc_ids, p, rank, layout, dim=1).contiguous()
                ctx = (f"ring_attention doc_ids={name} p={p} rank={rank} causal={causal} "
                       f"layout={layout} comm={comm} dtype={dtype} bucket_size={bucket} "
                       f"min_dense={min_dense}")
                got = sharded_fwd_bwd(
                    lambda q, k, v: _ring(q, k, v, group, causal=causal, layout=layout,
                                          comm=comm, doc_ids=ids_local, bucket_size=bucket),
                    data, p, rank, layout, dtype)
                assert torch.equal(ids_local, shard(doc_ids, p, rank, layout, dim=1)), (
                    f"{ctx}: ring_attention modified the caller's doc_ids tensor in place"
                )
                _check_docs(got, shard_expected(ref, p, rank, layout),
                            shard(free, p, rank, layout, dim=1), ids_local < 0,
                            DENSE_TOL[dtype], ctx, dtype)
                n += 1
    finally:
        documents.DENSE_MIN_TOKENS = default
    return n


def _subgroup_cases(rank: int, world: int) -> int:
    """sp_size 2 < world 4: rings over group ranks, not global ranks."""
    n = 0
    for partition in ([[0, 1], [2, 3]], [[0, 2], [1, 3]]):
        groups = [dist.new_group(ranks) for ranks in partition]  # every rank creates every group
        gi = next(i for i, ranks in enumerate(partition) if rank in ranks)
        group, sp_rank, p = groups[gi], partition[gi].index(rank), len(partition[gi])
        assert dist.get_rank(group) == sp_rank
        for causal, layout, comm in itertools.product((True, False), LAYOUTS, COMMS):
            data = make_inputs(
                400 + 7 * gi + causal, BATCH, SEQ, 8, 2, HEAD_DIM
            )  # differs per group
            ref = reference_fwd_bwd(lambda q, k, v: sdpa_reference(q, k, v, causal), data)
            ctx = (
                f"ring_attention subgroup {partition[gi]} of {partition} global rank={rank} "
                f"sp_rank={sp_rank} causal={causal} layout={layout} comm={comm}"
            )
            got = sharded_fwd_bwd(
                lambda q, k, v: _ring(q, k, v, group, causal=causal, layout=layout, comm=comm),
                data,
                p,
                sp_rank,
                layout,
                torch.float64,
            )
            assert_close(
                got, shard_expected(ref, p, sp_rank, layout), [DENSE_TOL[torch.float64]], ctx
            )
            n += 1
    return n


def _mismatch_cases(rank: int, world: int, group) -> list[str]:
    """A rank whose shapes disagree must make EVERY rank raise (not hang, not compute garbage)."""
    messages = []
    s_local = SEQ // world
    normal = {"seq": s_local, "heads": 4, "kv_heads": 4, "head_dim": HEAD_DIM}
    odd_values = {"seq": s_local - 2, "kv_heads": 2, "head_dim": 2 * HEAD_DIM}
    for what, odd in odd_values.items():
        for comm in COMMS:
            shape = dict(normal, **({what: odd} if rank == 1 else {}))
            q = torch.randn(BATCH, shape["seq"], shape["heads"], shape["head_dim"])
            k = torch.randn(BATCH, shape["seq"], shape["kv_heads"], shape["head_dim"])
            v = torch.randn_like(k)
            ctx = f"{what}={odd} on rank 1 only, comm={comm}, p={world}, rank={rank}"
            messages.append(
                expect_error(lambda: _ring(q, k, v, group, causal=True, comm=comm), ctx)
            )
    return messages


def _ring_worker(rank: int, world: int) -> dict:
    torch.manual_seed(1234 + rank)  # anything unseeded would differ per rank on purpose
    group = dist.group.WORLD
    _check_layout_shard(world, rank)
    counts = {
        "dense": _dense_cases(world, rank, group, rank),
        "bucket_scale": _bucket_and_scale_cases(world, rank, group),
        "doc_ids": _doc_id_cases(world, rank, group),
    }
    if world == 4:
        counts["subgroup"] = _subgroup_cases(rank, world)
    if world > 1:
        counts["mismatch_messages"] = _mismatch_cases(rank, world, group)
        dist.barrier()  # every rank left the failed calls: nothing is stuck in a collective
    return counts


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_ring_attention_exact(world):
    results = run_distributed(_ring_worker, world, timeout=TIMEOUT_S)
    for rank, res in enumerate(results):
        assert res["dense"] == 2 * len(HEADS) * len(LAYOUTS) * len(COMMS) * len(DTYPES), res
        assert res["doc_ids"] > 0 and res["bucket_scale"] > 0
        if world > 1:
            assert len(res["mismatch_messages"]) == 6, f"rank {rank}: {res['mismatch_messages']}"


@pytest.mark.parametrize("causal", [True, False])
def test_ring_attention_without_process_group(causal):
    """group=None (no torch.distributed at all): plain local attention."""
    with single_thread():
        _without_process_group(causal)


def _without_process_group(causal: bool) -> None:
    for (h, hkv), layout, comm, dtype, bucket in itertools.product(
        HEADS, LAYOUTS, COMMS, DTYPES, (None, 5)
    ):
        data = make_inputs(500 + h + hkv, BATCH, SEQ, h, hkv, HEAD_DIM)
        ref = reference_fwd_bwd(lambda q, k, v: sdpa_reference(q, k, v, causal), data)
        ctx = (
            f"ring_attention group=None causal={causal} H={h} Hkv={hkv} layout={layout} "
            f"comm={comm} dtype={dtype} bucket={bucket}"
        )
        got = sharded_fwd_bwd(
            lambda q, k, v: _ring(
                q, k, v, None, causal=causal, layout=layout, comm=comm, bucket_size=bucket
            ),
            data,
            1,
            0,
            layout,
            dtype,
        )
        assert_close(got, shard_expected(ref, 1, 0, layout), [DENSE_TOL[dtype]], ctx, dtype)
    doc_ids = _doc_ids()
    data, ref, free = _doc_reference(doc_ids, causal, make_inputs(600, BATCH, SEQ, 8, 2, HEAD_DIM))
    got = sharded_fwd_bwd(
        lambda q, k, v: _ring(q, k, v, None, causal=causal, doc_ids=doc_ids),
        data,
        1,
        0,
        "contiguous",
        torch.float64,
    )
    _check_docs(got, shard_expected(ref, 1, 0, "contiguous"), free, doc_ids < 0,
                DENSE_TOL[torch.float64], f"ring_attention group=None doc_ids causal={causal}")
