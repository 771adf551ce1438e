"""The ``"seqpar_ring"`` attention function for transformers' ``AttentionInterface``.

HF attention layers call ``fn(module, query, key, value, attention_mask, scaling=, dropout=,
**kwargs)`` with ``(batch, heads, seq_local, head_dim)`` tensors and expect
``(batch, seq_local, heads, head_dim), None`` back. Under SP every rank holds its shard of the
sequence (``config.layout``), so the function hands the tensors to
`seqpar_ring.modules.sp_attention` with the settings of the model the layer belongs to.

State lives with the model: `bind` (called by ``patch``) maps every module of a model to its
`SPState` (config, groups), so several models in one process — a policy and a reference model,
ring and dilated — each compute their own function. `register` keeps a process default only for
models loaded with ``attn_implementation="seqpar_ring"`` and never patched.

Masks: transformers would build a 4D mask from the LOCAL length, which means nothing across
the ring, so a mask function registered under the same name (``AttentionMaskInterface``) passes
the 2D ``attention_mask`` (or None) through unchanged. Padding and packed documents reach the
ring as ``doc_ids`` (batch, seq_local): the collator computes them from the global row and
passes them as the model kwarg ``sp_doc_ids`` (HF forwards unknown kwargs down to attention);
without it they are derived here from ``position_ids`` gathered once per forward.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from seqpar_ring.config import SeqParConfig
from seqpar_ring.groups import SPGroups, get_groups, initialize
from seqpar_ring.layout import gather, shard
from seqpar_ring.modules import sp_attention

from .hf_window import call_settings

__all__ = ["ATTN_NAME", "DOC_IDS_KEY", "LAYOUT_KEY", "SPState", "register", "bind", "state_of",
           "resolve_groups", "seqpar_ring_attention", "doc_ids_from_positions"]

ATTN_NAME = "seqpar_ring"
DOC_IDS_KEY = "sp_doc_ids"  # model kwarg carrying (batch, seq_local) document ids
LAYOUT_KEY = "sp_layout"    # model kwarg: (sp_size, layout, ulysses_size, sp_rank) of the batch


@dataclass(eq=False)
class SPState:
    """What the attention calls of one model need: its settings and SP groups (None = local).

    ``agreed``: the ranks agreed on the current batch (the model's pre-forward hook, once per
    forward); its attention calls and their recomputation then skip the per-call exchange.
    """

    config: SeqParConfig
    groups: SPGroups | None
    routed: bool = False  # an attention call ran since the forward began (routing check)
    agreed: bool = False
    docs: torch.Tensor | None = None  # document ids the hook derived for this forward
    _cache: tuple = field(default=(), repr=False)  # (position_ids, version, mask, doc_ids)

    @property
    def group(self):
        return None if self.groups is None or self.groups.sp_size == 1 else self.groups.sp_group

    @property
    def sp_size(self) -> int:
        return 1 if self.groups is None else self.groups.sp_size

    @property
    def sp_rank(self) -> int:
        return 0 if self.groups is None else self.groups.sp_rank


_BY_MODULE: weakref.WeakKeyDictionary[nn.Module, SPState] = weakref.WeakKeyDictionary()
_DEFAULT: SPState | None = None  # register(): models loaded by name and never patched


def state_of(module: nn.Module) -> SPState:
    """The `SPState` of the model ``module`` belongs to (the process default if unbound)."""
    state = _BY_MODULE.get(module, _DEFAULT)
    if state is None:
        raise RuntimeError(
            f"attn_implementation={ATTN_NAME!r} is used by a model that was not patched: call "
            "seqpar_ring.integrations.hf.patch(model, config) on every rank (or "
            "seqpar_ring.integrations.hf.register(config) before from_pretrained)"
        )
    return state


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


def register(config: SeqParConfig | None = None, groups: SPGroups | None = None
             ) -> SPState | None:
    """Register ``"seqpar_ring"`` (attention + mask functions) with transformers.

    With ``config``, also record the process default used by models loaded with
    ``attn_implementation="seqpar_ring"`` that are never patched (groups as in `patch`).
    `patch` calls this for you and binds its model to its own settings.
    """
    global _DEFAULT
    AttentionInterface.register(ATTN_NAME, seqpar_ring_attention)
    AttentionMaskInterface.register(ATTN_NAME, _pass_mask_through)
    if config is None:
        return None
    if not isinstance(config, SeqParConfig):
        raise ValueError(f"config must be a SeqParConfig, got {type(config).__name__}")
    _DEFAULT = SPState(config=config, groups=resolve_groups(config, groups))
    return _DEFAULT


def doc_ids_from_positions(
    position_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor | None:
    """Document ids of GLOBAL rows: a new document starts where positions do not step by +1.

    position_ids, attention_mask: (batch, seq) in global token order. Returns (batch, seq) int64
    (0, 1, ... per row; -1 where attention_mask == 0), or None when no row is packed or padded.
    """
    pos = position_ids
    starts = torch.ones_like(pos, dtype=torch.bool)
    starts[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
    doc = starts.long().cumsum(1) - 1
    pad = None if attention_mask is None else attention_mask == 0
    if not bool((doc[:, -1] > 0).any()) and (pad is None or not bool(pad.any())):
        return None
    return doc if pad is None else doc.masked_fill(pad, -1)


def derive_doc_ids(state: SPState, position_ids, attention_mask, batch: int):
    """doc ids of this rank's tokens from the gathered global rows (one all-gather per forward)."""
    cached = state._cache
    if cached and cached[0] is position_ids and cached[2] is attention_mask and (
            cached[1] == getattr(position_ids, "_version", None)):
        return cached[3]  # later layers and checkpoint recomputation of the same forward
    if position_ids is None:
        raise ValueError(
            "seqpar_ring attention needs position_ids (global positions of the rank's tokens): "
            "pass the batch through SPDataCollator or seqpar_ring.layout.shard_batch"
        )
    layout, p = state.config.layout, state.sp_size
    u = state.config.ulysses_size  # the Ulysses x ring token placement (seqpar_ring.layout)
    local = position_ids.expand(batch, -1)
    mask = torch.ones_like(local) if attention_mask is None else attention_mask.to(local.dtype)
    both = torch.stack([local, mask], dim=-1)  # (batch, seq_local, 2): one collective
    full = gather(both, state.group, layout, dim=1, ulysses_size=u)
    if p > 1:
        n = local.shape[1]
        shard_pos = torch.arange(n, device=local.device, dtype=local.dtype)
        if all(bool((shard(full[..., 0], p, r, layout, ulysses_size=u) == shard_pos).all())
               for r in range(p)):
            raise ValueError(
                "position_ids restart at 0 on every SP rank: they are per-shard positions, not "
                "global ones. Pass global position_ids (SPDataCollator / shard_batch make them); "
                f"for documents exactly one shard long, pass {DOC_IDS_KEY!r} explicitly"
            )
    doc = doc_ids_from_positions(full[..., 0], None if attention_mask is None else full[..., 1])
    if doc is not None:
        doc = shard(doc, p, state.sp_rank, layout, dim=1, ulysses_size=u) if p > 1 else doc
    state._cache = (position_ids, position_ids._version, attention_mask, doc)
    return doc


