"""Reach options on transformers models: activation-checkpoint offload and the tiled MLP.

`apply(model, config)` (called by `integrations.hf.patch`, hence by the DeepSpeed and
accelerate helpers) turns ``config.activation_offload``, ``config.tiled_mlp`` and
``config.recompute_attention`` (`hf_recompute`) on or off; it is idempotent.

Activation offload (`seqpar_ring.offload`) wraps each decoder layer's checkpoint function,
``layer._gradient_checkpointing_func`` — what ``gradient_checkpointing_enable`` sets on every
``GradientCheckpointingLayer`` (transformers 5.17 checkpoints the layer's ``__call__``, 5.24
its ``forward``; both call that attribute). The wrapping happens in a forward pre-hook of the
model's decoder (``get_decoder()``: what the LM forward runs, and what the explicit tiled loss
of `hf_tiled` calls directly), so it also catches ``gradient_checkpointing_enable`` called
after `apply` (the HF Trainer does so in ``train()``). A training forward with grad enabled and
the option on but checkpointing off is an error, and so is one in which no layer input reached
the hooks (e.g. transformers' own ``offload=True``, whose inner hooks would take precedence).

Tiled MLP (`seqpar_ring.tiled_mlp`) replaces the forward of each decoder layer's ``mlp``
instance when it is a plain gated MLP (Llama, Mistral, Qwen2/3 and alike) and marks it a
DeepSpeed ZeRO-3 leaf module, so ZeRO-3 gathers its three weights together around the MLP's
forward and backward (the tiles use the weights, not the projection modules, whose own hooks
would never run; DeepSpeed would otherwise gather each weight on first access as an "external
parameter"). Marking must happen before ``deepspeed.initialize``, as `patch` does.
"""

from __future__ import annotations

import torch
from torch import nn

from seqpar_ring.config import SeqParConfig
from seqpar_ring.integrations import hf_recompute
from seqpar_ring.offload import ActivationOffload
from seqpar_ring.tiled_mlp import is_gated_mlp, is_tiled, tile_gated_mlp, untile

__all__ = ["apply", "enable_activation_offload", "disable_activation_offload",
           "get_activation_offload", "enable_tiled_mlp", "disable_tiled_mlp", "decoder_layers"]

_OFFLOAD_ATTR = "_seqpar_ring_offload"  # (ActivationOffload, hook handles)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's checkpointable decoder layers (transformers' GradientCheckpointingLayer)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def apply(model: nn.Module, config: SeqParConfig) -> None:
    """Turn the reach options of ``config`` on or off on ``model`` (a PreTrainedModel)."""
    if config.activation_offload:
        enable_activation_offload(model)
    else:
        disable_activation_offload(model)
    if config.tiled_mlp:
        enable_tiled_mlp(model)
    else:
        disable_tiled_mlp(model)
    if not config.recompute_attention:
        layers = decoder_layers(model)
        if not layers:
            raise ValueError(
                f"recompute_attention=false: {type(model).__name__} has no "
                "GradientCheckpointingLayer decoder layers; set recompute_attention=true")
        hf_recompute.enable(model, layers, _hook_target(model, layers))
    else:
        hf_recompute.disable(model)


def get_activation_offload(model: nn.Module) -> ActivationOffload | None:
    """The `ActivationOffload` installed on ``model`` (its stats, ``enabled``), or None."""
    state = getattr(model, _OFFLOAD_ATTR, None)
    return state[0] if state else None


def _hook_target(model: nn.Module, layers: list[nn.Module]) -> nn.Module:
    """The module whose forward runs every decoder layer: the decoder when there is one.

    Not the LM wrapper: `hf_tiled.tiled_causal_lm_loss` calls the decoder directly, and hooks
    on the wrapper would never run there (the offload would silently do nothing).
    """
    get = getattr(model, "get_decoder", None)
    decoder = get() if callable(get) else None
    if isinstance(decoder, nn.Module):
        inside = {id(m) for m in decoder.modules()}
        if all(id(layer) in inside for layer in layers):
            return decoder
    return model


def _unwrapped(fn):
    return getattr(fn, "_seqpar_inner", fn)


def enable_activation_offload(model: nn.Module) -> ActivationOffload:
    """Offload the checkpointed input of every decoder layer of ``model``; returns the offloader."""
    layers = decoder_layers(model)
    if not layers:
        raise ValueError(
            f"activation_offload: {type(model).__name__} has no GradientCheckpointingLayer "
            "decoder layers (transformers >= 5 models have them); set activation_offload=false"
        )
    current = get_activation_offload(model)
    if current is not None:
        return current
    offload = ActivationOffload()

    def pre_hook(module, args):
        if not (offload.enabled and module.training and torch.is_grad_enabled()):
            return None
        hf_recompute.wrap_checkpointed(
            layers, offload, "activation_offload=true moves the inputs that gradient "
            "checkpointing keeps", "set activation_offload=false")
        offload.new_pass()
        return None

    def post_hook(module, args, output):
        if offload.enabled and offload.calls_in_pass and not offload.packed_in_pass:
            raise RuntimeError(
                f"activation_offload: {offload.calls_in_pass} checkpointed layers ran but no "
                "input reached the offload hooks; another saved-tensor hook sits inside them "
                "(e.g. gradient_checkpointing_enable(offload=True)): enable only one offload"
            )
        return None

    target = _hook_target(model, layers)
    handles = (target.register_forward_pre_hook(pre_hook),
               target.register_forward_hook(post_hook))
    object.__setattr__(model, _OFFLOAD_ATTR, (offload, handles))
    return offload


def disable_activation_offload(model: nn.Module) -> None:
    state = getattr(model, _OFFLOAD_ATTR, None)
    if not state:
        return
    offload, handles = state
    for h in handles:
        h.remove()
    for layer in decoder_layers(model):
        fn = getattr(layer, "_gradient_checkpointing_func", None)
        if fn is not None and offload.owns(fn):
            layer._gradient_checkpointing_func = _unwrapped(fn)
    object.__setattr__(model, _OFFLOAD_ATTR, None)


def _mlps(model: nn.Module) -> list[nn.Module]:
    return [layer.mlp for layer in decoder_layers(model)
            if isinstance(getattr(layer, "mlp", None), nn.Module)]


def _set_zero3_leaf(module: nn.Module, flag: bool) -> None:
    try:
        from deepspeed.utils import set_z3_leaf_module
    except ImportError:  # no DeepSpeed: no ZeRO-3 hooks to group
        return
    set_z3_leaf_module(module, flag)


def enable_tiled_mlp(model: nn.Module, tile_size: int | None = None) -> int:
    """Tile every decoder layer's gated MLP; returns how many. Raises if none qualifies."""
    mlps = _mlps(model)
    bad = sorted({type(m).__name__ for m in mlps if not is_gated_mlp(m)})
    if not mlps or bad:
        raise ValueError(
            f"tiled_mlp: {type(model).__name__}'s decoder MLPs "
            f"({bad or 'none found'}) are not plain gated MLPs (nn.Linear gate_proj/up_proj/"
            "down_proj and act_fn, without adapters or dropout); set tiled_mlp=false"
        )
    for m in mlps:
        tile_gated_mlp(m, tile_size)
        _set_zero3_leaf(m, True)
    return len(mlps)


def disable_tiled_mlp(model: nn.Module) -> None:
    for m in _mlps(model):
        if is_tiled(m):
            untile(m)
            _set_zero3_leaf(m, False)
