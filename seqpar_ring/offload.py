"""Activation-checkpoint offload: checkpointed layer inputs live in pinned host memory.

With gradient checkpointing a decoder layer keeps only its input for backward; at long context
those inputs are the largest term that grows with depth (layers x tokens x hidden). This
module moves each of them to host memory while the forward runs and brings it back ahead of
the layer's recompute.

Mechanism: ``torch.autograd.graph.saved_tensors_hooks`` (the one under torch's ``save_on_cpu``)
installed around the checkpoint *call* of a layer, not around the model. Inside
``torch.utils.checkpoint`` the checkpoint installs its own hooks for everything the layer's
forward saves; hooks nest and only the innermost pair applies, so the only tensors our pair
ever sees are the ones the checkpoint itself saves outside its hooks: the layer's inputs.
(Reentrant checkpoints run the layer under ``no_grad`` and save only the inputs too.) Nothing
else the model saves moves. ``save_on_cpu`` itself (and transformers' ``offload=True``, built
on it) copies synchronously on the compute stream; here, per tensor:

* pack (forward, when the checkpoint saves the input): a copy stream waits for the compute
  stream, copies the tensor into pinned host memory (``non_blocking``) and the tensor is
  recorded on the copy stream, so its device memory is reused only once the copy is done.
  Compute does not wait. Host buffers are cut in power-of-two pieces because torch's pinned
  allocator rounds every block up to a power of two (a 5 GiB input would hold 8 GiB).
* unpack (backward, when the recompute of layer i starts): the compute stream waits for layer
  i's host-to-device copy, which was started when layer i+1's recompute began; then the copy
  of layer i-1's input is started, so it overlaps layer i's recompute and backward. At most
  one prefetched input is resident besides the one in use.

On CPU tensors the same code runs with plain copies (no streams), so CPU tests exercise it.
`seqpar_ring.integrations.hf_reach` applies it to transformers models.
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from dataclasses import dataclass
from typing import Any, Callable

import torch

__all__ = ["ActivationOffload", "OffloadStats", "host_pieces"]

# Pieces below this many bytes are not split further (one rounded tail wastes < this).
MIN_PIECE_BYTES = 2**21


def host_pieces(nbytes: int, min_piece: int = MIN_PIECE_BYTES) -> list[int]:
    """Sizes that sum to ``nbytes``: powers of two, largest first, then one tail < min_piece.

    Each piece becomes one pinned block, which torch's host allocator rounds up to a power of
    two: only the tail is rounded, so the host memory held is ``nbytes`` + less than
    ``min_piece``.
    """
    out, rest = [], int(nbytes)
    while rest >= min_piece:
        p = 1 << (rest.bit_length() - 1)
        out.append(p)
        rest -= p
    if rest:
        out.append(rest)
    return out


@dataclass
class OffloadStats:
    """Counters of one `ActivationOffload` (bytes are host bytes held by offloaded inputs)."""

    packed: int = 0            # tensors moved to host
    fetched: int = 0           # tensors brought back (unpacks)
    prefetched: int = 0        # ... of which were already on their way (prefetch hit)
    host_bytes: int = 0        # held now
    host_peak_bytes: int = 0   # most held at once since the last reset_peak()

    def reset_peak(self) -> None:
        self.host_peak_bytes = self.host_bytes


class _Packed:
    """One offloaded tensor: its host pieces and, once fetched, its device copy."""

    def __init__(self, x: torch.Tensor, owner: ActivationOffload, prev: _Packed | None):
        self.owner = owner
        self.shape, self.dtype, self.device = x.shape, x.dtype, x.device
        self.nbytes = x.numel() * x.element_size()
        self.prev = weakref.ref(prev) if prev is not None else None
        self.dev_copy: torch.Tensor | None = None
        self.event = None
        cuda = x.is_cuda
        flat = x.reshape(-1).view(torch.uint8)
        self.pieces = []
        if cuda:
            stream = owner.stream(x.device)
            stream.wait_stream(torch.cuda.current_stream(x.device))
            ctx = torch.cuda.stream(stream)
        else:
            ctx = contextlib.nullcontext()
        with ctx:
            off = 0
            for n in host_pieces(self.nbytes):
                piece = torch.empty(n, dtype=torch.uint8, pin_memory=cuda)
                piece.copy_(flat[off:off + n], non_blocking=cuda)
                self.pieces.append(piece)
                off += n
        if cuda:
            x.record_stream(stream)  # x's memory is reused only after the copy
        s = owner.stats
        s.packed += 1
        s.host_bytes += self.nbytes
        s.host_peak_bytes = max(s.host_peak_bytes, s.host_bytes)

    def __del__(self):
        try:
            self.owner.stats.host_bytes -= self.nbytes
        except AttributeError:  # interpreter shutdown
            pass

    def prefetch(self) -> None:
        """Start the host-to-device copy (on the copy stream for CUDA); idempotent."""
        if self.dev_copy is not None:
            return
        out = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        flat = out.view(-1).view(torch.uint8)
        if self.device.type == "cuda":
            # out is allocated on the compute stream: the copy stream must first wait for the
            # work queued there (the block's previous tenant), and out stays reserved until
            # the copy stream is done with it even if it is dropped unused
            stream = self.owner.stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                self._copy_in(flat, True)
                self.event = torch.cuda.Event()
                self.event.record(stream)
            out.record_stream(stream)
        else:
            self._copy_in(flat, False)
        self.dev_copy = out

    def _copy_in(self, flat: torch.Tensor, non_blocking: bool) -> None:
        off = 0
        for piece in self.pieces:
            flat[off:off + piece.numel()].copy_(piece, non_blocking=non_blocking)
            off += piece.numel()

    def take(self) -> torch.Tensor:
        """The tensor on its device, ready for the current stream; forgets the device copy."""
        hit = self.dev_copy is not None
        self.prefetch()
        if self.event is not None:
            torch.cuda.current_stream(self.device).wait_event(self.event)
        out, self.dev_copy, self.event = self.dev_copy, None, None
        s = self.owner.stats
        s.fetched += 1
        s.prefetched += int(hit)
        return out


class ActivationOffload:
    """Pack/unpack hooks that keep checkpointed inputs in host memory, with prefetch.

    Use `wrap` on a checkpoint function (``torch.utils.checkpoint.checkpoint`` or a partial of
    it, e.g. what transformers stores as ``layer._gradient_checkpointing_func``): the wrapped
    function runs the checkpoint inside this object's hooks. Call `new_pass` at the start of
    each model forward, so prefetching follows one forward's layers in reverse order.
    ``enabled = False`` makes the wrapped functions plain checkpoints (for A/B runs).
    """

    def __init__(self) -> None:
        self.enabled = True
        self.stats = OffloadStats()
        self.calls_in_pass = 0     # wrapped checkpoint calls since new_pass()
        self.packed_in_pass = 0    # tensors offloaded since new_pass()
        self._last: weakref.ref | None = None  # the latest offloaded tensor of this pass
        self._streams: dict[torch.device, Any] = {}

    def stream(self, device: torch.device):
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device=device)
        return self._streams[device]

    def new_pass(self) -> None:
        self._last = None
        self.calls_in_pass = self.packed_in_pass = 0

    def _pack(self, x: torch.Tensor) -> Any:
        if x.numel() == 0 or not x.is_contiguous() or x.layout != torch.strided:
            return x  # e.g. the checkpoint's empty placeholder: nothing worth moving
        h = _Packed(x, self, self._last() if self._last is not None else None)
        self._last = weakref.ref(h)
        self.packed_in_pass += 1
        return h

    def _unpack(self, h: Any) -> torch.Tensor:
        if isinstance(h, torch.Tensor):
            return h
        out = h.take()
        prev = h.prev() if h.prev is not None else None
        if prev is not None:  # the input the next recompute (one layer down) will ask for
            prev.prefetch()
        return out

    def hooks(self) -> torch.autograd.graph.saved_tensors_hooks:
        """The saved-tensor hooks (a context manager) that offload whatever is saved inside."""
        return torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def owns(self, fn: Callable) -> bool:
        return getattr(fn, "_seqpar_offload", None) is self

    def wrap(self, checkpoint_fn: Callable) -> Callable:
        """``checkpoint_fn`` run inside the offload hooks (when enabled and grad is on)."""

        @functools.wraps(checkpoint_fn)
        def offloaded(function, *args, **kwargs):
            if not (self.enabled and torch.is_grad_enabled()):
                return checkpoint_fn(function, *args, **kwargs)
            self.calls_in_pass += 1
            with self.hooks():
                return checkpoint_fn(function, *args, **kwargs)

        offloaded._seqpar_offload = self
        offloaded._seqpar_inner = checkpoint_fn
        return offloaded
