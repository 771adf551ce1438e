"""Which layers of a transformers model are windowed, have sinks or soft-capping — per family.

transformers' attention layers hand their own settings to the attention function on every call:
``sliding_window`` (None for full layers), ``s_aux`` (gpt-oss's learned sink logits) and
``softcap`` (Gemma 2/3's ``attn_logit_softcapping``). `call_settings` turns those into the
ring's ``window`` and ``sinks``; `layer_kinds` reads the same from the model before the first
forward — each attention module's ``sliding_window`` attribute where the family sets one, else
``config.layer_types`` / ``use_sliding_window`` + ``max_window_layers`` / ``sliding_window`` —
so `check_model` refuses what the ring cannot compute exactly at ``patch`` time, naming the
setting, instead of inside a forward.

| family                 | windowed layers                                        | sinks |
| ---------------------- | ------------------------------------------------------ | ----- |
| Mistral, Mixtral       | all, when ``config.sliding_window`` is set             | no    |
| Qwen2, Qwen3 (+ MoE)   | ``use_sliding_window``: layers >= ``max_window_layers`` | no    |
| Gemma 2, Gemma 3       | ``layer_types`` (local and global alternate)           | no    |
| gpt-oss                | ``layer_types`` (every other layer)                    | yes   |

Gemma 2/3 soft-capping (``attn_logit_softcapping``) is refused; set it to None to fine-tune.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["LayerKind", "layer_kinds", "check_model", "call_settings"]


@dataclass(frozen=True)
class LayerKind:
    """One attention layer: its index, class, window (None: full attention), whether it has
    learned sinks, and its logit soft-cap (None: none)."""

    index: int
    name: str
    window: int | None
    sinks: bool
    softcap: float | None


def _config_window(config, index: int) -> int | None:
    """The window config gives layer ``index``, for modules that keep no attribute of it."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if types is not None and index < len(types):
        return window if types[index] == "sliding_attention" else None
    if getattr(config, "use_sliding_window", True) is False:
        return None
    limit = getattr(config, "max_window_layers", None)
    if limit is not None and getattr(config, "use_sliding_window", None) and index < limit:
        return None
    return window


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    """The self-attention modules of a decoder, in layer order (those with q/k projections)."""
    mods = [m for m in model.modules() if hasattr(m, "layer_idx") and (
        hasattr(m, "q_proj") or hasattr(m, "qkv_proj"))]
    return sorted(mods, key=lambda m: m.layer_idx)


def layer_kinds(model: nn.Module) -> list[LayerKind]:
    """Every attention layer's window, sinks and soft-cap, as the model will pass them."""
    config = getattr(model, "config", None)
    text = getattr(config, "get_text_config", lambda: config)() if config is not None else None
    kinds = []
    for m in _attention_modules(model):
        i = m.layer_idx
        if hasattr(m, "sliding_window"):
            window = m.sliding_window
        else:
            window = _config_window(text, i) if text is not None else None
        softcap = getattr(m, "attn_logit_softcapping", None)
        kinds.append(LayerKind(i, type(m).__name__, window,
                               isinstance(getattr(m, "sinks", None), torch.Tensor), softcap))
    return kinds


def _softcap_error(where: str, value) -> ValueError:
    return ValueError(
        f"{where} soft-caps attention logits (attn_logit_softcapping={value}), which "
        "seqpar_ring attention does not compute (the fused kernels have no soft-cap). Set "
        "model.config.attn_logit_softcapping = None before patch() — Gemma 2 was trained with "
        "it, so fine-tune with it off only knowingly — or use another attention for this model")


def check_model(model: nn.Module) -> list[LayerKind]:
    """Refuse models the ring cannot compute exactly (naming the setting); return the kinds."""
    kinds = layer_kinds(model)
    for kind in kinds:
        if kind.softcap is not None:
            raise _softcap_error(f"{kind.name} (layer {kind.index})", kind.softcap)
        if kind.window is not None and (isinstance(kind.window, bool) or kind.window < 1):
            raise ValueError(f"{kind.name} (layer {kind.index}) has sliding_window="
                             f"{kind.window!r}: it must be an integer >= 1 (or None)")
    return kinds


def call_settings(module: nn.Module, kwargs: dict, seq: int
                  ) -> tuple[int | None, torch.Tensor | None]:
    """(window, sinks) of one attention call from the kwargs transformers passes.

    seq: the global sequence length. A window covering the whole sequence is full causal
    attention: None, so the call takes the dense ring. Raises on ``softcap``.
    """
    softcap = kwargs.get("softcap")
    if softcap is not None:
        raise _softcap_error(type(module).__name__, softcap)
    window = kwargs.get("sliding_window")
    if window is not None and window >= seq:
        window = None
    return window, kwargs.get("s_aux")
