"""Attention kept across gradient checkpointing: backward does not compute it a second time.

Under gradient checkpointing every decoder layer's forward runs twice: once keeping only the
layer's input, and again in backward to rebuild what the gradients need. At long sequences
attention is the expensive part of that second forward — O(S²) work for an O(S) result (the
output and its log-sum-exp). `keep_attention` wraps a checkpoint function (what transformers
stores as ``layer._gradient_checkpointing_func``) so that each checkpointed call keeps the
(out, lse) of its attention calls from the first forward and hands them back, in order, when
backward recomputes that call. Nothing is computed twice; the kept results are the very values
the recomputation would produce (same inputs, same kernels), so gradients do not change.

The results travel with the call, not in a cache: every checkpointed call gets its own store,
closed over by the function handed to the checkpoint, so two forwards before a backward, layers
recomputed in any order and reentrant or non-reentrant checkpointing each find their own. The
cost is memory: one output (S x hidden, the model's dtype) and one fp32 lse (heads x S) per
layer, held from the forward to that layer's backward.

Used by `ring.RingAttentionFunction` and `dilated.DilatedAttentionFunction` through `kept`;
turned on for transformers models by ``SeqParConfig(recompute_attention=False)``.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch

__all__ = ["kept", "keep_attention", "KeepAttention"]

# The store of the checkpointed call whose forward is running (None: none). A module global,
# not a ContextVar: compiled decoder layers read it, and torch.compile traces a global (a
# guarded constant) but not ContextVar.get.
_CALL: _CallStore | None = None


class _CallStore:
    """The attention results of one checkpointed call, in the order its forward made them."""

    def __init__(self) -> None:
        self.results: list[tuple[torch.Tensor, torch.Tensor] | None] = []
        self.runs = 0    # forwards of the call so far: 1 = the first, 2 = the recomputation
        self.next = 0    # the next result the recomputation takes

    def run(self, function: Callable, *args, **kwargs):
        self.runs += 1
        if self.runs > 2:
            raise RuntimeError(
                "seqpar_ring: a checkpointed layer was recomputed twice (backward through the "
                "same graph again, retain_graph=True): its kept attention results are gone. "
                "Set SeqParConfig(recompute_attention=True) for such training loops")
        global _CALL
        outer, _CALL = _CALL, self
        try:
            return function(*args, **kwargs)
        finally:
            _CALL = outer


def kept(compute: Callable[[], tuple[torch.Tensor, torch.Tensor]], like: torch.Tensor
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) = ``compute()``, kept for the recomputation of the checkpointed call this
    runs in; in that recomputation, the kept pair instead of computing. Outside a kept call,
    just ``compute()``. ``like``: the query tensor (checks the pair fits the call)."""
    store = _CALL
    if store is None:
        return compute()
    if store.runs == 1:
        out, lse = compute()
        store.results.append((out.detach(), lse.detach()))
        return out, lse
    if store.next >= len(store.results):
        raise RuntimeError(
            "seqpar_ring: the recomputation of a checkpointed layer made more attention calls "
            f"than its forward ({len(store.results)}); the layer's forward depends on state "
            "that changed in between. Set SeqParConfig(recompute_attention=True)")
    pair = store.results[store.next]
    store.results[store.next] = None  # its backward holds it from here on
    store.next += 1
    out, lse = pair
    if out.shape[:-1] != like.shape[:-1] or out.dtype != like.dtype or out.device != like.device:
        raise RuntimeError(
            "seqpar_ring: the recomputation of a checkpointed layer made a different attention "
            f"call than its forward (out {tuple(out.shape)} {out.dtype}, queries "
            f"{tuple(like.shape)} {like.dtype}). Set SeqParConfig(recompute_attention=True)")
    return out.detach(), lse.detach()


class KeepAttention:
    """The on/off switch of `keep_attention` wrappers on one model (``enabled``)."""

    def __init__(self) -> None:
        self.enabled = True

    def owns(self, fn: Callable) -> bool:
        return getattr(fn, "_seqpar_keep", None) is self

    def wrap(self, checkpoint_fn: Callable) -> Callable:
        """``checkpoint_fn(function, *args, **kwargs)`` whose calls keep their attention."""

        @functools.wraps(checkpoint_fn)
        def keeping(function, *args, **kwargs):
            if not (self.enabled and torch.is_grad_enabled()):
                return checkpoint_fn(function, *args, **kwargs)
            store = _CallStore()
            return checkpoint_fn(functools.partial(store.run, function), *args, **kwargs)

        keeping._seqpar_keep = self
        return keeping


def keep_attention(checkpoint_fn: Callable) -> Callable:
    """``checkpoint_fn`` (e.g. ``torch.utils.checkpoint.checkpoint`` or a partial of it) whose
    checkpointed calls do not recompute attention in backward (module doc)."""
    return KeepAttention().wrap(checkpoint_fn)