def _check_call(state: SPState, module, attention_mask, dropout: float, seq: int, kwargs) -> None:
    if dropout and dropout > 0:
        raise ValueError(
            f"attention dropout={dropout} is not supported by seqpar_ring attention: set "
            "model.config.attention_dropout = 0.0"
        )
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(
            f"seqpar_ring attention got a {attention_mask.dim()}D attention_mask; under sequence "
            "parallelism pass a 2D (batch, seq_local) mask or packed position_ids instead"
        )
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
    out, attention weights None. Causal unless ``module.is_causal`` is False."""
    state = state_of(module)
    state.routed = True  # a store, no read: nothing for torch.compile to guard on
    seq = query.shape[2] * state.sp_size
    _check_call(state, module, attention_mask, dropout, seq, kwargs)
    doc_ids = kwargs.get(DOC_IDS_KEY)
    if doc_ids is None:
        # derived once per forward by the model's hook; per call only for unhooked models
        doc_ids = state.docs if state.agreed else derive_doc_ids(
            state, kwargs.get("position_ids"), attention_mask, query.shape[0])
    if doc_ids is not None and (doc_ids.device != query.device or doc_ids.dtype != torch.long):
        doc_ids = doc_ids.to(device=query.device, dtype=torch.long)
    window, sinks = call_settings(module, kwargs, seq)  # sliding window, gpt-oss sinks
    out = sp_attention(
        query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), state.config,
        state.groups, causal=getattr(module, "is_causal", True), scale=scaling, doc_ids=doc_ids,
        agreed=state.agreed, window=window, sinks=sinks,
    )
    return out, None
