"""Forward hooks `patch` puts on a model's decoder: one agreement per forward, input checks.

Before the decoder runs, the SP ranks agree — in one small exchange, before any other
collective of the step — on what makes their attention calls match: the batch's shapes, the
model's architecture, the SP settings and whether a backward will follow. Checks that can fail
on one rank (missing ``position_ids``, a batch sharded for another layout or rank) travel in
the same exchange, so every rank raises the same error. The attention calls of that forward
(and their recomputation under gradient checkpointing) then skip their own exchange: the hot
path has no collective and no host sync besides the ring's own traffic.

After the decoder ran, a routing check makes sure the attention really went through the
``"seqpar_ring"`` interface (a model that bypasses it would silently attend locally).
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from seqpar_ring.agreement import agree, collect_error, fingerprint
from seqpar_ring.config import LAYOUTS

from .hf_attention import ATTN_NAME, DOC_IDS_KEY, LAYOUT_KEY, SPState, derive_doc_ids, state_of

__all__ = ["install", "layout_tag"]

_HOOKS_ATTR = "_seqpar_ring_hooks"


def layout_tag(sp_size: int, layout: str, ulysses_size: int, sp_rank: int) -> torch.Tensor:
    """The ``sp_layout`` tensor a collator adds to a batch: for whom it was sharded."""
    return torch.tensor([sp_size, LAYOUTS.index(layout), ulysses_size, sp_rank])


def _shape(x) -> tuple | None:
    return tuple(x.shape) if isinstance(x, torch.Tensor) else None


def _model_fingerprint(module: nn.Module) -> int:
    cfg = getattr(module, "config", None)
    keys = ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
            "head_dim", "sliding_window", "rope_theta")
    return fingerprint((type(module).__name__, *(getattr(cfg, k, None) for k in keys)))


def _pre_forward(module: nn.Module, args: tuple, kwargs: dict):
    state = state_of(module)
    state.routed, state.agreed, state.docs = False, False, None
    bound = inspect.signature(module.forward).bind_partial(*args, **kwargs).arguments
    extra = bound.get("kwargs", {}) if isinstance(bound.get("kwargs"), dict) else {}
    get = lambda name: bound.get(name, extra.get(name, kwargs.get(name)))  # noqa: E731
    ids = get("input_ids") if get("input_ids") is not None else get("inputs_embeds")
    pos, docs, tag = get("position_ids"), get(DOC_IDS_KEY), get(LAYOUT_KEY)
    error = collect_error(lambda: _local_checks(state, module, pos, tag, ids))
    agree(state.group, f"{type(module).__name__}.forward", {
        "model": _model_fingerprint(module),
        "seqpar_config": fingerprint(sorted(state.config.to_dict().items())),
        "inputs": _shape(ids), "position_ids": _shape(pos), "doc_ids": _shape(docs),
        "attention_mask": _shape(get("attention_mask")), "batch_tagged": tag is not None,
        "backward": torch.is_grad_enabled(),
    }, error=error, timeout_s=state.config.comm_timeout_s)
    # Document ids the attention layers need, once for the whole forward (collator batches
    # carry them; otherwise from the gathered global positions) — none inside the layers.
    state.docs = None
    if docs is None and pos is not None and ids is not None:
        state.docs = derive_doc_ids(state, pos, get("attention_mask"), ids.shape[0])
    state.agreed = True
    return None


def _local_checks(state: SPState, module: nn.Module, pos, tag, ids) -> None:
    cfg = state.config
    if ids is not None and ids.dim() >= 2:
        seq, div = ids.shape[1] * state.sp_size, cfg.seq_len_divisor
        if seq % div:
            raise ValueError(
                f"sequence length {seq} (= {ids.shape[1]} per rank x sp_size {state.sp_size}) "
                f"is not a multiple of {div} (layout={cfg.layout!r}"
                f"{', dilation' if cfg.attention == 'dilated' else ''}): pad the batch with "
                f"SPDataCollator(..., pad_to_multiple_of={div}) or "
                f"shard_batch(..., pad_to_multiple_of={div})"
            )
    if state.sp_size > 1 and pos is None:
        raise ValueError(
            f"{type(module).__name__} was called without position_ids under sequence "
            "parallelism: every rank would use local positions 0..n-1 (wrong RoPE and "
            "masks). Pass the batch through SPDataCollator / shard_batch, which add the "
            "global position_ids"
        )
    if tag is not None:
        got = [int(x) for x in tag.flatten().tolist()]
        want = [state.sp_size, LAYOUTS.index(cfg.layout), cfg.ulysses_size, state.sp_rank]
        if got != want:
            def say(t):
                return (f"sp_size={t[0]}, layout={LAYOUTS[t[1]]!r}, ulysses_size={t[2]}, "
                        f"sp_rank={t[3]}")
            raise ValueError(
                f"the batch was sharded for {say(got)} but the model runs with {say(want)}: "
                "build the collator (SPDataCollator / shard_dataloader / shard_batch) with the "
                "same SeqParConfig and SPGroups as patch(model, ...)"
            )


def _post_forward(module: nn.Module, args: tuple, output):
    if not state_of(module).routed:
        raise RuntimeError(
            f"{type(module).__name__} ran a forward without calling the {ATTN_NAME!r} "
            "attention: this model does not route attention through transformers' "
            "AttentionInterface, so it cannot be made sequence-parallel by patch()"
        )
    return None


def install(decoder: nn.Module) -> None:
    """(Re)install the hooks on ``decoder`` (the module that runs the attention layers)."""
    for handle in getattr(decoder, _HOOKS_ATTR, ()):
        handle.remove()
    setattr(decoder, _HOOKS_ATTR, (
        decoder.register_forward_pre_hook(_pre_forward, with_kwargs=True),
        decoder.register_forward_hook(_post_forward),
    ))
