"""Transport of the Ulysses exchange: all-to-all and all-gather inside a (Ulysses) group.

Nothing here knows about attention or heads: ``all_to_all`` sends block j of a (u, ...) tensor
to group rank j and returns the blocks received, block j from group rank j. A peer that never
arrives fails the job instead of hanging it: on gloo every wait has ``timeout_s``; on NCCL the
wait is stream-ordered (the CPU keeps queueing kernels) and the process group's own timeout
(its watchdog) ends a stuck collective — a ``Work.wait(timeout)`` there would block the CPU
until the all-to-all finishes, a host sync on every attention call. CUDA tensors on a gloo group
(ranks sharing one GPU) are staged through pinned host buffers (`seqpar_ring.stage`).

Bytes are added to `seqpar_ring.comm.comm_stats` (the process total) and to
``a2a_stats`` (this transport only; ``replicated_bytes`` counts K/V heads the Ulysses layer
copied because the model has fewer K/V heads than the Ulysses size).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from . import comm as C
from . import stage

__all__ = ["A2AStats", "a2a_stats", "all_to_all", "all_gather"]


@dataclass
class A2AStats:
    """What this process sent through the Ulysses transport."""

    bytes_sent: int = 0          # bytes that left this rank (its own block is not counted)
    messages: int = 0            # collectives issued
    replicated_bytes: int = 0    # of bytes_sent: copies of K/V heads made for GQA with Hkv < u

    def reset(self) -> None:
        self.bytes_sent = self.messages = self.replicated_bytes = 0


a2a_stats = A2AStats()


def _wait(work, timeout_s: float, what: str, group) -> None:
    C.wait(work, timeout_s, what, group)


def _count(nbytes: int) -> None:
    C.comm_stats.bytes_sent += nbytes
    C.comm_stats.messages += 1
    a2a_stats.bytes_sent += nbytes
    a2a_stats.messages += 1


def all_to_all(send: torch.Tensor, group, timeout_s: float = C.DEFAULT_TIMEOUT_S) -> torch.Tensor:
    """(u, *shape) -> (u, *shape) over ``group`` of u ranks: block j goes to group rank j.

    ``send`` must be contiguous (it is the wire buffer). u = 1 returns ``send`` itself.
    """
    u = C.group_size(group)
    if send.shape[0] != u:
        raise ValueError(f"all_to_all: first dim {send.shape[0]} must equal the group size {u}")
    if u == 1:
        return send
    if not send.is_contiguous():
        raise ValueError("all_to_all: the send buffer must be contiguous")
    recv = torch.empty_like(send)

    def run(o, i):
        _wait(dist.all_to_all_single(o, i, group=group, async_op=True), timeout_s,
              "Ulysses all-to-all", group)

    _count(send.numel() * send.element_size() * (u - 1) // u)
    return stage.collective(group, recv, send, run)


def all_gather(x: torch.Tensor, group, timeout_s: float = C.DEFAULT_TIMEOUT_S) -> torch.Tensor:
    """All-gather ``x`` over ``group``: (*shape) -> (u, *shape) in group-rank order."""
    u = C.group_size(group)
    if u == 1:
        return x.unsqueeze(0)
    x = x.contiguous()
    out = torch.empty(u * x.numel(), dtype=x.dtype, device=x.device)

    def run(o, i):
        _wait(C._all_gather_single(o, i, group=group, async_op=True), timeout_s,
              "Ulysses all-gather", group)

    _count(x.numel() * x.element_size() * (u - 1))
    return stage.collective(group, out, x.view(-1), run).view(u, *x.shape)
