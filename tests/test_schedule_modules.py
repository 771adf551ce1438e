"""Block schedule (work balance, coalescing), the nn.Module drop-in, and call-mismatch errors."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from _dist import run_distributed
from seqpar_ring import SeqParConfig
from seqpar_ring.layout import chunk_ranges, shard, unshard
from seqpar_ring.modules import RingDilatedMultiheadAttention, reference_forward
from seqpar_ring.schedule import plan_blocks


def _work(seq: int, p: int, rank: int, layout: str, causal: bool) -> int:
    """Visible (query, key) pairs this rank computes over a whole ring pass."""
    total = 0
    for origin in range(p):
        for call in plan_blocks(chunk_ranges(seq, p, rank, layout),
                                chunk_ranges(seq, p, origin, layout), causal):
            nq, nk = call.q.stop - call.q.start, call.k.stop - call.k.start
            total += nq * (nq + 1) // 2 if call.causal else nq * nk
    return total


@pytest.mark.parametrize("p", [1, 2, 3, 4, 8])
def test_zigzag_balances_causal_work(p):
    seq = 16 * 2 * p
    work = [_work(seq, p, r, "zigzag", True) for r in range(p)]
    assert len(set(work)) == 1, f"zigzag work per rank differs: {work}"
    assert sum(work) == seq * (seq + 1) // 2  # every causal pair exactly once
    contiguous = [_work(seq, p, r, "contiguous", True) for r in range(p)]
    assert sum(contiguous) == sum(work)
    n = seq // p  # the imbalance zigzag removes: the last contiguous rank sees every earlier block
    assert contiguous[0] == n * (n + 1) // 2
    assert contiguous[-1] == (p - 1) * n * n + n * (n + 1) // 2


@pytest.mark.parametrize("size", [2, 3, 4, 8])
def test_dilated_sub_ring_zigzag_balances_causal_work(size):
    from seqpar_ring.dilated import _Zigzag

    rows, start = 16, 5 * 16 * size  # a sub-ring somewhere inside the sequence
    work = []
    for me in range(size):
        z = _Zigzag(None, 0, size, me, rows, 1.0)
        total = 0
        for origin in range(size):
            for call in plan_blocks(z.chunks_of(me, start), z.chunks_of(origin, start), True,
                                    window=size * rows):
                nq, nk = call.q.stop - call.q.start, call.k.stop - call.k.start
                total += nq * (nq + 1) // 2 if call.causal else nq * nk
        work.append(total)
    n = size * rows
    assert len(set(work)) == 1 and sum(work) == n * (n + 1) // 2, work


def test_non_causal_pass_is_one_call_per_block():
    for p in (2, 3):
        for layout in ("contiguous", "zigzag"):
            mine = chunk_ranges(48, p, 0, layout)
            for origin in range(p):
                calls = plan_blocks(mine, chunk_ranges(48, p, origin, layout), causal=False)
                assert len(calls) == 1 and not calls[0].causal, (p, layout, calls)


def test_zigzag_coalesces_full_blocks():
    # rank 0 of 2 holds chunks 0 and 3; from rank 1 (chunks 1, 2) only chunk 3 sees both: 1 call
    calls = plan_blocks(chunk_ranges(32, 2, 0, "zigzag"), chunk_ranges(32, 2, 1, "zigzag"), True)
    assert [(c.q, c.k, c.causal) for c in calls] == [(slice(8, 16), slice(0, 16), False)]


def _module_body(rank, world, layout):
    torch.manual_seed(0)
    group = dist.group.WORLD
    for kv_heads in (4, 1):
        mha = RingDilatedMultiheadAttention(32, 4, kv_heads=kv_heads, dtype=torch.float64,
                                            config=SeqParConfig(sp_size=world, layout=layout),
                                            group=group)
        x = torch.randn(2, 48, 32, dtype=torch.float64, requires_grad=True)
        ref = reference_forward(mha, x)
        ref.sum().backward()
        ref_grads = {n: p.grad.clone() for n, p in mha.named_parameters()}
        mha.zero_grad()
        x_local = shard(x.detach(), world, rank, layout).requires_grad_()
        out, weights = mha(x_local)
        assert weights is None
        torch.testing.assert_close(out, shard(ref, world, rank, layout), atol=1e-10, rtol=0)
        out.sum().backward()
        for n, p in mha.named_parameters():
            dist.all_reduce(p.grad, group=group)  # parameters are replicated across SP ranks
            torch.testing.assert_close(p.grad, ref_grads[n], atol=1e-10, rtol=0, msg=n)
        shards = [torch.empty_like(x_local.grad) for _ in range(world)]
        dist.all_gather(shards, x_local.grad.contiguous(), group=group)
        torch.testing.assert_close(unshard(shards, layout), x.grad, atol=1e-10, rtol=0)
        x.grad = None
    # ranks entering different operations are told so instead of hanging or mixing shapes
    q = torch.randn(1, 8, 2, 4)
    from seqpar_ring import dilated_attention, ring_attention
    with pytest.raises(ValueError, match="different operations"):
        if rank == 0:
            ring_attention(q, q, q, group, kernel="torch")
        else:
            dilated_attention(q, q, q, group, segment_lengths=[8], dilation_rates=[1],
                              kernel="torch")
    return True


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_multihead_module_matches_dense(layout):
    assert all(run_distributed(_module_body, 2, layout, timeout=180))
