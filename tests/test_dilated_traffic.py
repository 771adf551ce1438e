"""Ring traffic of dilated attention: a dilation rate r sends ~1/r of dense ring_attention's bytes.

API assumed: ``seqpar_ring.comm.comm_stats`` with ``reset()`` and ``bytes_sent`` (int, the bytes
this rank sent through the ring).
"""

from __future__ import annotations

import itertools

import torch
import torch.distributed as dist
from _dist import run_distributed
from _exact import make_inputs, sharded_fwd_bwd

import seqpar_ring

BATCH, HEAD_DIM = 2, 8
LAYOUTS = ("contiguous", "zigzag")
TIMEOUT_S = 240.0


def _dilated(q, k, v, group, schedule, **kw):
    segs, rates = schedule[-2:]
    return seqpar_ring.dilated_attention(
        q, k, v, group, segment_lengths=list(segs), dilation_rates=list(rates), kernel="torch", **kw
    )


TRAFFIC_SEQ, TRAFFIC_RATE = 64, 4  # chunks of 16 (contiguous) and 8 (zigzag) at p = 4


def _bytes_sent(call, data, p, rank, layout, backward) -> int:
    from seqpar_ring.comm import comm_stats

    comm_stats.reset()
    sharded_fwd_bwd(call, data, p, rank, layout, torch.float32, backward=backward)
    return int(comm_stats.bytes_sent)


def _traffic_worker(rank: int, world: int) -> dict:
    group = dist.group.WORLD
    data = make_inputs(3000, BATCH, TRAFFIC_SEQ, 4, 4, HEAD_DIM)
    sparse = ("sparse", (TRAFFIC_SEQ,), (TRAFFIC_RATE,))
    report = {}
    for layout, backward in itertools.product(LAYOUTS, (False, True)):
        try:
            dilated_bytes = _bytes_sent(
                lambda q, k, v: _dilated(q, k, v, group, sparse, causal=False, layout=layout),
                data,
                world,
                rank,
                layout,
                backward,
            )
        except ValueError as err:  # a layout refused as a whole is tested elsewhere
            if layout == "zigzag" and ("zigzag" in str(err) or "layout" in str(err)):
                continue
            raise
        dense_bytes = _bytes_sent(
            lambda q, k, v: seqpar_ring.ring_attention(
                q, k, v, group, causal=False, layout=layout, comm="ring", kernel="torch"
            ),
            data,
            world,
            rank,
            layout,
            backward,
        )
        # segments that lie inside one rank's chunk never touch the network (DESIGN.md)
        chunk = TRAFFIC_SEQ // (world * (2 if layout == "zigzag" else 1))
        local = ("local", (chunk,), (1,))
        local_bytes = _bytes_sent(
            lambda q, k, v: _dilated(q, k, v, group, local, causal=True, layout=layout),
            data,
            world,
            rank,
            layout,
            backward,
        )
        report[(layout, backward)] = (dense_bytes, dilated_bytes, local_bytes)
    return report


def test_dilated_traffic_is_dense_over_rate():
    """API assumed: seqpar_ring.comm.comm_stats with reset() and bytes_sent (this rank's bytes)."""
    world = 4
    for rank, report in enumerate(run_distributed(_traffic_worker, world, timeout=TIMEOUT_S)):
        assert ("contiguous", True) in report, f"rank {rank}: no traffic measured: {report}"
        for (layout, backward), (dense, dilated, local) in report.items():
            ctx = f"rank {rank} layout={layout} {'fwd+bwd' if backward else 'fwd'}"
            assert dense > 0, f"{ctx}: dense ring_attention reported no bytes sent"
            ratio = dilated * TRAFFIC_RATE / dense
            assert abs(ratio - 1) <= 0.1, (
                f"{ctx}: dilated (r={TRAFFIC_RATE}) sent {dilated} B, dense sent {dense} B: "
                f"dilated * r / dense = {ratio:.3f}, expected 1 +- 0.1"
            )
            assert local == 0, f"{ctx}: rank-local segments sent {local} B, expected 0"
