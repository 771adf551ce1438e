"""Host staging: collectives of a group whose backend cannot carry the tensors' device.

Several ranks on one GPU (``torchrun --nproc-per-node N`` with more ranks than GPUs) must use
gloo — NCCL refuses two ranks on one device — and gloo moves host memory: its send/recv of a
CUDA tensor fails (``gloo/transport/tcp/pair.cc: writev ... Bad address``). So whenever a
group's backend for CUDA tensors is gloo and a tensor is on CUDA, the transport modules
(`seqpar_ring.comm`, `seqpar_ring.comm_a2a`) stage it through pinned host memory:

    D2H copy on the current stream -> wait for that copy (an event) -> gloo op on the host
    buffers -> H2D copy of what arrived, on the current stream

Nothing above the transport changes; the decision is automatic (`needs_stage`) and costs
nothing where the backend carries the device (NCCL with CUDA, gloo with CPU). The pinned
buffers come from PyTorch's caching host allocator: a freed block is reused by the next staged
collective of its size, and is not handed out again before the asynchronous copies that used
it have finished (the allocator records an event on each), so an H2D copy still in flight
never sees its source overwritten by the next receive.

Cost: every staged byte crosses PCIe twice and the host waits for the D2H copy before sending,
so a shared-GPU run measures correctness and per-rank compute, not multi-GPU speed.

The reverse — NCCL with CPU tensors — cannot be staged: `carry_error` names the fix, and the
attention entry points fold it into their agreement so every rank raises at once.

Tests force the staged path with CPU tensors (`forced`): CPU CI then runs the same staging code
(host copies, the op on separate buffers, copies back) in a gloo group.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
import torch.distributed as dist

__all__ = ["backend_for", "needs_stage", "carry_error", "forced", "to_host", "host_like",
           "ready", "back", "collective", "stats"]


class _Stats:
    """Staged collectives and the bytes they copied each way (tests check the path ran)."""

    collectives: int = 0
    bytes_to_host: int = 0
    bytes_to_device: int = 0

    def reset(self) -> None:
        self.collectives = self.bytes_to_host = self.bytes_to_device = 0


stats = _Stats()
_FORCE = False


@contextlib.contextmanager
def forced(on: bool = True) -> Iterator[None]:
    """Stage every collective, CPU tensors included (tests: the staged path on CPU CI)."""
    global _FORCE
    old, _FORCE = _FORCE, on
    try:
        yield
    finally:
        _FORCE = old


def backend_for(group, device_type: str) -> str:
    """The backend that carries ``device_type`` tensors in ``group`` ("gloo", "nccl", ...).

    A group made with a device map ("cpu:gloo,cuda:nccl") reports one backend per device.
    """
    name = str(dist.get_backend(group)).lower()
    if ":" not in name:
        return name
    pairs = dict(p.split(":", 1) for p in name.split(",") if ":" in p)
    return pairs.get(device_type, "")


def needs_stage(group, t: torch.Tensor) -> bool:
    """Does a collective of ``group`` on ``t`` go through host buffers? (gloo with CUDA)."""
    if _FORCE:
        return True
    return t.is_cuda and group is not None and backend_for(group, "cuda") == "gloo"


def carry_error(group, device: torch.device) -> str | None:
    """Why ``group`` cannot carry tensors on ``device`` (None when it can, staged or not)."""
    if group is None or dist.get_world_size(group) == 1:
        return None
    if device.type == "cpu" and backend_for(group, "cpu") == "nccl":
        return ("the sequence-parallel group's backend is NCCL, which cannot carry CPU tensors: "
                "move the model and batch to the GPU (torch.cuda.set_device(local_rank); "
                "model.cuda()), or create the group with backend='gloo' for a CPU run")
    return None


def to_host(t: torch.Tensor) -> torch.Tensor:
    """A contiguous host copy of ``t`` (pinned for CUDA; call `ready` before the op reads it)."""
    stats.bytes_to_host += t.numel() * t.element_size()
    if t.is_cuda:
        h = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        h.copy_(t, non_blocking=True)
        return h
    return t.detach().clone(memory_format=torch.contiguous_format)


def host_like(t: torch.Tensor) -> torch.Tensor:
    """An empty contiguous host buffer shaped like ``t`` (pinned for CUDA) to receive into."""
    return torch.empty(t.shape, dtype=t.dtype, pin_memory=t.is_cuda)


def ready(*tensors: torch.Tensor) -> None:
    """Block until the D2H copies queued for ``tensors``' devices have landed on the host."""
    stats.collectives += 1
    for dev in {t.device for t in tensors if t.is_cuda}:
        with torch.cuda.device(dev):
            ev = torch.cuda.Event()
            ev.record()
            ev.synchronize()


def back(dst: torch.Tensor, host: torch.Tensor) -> torch.Tensor:
    """Copy what arrived in ``host`` into ``dst`` (on the current stream; returns ``dst``)."""
    stats.bytes_to_device += host.numel() * host.element_size()
    dst.copy_(host, non_blocking=dst.is_cuda)
    return dst


def collective(group, out: torch.Tensor, inp: torch.Tensor,
               run: Callable[[torch.Tensor, torch.Tensor], None]) -> torch.Tensor:
    """``run(out, inp)`` — one blocking collective — staged through the host when needed.

    ``out`` and ``inp`` are contiguous; ``run`` issues the op and waits for it. Returns ``out``.
    """
    if not needs_stage(group, inp):
        run(out, inp)
        return out
    h_in, h_out = to_host(inp), host_like(out)
    ready(inp)
    run(h_out, h_in)
    return back(out, h_out)
