"""Host staging (`seqpar_ring.stage`): the path ranks sharing one GPU take, run on CPU.

On a gloo group CUDA tensors go through host buffers in the transport. CPU CI has no CUDA, so
``stage.forced()`` sends CPU tensors through the same staged code (host copies, the gloo op on
separate buffers, copies back). In one spawned group of 4 ranks every collective of the
product — ring exchange, K/V all-gather and dK/dV reduce-scatter, the windowed peer exchange,
the dilated re-deal, the Ulysses all-to-all and id all-gather, the documents' id gather, the
loss all-reduce, `sync_sp_gradients`' all-reduces, the agreement — runs staged and unstaged,
and the results must be bitwise equal. A group whose backend cannot carry the tensors (NCCL
with CPU tensors, simulated) raises on every rank at once, naming the fix.
"""

from __future__ import annotations

import itertools
import time

import pytest
import torch
import torch.distributed as dist
from _dist import run_distributed
from _exact import make_inputs

from seqpar_ring import dilated_attention, ring_attention, sp_cross_entropy, stage
from seqpar_ring import groups as G
from seqpar_ring.agreement import AgreementError
from seqpar_ring.comm import comm_stats
from seqpar_ring.layout import gather, shard

TIMEOUT_S = 240.0
SEQ, H, HKV, D = 32, 4, 2, 8


def _ids() -> torch.Tensor:
    """Two different rows: a 1-token document, padding left / middle / right."""
    row0 = [-1] * 2 + [0] * 9 + [1] + [2] * 13 + [-1] * 3 + [3] * 4
    row1 = [5] * 1 + [6] * 20 + [7] * 2 + [8] * 6 + [-1] * 3
    return torch.tensor([row0, row1])


def _fwd_bwd(fn, data, p, me, layout, u=1):
    def local(t):
        return shard(t.double(), p, me, layout, ulysses_size=u).contiguous()

    q, k, v = (local(data[n]).requires_grad_(True) for n in "qkv")
    out = fn(q, k, v)
    out.backward(local(data["dout"]))
    return [out.detach(), q.grad, k.grad, v.grad]


def _cases(rank: int, world: int, groups) -> list[list[torch.Tensor]]:
    """Every feature's outputs and gradients on this rank (same calls staged or not)."""
    group, results = dist.group.WORLD, []
    ids = _ids()
    for (layout, comm, causal), docs in itertools.product(
            itertools.product(("contiguous", "zigzag"), ("ring", "allgather"), (True, False)),
            (False, True)):
        data = make_inputs(int(causal) + 2 * docs, 2, SEQ, H, HKV, D)
        doc = shard(ids, world, rank, layout).contiguous() if docs else None
        results.append(_fwd_bwd(lambda q, k, v: ring_attention(
            q, k, v, group, causal=causal, layout=layout, comm=comm, kernel="torch",
            doc_ids=doc), data, world, rank, layout))
    data = make_inputs(7, 1, SEQ, H, HKV, D)  # dilated: segments spanning ranks (re-deal)
    results.append(_fwd_bwd(lambda q, k, v: dilated_attention(
        q, k, v, group, segment_lengths=[8, 16, 32], dilation_rates=[1, 2, 4], kernel="torch"),
        data, world, rank, "contiguous"))
    from seqpar_ring.ulysses import ulysses_ring_attention

    u = groups.ulysses_size
    sp_rank = groups.sp_rank
    for causal in (True, False):  # Ulysses 2 x ring 2: all-to-all, id all-gather, inner ring
        data = make_inputs(11 + causal, 2, SEQ, H, 1, D)  # 1 K/V head < u: replicated
        doc = shard(ids, world, sp_rank, "zigzag", ulysses_size=u).contiguous()
        results.append(_fwd_bwd(lambda q, k, v: ulysses_ring_attention(
            q, k, v, groups, causal=causal, layout="zigzag", kernel="torch", doc_ids=doc),
            data, world, sp_rank, "zigzag", u))
    for layout, w in itertools.product(("contiguous", "zigzag"), (5, 12)):  # windowed peers
        data = make_inputs(20 + w, 2, SEQ, H, HKV, D)
        doc = shard(ids, world, rank, layout).contiguous()
        sent, staged = comm_stats.bytes_sent, stage.stats.bytes_to_host
        results.append(_fwd_bwd(lambda q, k, v: ring_attention(
            q, k, v, group, causal=True, layout=layout, kernel="torch", window=w, doc_ids=doc),
            data, world, rank, layout))
        # every byte the peer exchange sent went through the stage when staging is on
        WINDOW_BYTES.append((comm_stats.bytes_sent - sent, stage.stats.bytes_to_host - staged))
    from seqpar_ring.integrations.hf_grads import _all_reduce_mean_over_dp

    params = [torch.nn.Parameter(torch.zeros(3, dtype=torch.float64)) for _ in range(3)]
    params[0].grad = torch.arange(3.0, dtype=torch.float64) * (rank + 1)
    if rank == 0:  # a gradient only one rank has: the others take part with zeros
        params[1].grad = torch.full((3,), 0.5, dtype=torch.float64)
    before = stage.stats.collectives
    _all_reduce_mean_over_dp(params, groups)  # sync_sp_gradients' all-reduces
    SYNC_STAGED.append(stage.stats.collectives - before)
    results.append([p.grad for p in params[:2]])
    logits = torch.randn(2, SEQ, 11, generator=torch.Generator().manual_seed(3),
                         dtype=torch.float64)
    labels = torch.randint(0, 11, (2, SEQ), generator=torch.Generator().manual_seed(4))
    labels[0, :5] = -100
    x = shard(logits, world, rank, "zigzag").contiguous().requires_grad_(True)
    loss = sp_cross_entropy(x, shard(labels, world, rank, "zigzag").contiguous(), group)
    loss.backward()
    results.append([loss.detach(), x.grad, gather(x.detach(), group, "zigzag")])
    return results


