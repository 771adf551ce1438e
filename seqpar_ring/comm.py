"""Transport for the ring: neighbour exchange, K/V all-gather, bounded waits.

Nothing here knows about attention. ``RingComm`` sends a list of tensors to the next member of
a ring and receives same-shaped tensors from the previous one with ``batch_isend_irecv``; the
caller posts the exchange, computes, then waits — that is the compute/communication overlap.
Every wait has a timeout so a peer that never arrives fails the job instead of hanging it.

Agreement of shapes and settings before any traffic lives in `seqpar_ring.agreement`.
``comm_stats`` counts the bytes this process sent through the ring (a test proves dilated mode
sends ~1/r of dense mode's bytes with it). To trace every send/recv, set
``logging.getLogger("seqpar_ring.comm").setLevel(logging.DEBUG)``.

Every function here takes CUDA tensors on a gloo group too (ranks that share one GPU): they are
staged through pinned host buffers (`seqpar_ring.stage`), invisibly to the caller.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta
from typing import Sequence

import torch
import torch.distributed as dist

from . import stage

log = logging.getLogger("seqpar_ring.comm")

DEFAULT_TIMEOUT_S = 600.0

# torch 2.13 renamed the single-tensor collectives; 2.11 only has the old names.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


@dataclass
class CommStats:
    """Bytes and messages this process sent through ``RingComm`` and ``all_gather_kv``."""

    bytes_sent: int = 0
    messages: int = 0

    def reset(self) -> None:
        self.bytes_sent = 0
        self.messages = 0


comm_stats = CommStats()


def group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


class RingComm:
    """Exchange with ring neighbours inside ``group``.

    ``members`` (group ranks, default all of them in order) lets a sub-ring run inside the group —
    dilated attention uses that so segments that span only some ranks never reach the others.
    """

    def __init__(self, group, members: Sequence[int] | None = None,
                 timeout_s: float = DEFAULT_TIMEOUT_S):
        self.group = group
        me = dist.get_rank(group)
        members = list(range(dist.get_world_size(group))) if members is None else list(members)
        idx = members.index(me)
        self.size = len(members)
        self.index = idx
        self.next = dist.get_global_rank(group, members[(idx + 1) % self.size])
        self.prev = dist.get_global_rank(group, members[(idx - 1) % self.size])
        self.timeout = timedelta(seconds=timeout_s)

    def post(self, send: Sequence[torch.Tensor], recv: Sequence[torch.Tensor], tag: int = 0):
        """Start sending ``send`` to the next member and receiving ``recv`` from the previous.

        ``recv`` holds the data only after `wait`; ``send`` may be reused once this returns
        when staged (it was copied to the host), after `wait` otherwise.
        """
        staged = bool(send) and stage.needs_stage(self.group, send[0])
        wire_send, wire_recv = list(send), list(recv)
        if staged:  # D2H, wait for the copies, then gloo sends/receives host memory
            wire_send = [stage.to_host(s) for s in send]
            wire_recv = [stage.host_like(r) for r in recv]
            stage.ready(*send)
        ops = []
        for i, (s, r) in enumerate(zip(send, recv)):
            ops.append(dist.P2POp(dist.isend, wire_send[i], self.next, self.group, tag + i))
            ops.append(dist.P2POp(dist.irecv, wire_recv[i], self.prev, self.group, tag + i))
            comm_stats.bytes_sent += s.numel() * s.element_size()
            comm_stats.messages += 1
            if log.isEnabledFor(logging.DEBUG):
                log.debug("send %s %s -> %d, recv <- %d", tuple(s.shape), s.dtype, self.next,
                          self.prev)
        works = dist.batch_isend_irecv(ops)
        if staged:  # the host buffers live until wait() copies what arrived back
            return _Staged(works, list(zip(recv, wire_recv)), wire_send)
        return works

    def wait(self, works) -> None:
        what = (f"ring exchange (send to rank {self.next}, receive from rank {self.prev}) — "
                "a peer that stopped before this step (an error, a skipped backward) never sends")
        _wait_all(works, self.timeout.total_seconds(), what, self.group)


class _Staged(list):
    """Works of a staged exchange, with the (device buffer, host buffer) pairs to fill on wait
    and the host copies being sent (kept alive until the sends complete)."""

    def __init__(self, works, pairs, keep):
        super().__init__(works or ())
        self.pairs, self.keep = pairs, keep


def _wait_all(works, timeout_s: float, what: str, group) -> None:
    """Wait for every work (bounded); a staged exchange then copies its receives to the device."""
    for w in works or ():
        wait(w, timeout_s, what, group)
    if isinstance(works, _Staged):
        for dst, host in works.pairs:
            stage.back(dst, host)


def _is_nccl(group) -> bool:
    return "nccl" in str(dist.get_backend(group))


def wait(work, timeout_s: float, what: str, group) -> None:
    """Wait for ``work`` at most ``timeout_s``; a peer that never arrives raises OUR error.

    On NCCL the wait is stream-ordered (the CPU goes on queueing kernels — a timed wait there
    would block the host on every exchange) and the process group's own timeout (its watchdog)
    ends a stuck collective. On gloo the wait itself is bounded.
    """
    if _is_nccl(group):
        work.wait()
        return
    cause = None
    try:
        done = work.wait(timeout=timedelta(seconds=timeout_s)) is not False
    except TypeError:  # a backend whose Work.wait takes no timeout: the group's own timeout
        done = work.wait() is not False
    except RuntimeError as err:  # gloo raises on timeout and when a peer's connection drops
        done, cause = False, err
    if not done:
        ranks = dist.get_process_group_ranks(group)
        if cause is not None and "timed out" not in str(cause).lower():
            happened = "failed: a peer closed its connection (it crashed or exited)"
        else:
            happened = f"did not complete within {timeout_s:.0f}s: a peer is stuck, crashed or " \
                "running other code"
        raise RuntimeError(
            f"seqpar_ring: {what} over ranks {ranks} {happened} (rank {dist.get_rank()}). "
            "Check the other ranks' errors first; raise SeqParConfig.comm_timeout_s only if "
            "steps are legitimately this slow" + (f" [{cause}]" if cause is not None else "")
        ) from cause


def post_exchange(group, sends, recvs) -> list:
    """Post a point-to-point exchange inside ``group``; finish it with `wait_exchange`.

    sends: [(tensor, dst_group_rank, tag)], recvs: [(buffer, src_group_rank, tag)]. Messages
    between one pair of ranks are matched in the order given (and by tag where supported), so
    both sides must list them in the same order. Staged through host buffers when the backend
    cannot carry the tensors' device (`seqpar_ring.stage`): the receive buffers are filled, and
    the sent tensors may be reused, only after `wait_exchange`.
    """
    for t, _, _ in sends:
        comm_stats.bytes_sent += t.numel() * t.element_size()
        comm_stats.messages += 1
    if not sends and not recvs:
        return _Staged([], [], [])
    first = (sends or recvs)[0][0]
    pairs = []
    if stage.needs_stage(group, first):  # host copies of the sends; receive into host buffers
        sends = [(stage.to_host(t), r, tag) for t, r, tag in sends]
        pairs = [(t, stage.host_like(t)) for t, _, _ in recvs]
        recvs = [(h, r, tag) for (_, h), (_, r, tag) in zip(pairs, recvs)]
        stage.ready(first)
    ops = [dist.P2POp(dist.isend, t, dist.get_global_rank(group, r), group, tag)
           for t, r, tag in sends]
    ops += [dist.P2POp(dist.irecv, t, dist.get_global_rank(group, r), group, tag)
            for t, r, tag in recvs]
    return _Staged(dist.batch_isend_irecv(ops), pairs, sends)


def wait_exchange(works, timeout_s: float, what: str, group) -> None:
    """Wait (bounded) for a `post_exchange`; staged receives then land in their buffers."""
    _wait_all(works, timeout_s, what, group)


def exchange(group, sends, recvs, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """`post_exchange` and wait for it."""
    works = post_exchange(group, sends, recvs)
    _wait_all(works, timeout_s, "point-to-point exchange (dilated sub-ring re-deal)", group)


def all_gather_kv(x: torch.Tensor, group, timeout_s: float = DEFAULT_TIMEOUT_S) -> torch.Tensor:
    """All-gather a contiguous tensor over ``group``: returns (p, *x.shape) in group-rank order."""
    p = dist.get_world_size(group)
    out = all_gather_flat(x, group, timeout_s, "K/V all-gather").view(p, *x.shape)
    comm_stats.bytes_sent += x.numel() * x.element_size() * (p - 1)
    comm_stats.messages += 1
    return out


def reduce_scatter_kv(x: torch.Tensor, group, timeout_s: float = DEFAULT_TIMEOUT_S
                      ) -> torch.Tensor:
    """Sum (p, *shape) over ``group`` and return this rank's (*shape) slice."""
    p = dist.get_world_size(group)
    out = torch.empty(x[0].numel(), dtype=x.dtype, device=x.device)

    def run(o, i):
        wait(_reduce_scatter_single(o, i, group=group, async_op=True), timeout_s,
             "dK/dV reduce-scatter", group)

    out = stage.collective(group, out, x.contiguous().view(-1), run).view(x.shape[1:])
    comm_stats.bytes_sent += out.numel() * out.element_size() * (p - 1)
    comm_stats.messages += 1
    return out


