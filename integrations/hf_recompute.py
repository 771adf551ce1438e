"""``recompute_attention=False`` on transformers models: checkpointed layers keep attention.

`enable(model)` wraps each decoder layer's checkpoint function (``layer._gradient_checkpointing_
func``, what ``gradient_checkpointing_enable`` sets) with `seqpar_ring.recompute.KeepAttention`,
so backward's recomputation of a layer takes the attention results of its forward instead of
computing them again. Like activation offload (`hf_reach`), the wrapping happens in a forward
pre-hook of the decoder, so checkpointing enabled after `patch` (the HF Trainer does so in
``train()``) is covered, and a layer whose function was replaced since is wrapped again. A
training forward with the option on and checkpointing off is an error: the option would do
nothing. `disable` turns the wrappers into pass-throughs.
"""

from __future__ import annotations

import torch
from torch import nn

from seqpar_ring.recompute import KeepAttention

__all__ = ["enable", "disable", "get", "wrap_checkpointed"]

_ATTR = "_seqpar_ring_keep_attention"  # (KeepAttention, hook handle)


def get(model: nn.Module) -> KeepAttention | None:
    state = getattr(model, _ATTR, None)
    return state[0] if state else None


def enable(model: nn.Module, layers: list[nn.Module], target: nn.Module) -> KeepAttention:
    """Keep attention across the recomputation of every checkpointed layer in ``layers``;
    ``target``: the module whose forward runs them all (the decoder)."""
    current = get(model)
    if current is not None:
        current.enabled = True
        return current
    keep = KeepAttention()

    def pre_hook(module, args):
        if keep.enabled and module.training and torch.is_grad_enabled():
            wrap_checkpointed(layers, keep, "recompute_attention=false keeps attention across "
                              "gradient checkpointing's recomputation",
                              "set recompute_attention=true")
        return None

    handle = target.register_forward_pre_hook(pre_hook)
    object.__setattr__(model, _ATTR, (keep, handle))
    return keep


def wrap_checkpointed(layers: list[nn.Module], owner, does: str, off: str) -> list[nn.Module]:
    """Wrap the checkpoint function of every checkpointed layer in ``layers`` with
    ``owner.wrap``, unless ``owner`` already owns it; return those layers. None checkpointed:
    an error, "<does>, but checkpointing is off: ... (or <off>)"."""
    on = [layer for layer in layers if getattr(layer, "gradient_checkpointing", False)]
    if not on:
        raise RuntimeError(f"{does}, but checkpointing is off: call "
                           f"model.gradient_checkpointing_enable() (or {off})")
    for layer in on:
        fn = layer._gradient_checkpointing_func
        if not owner.owns(fn):
            layer._gradient_checkpointing_func = owner.wrap(fn)
    return on


def disable(model: nn.Module) -> None:
    keep = get(model)
    if keep is not None:
        keep.enabled = False  # the wrappers pass through; the hook wraps nothing new
