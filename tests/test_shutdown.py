"""End of a run: `seqpar_ring.shutdown` and the benchmarks' rank-alone timing.

* ``shutdown()`` waits for every rank with gloo's ``monitored_barrier`` (never gloo's
  ``barrier``, whose queued work can be freed by gloo's thread while the interpreter exits and
  abort the process), then frees the SP groups and the default group; ``wait=False`` (error
  paths) issues no collective at all.
* ``timeit(aligned=False)`` issues no barrier: rank 0 times a one-GPU reference row while its
  peer already waits at the row's end; a barrier per iteration there paired with the peer's
  next collective and hung `bench packed` with ranks sharing a GPU.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from _dist import run_distributed

import seqpar_ring
from seqpar_ring import groups as G

TIMEOUT_S = 90.0


def _no_barrier(*args, **kwargs):
    raise AssertionError("dist.barrier called")


def _end_worker(rank: int, world: int) -> dict:
    from seqpar_ring.tools.bench.common import timeit

    calls = []
    if rank == 0:  # alone: three timed runs, no collective; rank 1 is already at the barrier
        t = timeit(lambda: calls.append(1), torch.device("cpu"), warmup=1, iters=3,
                   aligned=False)
        assert t >= 0 and len(calls) == 4
    dist.barrier()
    # aligned (the default): one barrier per timed run on every rank of the world
    t = timeit(lambda: calls.append(2), torch.device("cpu"), warmup=0, iters=2)
    G.initialize(world)
    x = torch.ones(4)
    dist.all_reduce(x)  # the last collective of a training loop: a Python-owned tensor
    real, dist.barrier = dist.barrier, _no_barrier  # gloo's barrier must not be used
    try:
        seqpar_ring.shutdown(timeout_s=30)
    finally:
        dist.barrier = real
    return {"sum": x[0].item(), "initialized": dist.is_initialized(),
            "groups_freed": G._DEFAULT is None}


def _no_wait_worker(rank: int, world: int) -> bool:
    G.initialize(world)
    real = dist.barrier, dist.monitored_barrier
    dist.barrier = dist.monitored_barrier = _no_barrier
    try:
        seqpar_ring.shutdown(wait=False)  # an error path: a peer may never arrive
    finally:
        dist.barrier, dist.monitored_barrier = real
    return dist.is_initialized() or G._DEFAULT is not None


def test_shutdown_and_rank_alone_timing():
    for r in run_distributed(_end_worker, 2, timeout=TIMEOUT_S):
        assert r == {"sum": 2.0, "initialized": False, "groups_freed": True}
    assert run_distributed(_no_wait_worker, 2, timeout=TIMEOUT_S) == [False, False]