def all_gather_flat(x: torch.Tensor, group, timeout_s: float, what: str) -> torch.Tensor:
    """All-gather ``x`` over ``group`` into a flat (p * numel,) tensor in group-rank order.

    Not counted in `comm_stats` (callers that move attention data count their own bytes).
    """
    x = x.contiguous().view(-1)
    # gloo wants a flat (p * numel) output; NCCL takes either: use the flat form for both.
    out = torch.empty(group_size(group) * x.numel(), dtype=x.dtype, device=x.device)

    def run(o, i):
        wait(_all_gather_single(o, i, group=group, async_op=True), timeout_s, what, group)

    return stage.collective(group, out, x, run)


def all_gather_small(x: torch.Tensor, group, timeout_s: float, what: str) -> torch.Tensor:
    """All-gather a small 1-D tensor (metadata) and return it on the host: (p * numel,)."""
    return all_gather_flat(x, group, timeout_s, what).cpu()


def all_reduce(x: torch.Tensor, group, op=dist.ReduceOp.SUM,
               timeout_s: float = DEFAULT_TIMEOUT_S, what: str = "all-reduce") -> torch.Tensor:
    """In-place all-reduce of ``x`` over ``group`` (bounded wait, staged when needed)."""
    flat = x.contiguous().view(-1)

    def run(o, i):
        if o is not i:
            o.copy_(i)
        wait(dist.all_reduce(o, op=op, group=group, async_op=True), timeout_s, what, group)

    out = stage.collective(group, flat, flat, run)
    if out.data_ptr() != x.data_ptr():
        x.copy_(out.view_as(x))
    return x


def comm_device(group) -> torch.device:
    """Where a collective of ``group`` takes its tensors: the current GPU for NCCL, else CPU."""
    backend = dist.get_backend(group)
    if "nccl" in str(backend) and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
