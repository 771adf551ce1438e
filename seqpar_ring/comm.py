"""Transport for the ring: neighbour exchange, K/V all-gather, and agreement on input metadata.

Nothing here knows about attention. ``RingComm`` sends a list of tensors to the next member of
a ring and receives same-shaped tensors from the previous one with ``batch_isend_irecv``; the
caller posts the exchange, computes, then waits — that is the compute/communication overlap.
Every wait has a timeout so a peer that never arrives fails the job instead of hanging it.

``comm_stats`` counts the bytes this process sent through the ring (a test proves dilated mode
sends ~1/r of dense mode's bytes with it). To trace every send/recv, set
``logging.getLogger("seqpar_ring.comm").setLevel(logging.DEBUG)``.
"""

from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass
from datetime import timedelta
from typing import Sequence

import torch
import torch.distributed as dist

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
        """Start sending ``send`` to the next member and receiving ``recv`` from the previous."""
        ops = []
        for i, (s, r) in enumerate(zip(send, recv)):
            ops.append(dist.P2POp(dist.isend, s, self.next, self.group, tag + i))
            ops.append(dist.P2POp(dist.irecv, r, self.prev, self.group, tag + i))
            comm_stats.bytes_sent += s.numel() * s.element_size()
            comm_stats.messages += 1
            if log.isEnabledFor(logging.DEBUG):
                log.debug("send %s %s -> %d, recv <- %d", tuple(s.shape), s.dtype, self.next,
                          self.prev)
        return dist.batch_isend_irecv(ops)

    def wait(self, works) -> None:
        for w in works or ():
            if not _wait(w, self.timeout):
                raise RuntimeError(
                    f"ring exchange with ranks {self.prev}/{self.next} did not complete within "
                    f"{self.timeout.total_seconds():.0f}s: a peer is stuck or crashed; raise "
                    "SeqParConfig.comm_timeout_s if steps are legitimately this slow"
                )


def _wait(work, timeout: timedelta) -> bool:
    try:
        return work.wait(timeout=timeout) is not False
    except TypeError:  # backends whose Work.wait takes no timeout rely on the group's timeout
        return work.wait() is not False


def exchange(group, sends, recvs, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Point-to-point exchange inside ``group`` and wait for it.

    sends: [(tensor, dst_group_rank, tag)], recvs: [(buffer, src_group_rank, tag)]. Messages
    between one pair of ranks are matched in the order given (and by tag where supported), so
    both sides must list them in the same order.
    """
    ops = [dist.P2POp(dist.isend, t, dist.get_global_rank(group, r), group, tag)
           for t, r, tag in sends]
    ops += [dist.P2POp(dist.irecv, t, dist.get_global_rank(group, r), group, tag)
            for t, r, tag in recvs]
    for t, _, _ in sends:
        comm_stats.bytes_sent += t.numel() * t.element_size()
        comm_stats.messages += 1
    if not ops:
        return
    timeout = timedelta(seconds=timeout_s)
    for w in dist.batch_isend_irecv(ops):
        if not _wait(w, timeout):
            raise RuntimeError(f"point-to-point exchange did not complete within {timeout_s:.0f}s")


def all_gather_kv(x: torch.Tensor, group) -> torch.Tensor:
    """All-gather a contiguous tensor over ``group``: returns (p, *x.shape) in group-rank order."""
    p = dist.get_world_size(group)
    # gloo wants a flat (p * numel) output; NCCL takes either: use the flat form for both.
    out = torch.empty(p * x.numel(), dtype=x.dtype, device=x.device)
    _all_gather_single(out, x.contiguous().view(-1), group=group)
    out = out.view(p, *x.shape)
    comm_stats.bytes_sent += x.numel() * x.element_size() * (p - 1)
    comm_stats.messages += 1
    return out


def reduce_scatter_kv(x: torch.Tensor, group) -> torch.Tensor:
    """Sum (p, *shape) over ``group`` and return this rank's (*shape) slice."""
    p = dist.get_world_size(group)
    out = torch.empty(x[0].numel(), dtype=x.dtype, device=x.device)
    _reduce_scatter_single(out, x.contiguous().view(-1), group=group)
    out = out.view(x.shape[1:])
    comm_stats.bytes_sent += out.numel() * out.element_size() * (p - 1)
    comm_stats.messages += 1
    return out


def agree(meta: dict[str, int], group, what: str) -> None:
    """Check that every rank of ``group`` passes the same integer metadata; raise on all if not.

    One tiny all-gather, run before any ring traffic, turns a mismatch that would deadlock or
    silently mix shapes into an error that names the field and every rank's value.
    """
    if group_size(group) == 1:
        return
    keys = sorted(meta)
    # The first field identifies the call itself, so ranks that reached *different* calls are
    # told so instead of comparing unrelated fields.
    op = zlib.crc32(("|".join([what, *keys])).encode()) & 0x7FFFFFFF
    device = _comm_device(group)
    local = torch.tensor([op] + [meta[k] for k in keys], dtype=torch.int64, device=device)
    gathered = torch.empty(group_size(group) * local.numel(), dtype=torch.int64, device=device)
    _all_gather_single(gathered, local, group=group)
    rows = gathered.view(group_size(group), -1).cpu().tolist()
    if len({row[0] for row in rows}) > 1:
        mine = [r for r, row in enumerate(rows) if row[0] == op]
        raise RuntimeError(
            f"{what}: the ranks of the sequence-parallel group are in different operations "
            f"(ranks {mine} are in {what}, the others elsewhere): every SP rank must run the same "
            "model code on the same step — check rank-dependent branches (e.g. `if rank == 0`)"
        )
    bad = [k for i, k in enumerate(keys) if len({row[i + 1] for row in rows}) > 1]
    if bad:
        detail = "; ".join(f"{k}: " + ", ".join(f"rank{r}={row[keys.index(k) + 1]}"
                                                 for r, row in enumerate(rows)) for k in bad)
        raise ValueError(
            f"{what}: ranks of the sequence-parallel group disagree on {detail}. Every SP rank "
            "must pass the same batch/heads/head_dim/dtype and an equal share of the sequence "
            "(shard with seqpar_ring.shard_batch, which pads to the layout's multiple)"
        )


def _comm_device(group) -> torch.device:
    backend = dist.get_backend(group)
    if "nccl" in str(backend) and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