WINDOW_BYTES: list[tuple[int, int]] = []  # (bytes sent, bytes staged) of each windowed case
SYNC_STAGED: list[int] = []  # staged collectives of the gradient sync


def _staging_worker(rank: int, world: int) -> dict:
    groups = G.initialize(world, ulysses_size=2)
    try:
        stage.stats.reset()
        plain = _cases(rank, world, groups)
        unstaged = stage.stats.collectives
        WINDOW_BYTES.clear()
        SYNC_STAGED.clear()
        with stage.forced():
            staged = _cases(rank, world, groups)
        n_staged = stage.stats.collectives - unstaged
        for sent, to_host in WINDOW_BYTES:
            assert 0 < sent <= to_host, f"windowed exchange: {sent} B sent, {to_host} B staged"
        # the agreement, the presence all-reduce and one bucket's all-reduce
        assert SYNC_STAGED == [3], f"gradient sync staged {SYNC_STAGED} collectives"
        for i, (a, b) in enumerate(zip(plain, staged)):
            for j, (x, y) in enumerate(zip(a, b)):
                assert torch.equal(x, y), f"case {i} tensor {j}: staged != unstaged"
        # NCCL with CPU tensors (simulated): every rank raises at once, naming the fix.
        real = stage.backend_for
        stage.backend_for = lambda group, device_type: "nccl"
        t0 = time.monotonic()
        try:
            q = torch.zeros(1, 8, 2, 4)
            with pytest.raises(AgreementError, match=r"NCCL, which cannot carry CPU tensors.*"
                                                     r"model\.cuda\(\)"):
                ring_attention(q, q, q, dist.group.WORLD, kernel="torch")
        finally:
            stage.backend_for = real
        waited = time.monotonic() - t0
    finally:
        G.destroy()
    return {"cases": len(plain), "unstaged": unstaged, "staged": n_staged, "waited": waited}


def test_staged_collectives_equal_unstaged_and_carry_error_on_every_rank():
    results = run_distributed(_staging_worker, 4, timeout=TIMEOUT_S)
    for r in results:
        assert r["cases"] == 25
        assert r["unstaged"] == 0  # CPU tensors on gloo: nothing staged unless forced
        assert r["staged"] >= 100, r  # every collective of every case went through the stage
        assert r["waited"] < 30, r


def test_backend_for_device_maps(monkeypatch):
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "cpu:gloo,cuda:nccl")
    assert stage.backend_for(object(), "cuda") == "nccl"
    assert stage.backend_for(object(), "cpu") == "gloo"
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "gloo")
    assert stage.backend_for(object(), "cuda") == "gloo"
    cuda_like = torch.empty(0, device="meta")  # not CUDA: never staged unless forced
    assert not stage.needs_stage(object(), cuda_like)
    with stage.forced():
        assert stage.needs_stage(object(), cuda_like)
    assert stage.carry_error(None, torch.device("cpu")) is None


def test_bench_tables_say_ranks_share_a_gpu(monkeypatch, capsys):
    from seqpar_ring.tools.bench import common

    monkeypatch.setattr(common, "SHARED", {"ranks": 4, "gpus": 1})
    text = common.print_table([{"seq": 65536, "ms": 400.0, "step_s": 2.0, "kernel_ms": 77.0}],
                              ["seq", "ms", "step_s", "kernel_ms"], "ring")
    assert text.splitlines()[0].startswith("4 ranks share 1 GPU(s)")
    assert "not multi-GPU figures" in text and "ms/rank" in text and "step_s/rank" in text
    assert "100.0" in text and "0.500" in text  # 400 ms / 4 ranks, 2 s / 4 ranks
    assert "kernel_ms/rank" not in text and "77.0" in text  # one rank's own time already
    text = common.print_table([{"ref_ms": 40.0, "sp_ms": 80.0, "sp_kernel_ms": 30.0}],
                              ["ref_ms", "sp_ms", "sp_kernel_ms"], "packed", alone=("ref_ms",))
    assert "sp_ms/rank" in text and "20.0" in text  # 80 ms shared by 4 ranks
    assert "ref_ms/rank" not in text and "sp_kernel_ms/rank" not in text  # rank 0 alone; own
    assert common.kernel_ms(lambda: None, torch.device("cpu")) is None  # CUDA profiler only
    assert common.device_activities(lambda: None, torch.device("cpu")) is None
    monkeypatch.setattr(common, "SHARED", {})
    assert "share" not in common.print_table([{"ms": 1.0}], ["ms"], "t")


def test_kernel_breakdown_groups_by_name():
    from seqpar_ring.tools.bench import common

    acts = [("cudnn_fwd", 6_000_000), ("flip", 1_000_000), ("cudnn_fwd", 2_000_000),
            ("Memcpy DtoD", 500_000), ("lerp", 500_000)]
    rows = common.kernel_breakdown(acts, top=2)
    assert [r["kernel"] for r in rows] == ["cudnn_fwd", "flip", "(2 others)"]
    assert rows[0]["calls"] == 2 and rows[0]["ms"] == 8.0 and rows[0]["share"] == 0.8
    assert rows[2]["calls"] == 2 and rows[2]["ms"] == 1.0
    assert sum(r["share"] for r in rows) == pytest.approx(1.0)
