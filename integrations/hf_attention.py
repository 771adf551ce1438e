"""The ``"seqpar_ring"`` attention function for transformers' ``AttentionInterface``.

HF attention layers call ``fn(module, query, key, value, attention_mask, scaling=, dropout=,
**kwargs)`` with ``(batch, heads, seq_local, head_dim)`` tensors and expect
``(batch, seq_local, heads, head_dim), None`` back. Under SP every rank holds its shard of the
sequence (``config.layout``), so the function hands the tensors to
`seqpar_ring.modules.sp_attention` with the settings of the model the layer belongs to.

State lives with the model: `bind` (called by ``patch``) maps every module of a model to its
`SPState` (config, groups), so several models in one process — a policy and a reference model,
ring and dilated — each compute their own function.

Masks: transformers would build a 4D mask from the LOCAL length, which means nothing across
the ring, so a mask function registered under the same name (``AttentionMaskInterface``) passes
the 2D ``attention_mask`` (or None) through unchanged. Padding and packed documents reach the
ring as ``doc_ids`` (batch, seq_local) in the call's own keyword arguments (``sp_doc_ids``):
the model's pre-forward hook computes them once per forward from that forward's tensors
(`hf_batch`), and HF hands them to every attention call and keeps them for recomputation.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from seqpar_ring.config import SeqParConfig
from seqpar_ring.groups import SPGroups, get_groups, initialize
from seqpar_ring.modules import sp_attention

from .hf_batch import AGREED_KEY, DOC_IDS_KEY, batch_doc_ids, check_mask
from .hf_decode import cached_attention
from .hf_window import call_settings

__all__ = ["ATTN_NAME", "AGREED_KEY", "DOC_IDS_KEY", "LAYOUT_KEY", "SPState", "register_interface",
           "bind", "is_bound", "state_of", "resolve_groups", "seqpar_ring_attention"]

ATTN_NAME = "seqpar_ring"
LAYOUT_KEY = "sp_layout"    # model kwarg: (sp_size, layout, ulysses_size, sp_rank) of the batch


@dataclass(eq=False)
class SPState:
    """The settings and SP groups (None = local) of one patched model's attention calls.

    Holds no batch: the documents of a forward travel with its calls (`hf_batch`). The two
    flags are per-call stores read within the same call: ``routed`` (an attention call ran since
    the decoder's forward began: the routing check) and ``labels`` (the outer model's forward
    got labels: set by its pre-hook, read and cleared by the decoder's hook right after).
    """

    config: SeqParConfig
    groups: SPGroups | None
    routed: bool = False
    labels: bool | None = None

    @property
    def group(self):
        return None if self.groups is None or self.groups.sp_size == 1 else self.groups.sp_group

    @property
    def sp_size(self) -> int:
        return 1 if self.groups is None else self.groups.sp_size

    @property
    def sp_rank(self) -> int:
        return 0 if self.groups is None else self.groups.sp_rank

    def doc_ids(self, get, batch: int, seq_local: int, device) -> torch.Tensor | None:
        """This rank's document ids of one call (`hf_batch.batch_doc_ids`)."""
        return batch_doc_ids(get, batch, seq_local, device, group=self.group,
                             sp_size=self.sp_size, sp_rank=self.sp_rank,
                             layout=self.config.layout, ulysses_size=self.config.ulysses_size)


_BY_MODULE: weakref.WeakKeyDictionary[nn.Module, SPState] = weakref.WeakKeyDictionary()


def state_of(module: nn.Module) -> SPState:
    """The `SPState` of the patched model ``module`` belongs to."""
    state = _BY_MODULE.get(module)
    if state is None:
        raise RuntimeError(
            f"attn_implementation={ATTN_NAME!r} is used by a model that was not patched: call "
            "seqpar_ring.integrations.hf.patch(model, config) on every rank (or "
            "seqpar_ring.integrations.hf.register(config) before the model's first forward)"
        )
    return state


def is_bound(module: nn.Module) -> bool:
    return module in _BY_MODULE


def bind(model: nn.Module, state: SPState) -> None:
    """Give every module of ``model`` (its attention layers among them) ``state``."""
    for module in model.modules():
        _BY_MODULE[module] = state


def resolve_groups(config: SeqParConfig, groups: SPGroups | None = None) -> SPGroups | None:
    """``groups``, else the recorded default, else new ones when torch.distributed is up.

    sp_size 1 without explicit groups means no sharding: None.
    """
    if groups is None and config.sp_size > 1:
        try:
            groups = get_groups()
        except RuntimeError:
            if not (dist.is_available() and dist.is_initialized()):
                raise RuntimeError(
                    f"sp_size={config.sp_size} needs torch.distributed: call "
                    "torch.distributed.init_process_group(...) before patch()"
                ) from None
            groups = initialize(config.sp_size, ulysses_size=config.ulysses_size)
    if groups is not None and (groups.sp_size, groups.ulysses_size) != (
            config.sp_size, config.ulysses_size):
        raise ValueError(
            f"config.sp_size={config.sp_size}, ulysses_size={config.ulysses_size} but the SP "
            f"groups are {groups}: pass matching groups or build them with seqpar_ring.groups."
            "initialize(config.sp_size, ulysses_size=config.ulysses_size)"
        )
    return groups


def _pass_mask_through(*args, attention_mask=None, **kwargs):
    # Keep the 2D (batch, seq_local) mask (or None): doc ids, not a local 4D mask, rule the ring.
    return attention_mask


def register_interface() -> None:
    """Register ``"seqpar_ring"`` (attention + mask functions) with transformers."""
    AttentionInterface.register(ATTN_NAME, seqpar_ring_attention)
    AttentionMaskInterface.register(ATTN_NAME, _pass_mask_through)


def _check_call(state: SPState, module, attention_mask, dropout: float, seq: int, kwargs) -> None:
    if dropout and dropout > 0:
        raise ValueError(
            f"attention dropout={dropout} is not supported by seqpar_ring attention: set "
            "model.config.attention_dropout = 0.0"
        )
    check_mask(attention_mask)  # the same rule (and message) as the decoder's hook
    div = state.config.seq_len_divisor
    if seq % div:
        raise ValueError(
            f"sequence length {seq} (= {seq // state.sp_size} per rank x sp_size "
            f"{state.sp_size}) is not a multiple of {div} (layout={state.config.layout!r}"
            f"{', dilation' if state.config.attention == 'dilated' else ''}): pad the batch with "
            f"SPDataCollator(..., pad_to_multiple_of={div}) or "
            f"shard_batch(..., pad_to_multiple_of={div})"
        )


def seqpar_ring_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """AttentionInterface entry: (batch, heads, seq_local, dim) in, (batch, seq_local, heads, dim)
    out, attention weights None. Causal unless ``module.is_causal`` is False.

    The call's documents come with it (``sp_doc_ids``, added by the model's hook, `hf_batch`);
    a call that bypassed the hook derives them from its own arguments. Under autocast q, k, v
    are cast to the autocast dtype, as SDPA does. Cached decoding (fewer queries than keys:
    ``generate``) runs `hf_decode.cached_attention` at sp_size 1.
    """
    state = state_of(module)
    state.routed = True  # a store, no read: nothing for torch.compile to guard on
    if query.shape[2] != key.shape[2]:
        return cached_attention(module, query, key, value, attention_mask, scaling,
                                state.sp_size, **kwargs), None
    seq = query.shape[2] * state.sp_size
    _check_call(state, module, attention_mask, dropout, seq, kwargs)
    agreed = bool(kwargs.get(AGREED_KEY, False))
    if agreed:
        doc_ids = kwargs.get(DOC_IDS_KEY)
    else:  # a call outside the hooked decoder: its own arguments, and its own agreement
        doc_ids = state.doc_ids(lambda k: attention_mask if k == "attention_mask" else
                                kwargs.get(k), query.shape[0], query.shape[2], query.device)
    window, sinks = call_settings(module, kwargs, seq)  # sliding window, gpt-oss sinks
    query, key, value = _autocast(query, key, value)
    out = sp_attention(
        query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), state.config,
        state.groups, causal=getattr(module, "is_causal", True), scale=scaling, doc_ids=doc_ids,
        agreed=agreed, window=window, sinks=sinks,
    )
    return out, None


def _autocast(*xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    # Under autocast the projections come out in the autocast dtype but RoPE (fp32 cos/sin)
    # promotes q and k back: cast all three to the autocast dtype, as SDPA does.
    device = xs[0].device.type
    if not torch.is_autocast_enabled(device):
        return xs
    dtype = torch.get_autocast_dtype(device)
    return tuple(x.to(dtype) for x in xs)
