"""Forward hooks `patch` puts on a model's decoder: one agreement per forward, input checks.

Before the decoder runs, the SP ranks agree — in one small exchange, before any other
collective of the step — on what makes their attention calls match: the batch's shapes, the
model's architecture and dtypes, the SP settings, whether labels are given and whether a
backward will follow. Checks that can fail on one rank (missing ``position_ids``, a batch
sharded for another layout or rank, a 4D mask, float doc ids) travel in the same exchange, so
every rank raises the same error. The hook then adds the forward's documents (`hf_batch`) and
an "agreed" flag to the decoder's keyword arguments, which reach every attention call of that
forward and its recomputation under gradient checkpointing: those calls skip their own
exchange, so the hot path has no collective and no host sync besides the ring's own traffic.
The hook on the causal LM around the decoder only notes whether labels were given.

After the decoder ran, a routing check makes sure the attention really went through the
``"seqpar_ring"`` interface (a model that bypasses it would silently attend locally).
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from seqpar_ring.agreement import agree, collect_error, fingerprint
from seqpar_ring.config import LAYOUTS

from .hf_attention import ATTN_NAME, LAYOUT_KEY, SPState, state_of
from .hf_batch import AGREED_KEY, DOC_IDS_KEY, check_doc_ids, check_flash_kwargs, check_mask

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


def _dtypes(module: nn.Module, docs) -> tuple:
    """Dtypes that change the ring's messages: parameters, autocast, the batch's doc ids."""
    param = next(module.parameters(), None)
    device = "cpu" if param is None else param.device.type
    cast = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
    return (str(None if param is None else param.dtype), str(cast),
            str(docs.dtype) if isinstance(docs, torch.Tensor) else None)


def _cache(get):
    """The KV cache the caller passed (generate does; a training forward passes none)."""
    return get("cache") if get("cache") is not None else get("past_key_values")


def _decoding(get) -> bool:
    """Does this forward continue a cache (generate's decoding steps)?"""
    length = getattr(_cache(get), "get_seq_length", None)
    return bool(length is not None and length() > 0)


def _outer_pre_forward(module: nn.Module, args: tuple, kwargs: dict):
    # The causal-LM wrapper sees the labels; its decoder (hooked below) agrees on them.
    labels = kwargs.get("labels")  # HF computes a loss (a collective under SP) only with it
    if labels is None and args:
        bound = inspect.signature(module.forward).bind_partial(*args).arguments
        labels = bound.get("labels")
    state_of(module).labels = labels is not None
    return None


def _pre_forward(module: nn.Module, args: tuple, kwargs: dict):
    """One agreement per forward, then this forward's documents added to its kwargs."""
    state = state_of(module)
    state.routed = False
    labels, state.labels = state.labels, None  # read once: set by this call's outer model
    bound = inspect.signature(module.forward).bind_partial(*args, **kwargs).arguments
    extra = bound.get("kwargs", {}) if isinstance(bound.get("kwargs"), dict) else {}
    get = lambda name: bound.get(name, extra.get(name, kwargs.get(name)))  # noqa: E731
    ids = get("input_ids") if get("input_ids") is not None else get("inputs_embeds")
    pos, docs, tag = get("position_ids"), get(DOC_IDS_KEY), get(LAYOUT_KEY)
    decoding = _decoding(get)
    error = collect_error(lambda: _local_checks(state, module, get, ids, decoding))
    agree(state.group, f"{type(module).__name__}.forward", {
        "model": _model_fingerprint(module), "dtypes": _dtypes(module, docs),
        "seqpar_config": fingerprint(sorted(state.config.to_dict().items())),
        "inputs": _shape(ids), "position_ids": _shape(pos), "doc_ids": _shape(docs),
        "attention_mask": _shape(get("attention_mask")), "batch_tagged": tag is not None,
        "backward": torch.is_grad_enabled(), "labels": labels, "decoding": decoding,
    }, error=error, timeout_s=state.config.comm_timeout_s)
    if decoding or ids is None:
        return None  # cached decoding: hf_decode, no documents
    # The documents of THIS forward, from its own tensors, added to the call: HF hands them to
    # every attention call, and gradient checkpointing keeps them for the recomputation.
    kwargs = dict(kwargs)
    kwargs[DOC_IDS_KEY] = state.doc_ids(get, ids.shape[0], ids.shape[1], ids.device)
    kwargs[AGREED_KEY] = True
    return args, kwargs


def _local_checks(state: SPState, module: nn.Module, get, ids, decoding: bool) -> None:
    cfg = state.config
    pos, tag = get("position_ids"), get(LAYOUT_KEY)
    check_mask(get("attention_mask"))
    check_flash_kwargs(get, state.sp_size)
    if get(DOC_IDS_KEY) is not None and ids is not None:
        check_doc_ids(get(DOC_IDS_KEY), tuple(ids.shape[:2]))
    if state.sp_size > 1 and _cache(get) is not None:
        raise ValueError(
            "cached decoding (generate / past_key_values) is not supported under sequence "
            "parallelism — each rank's cache would hold only its shard. Generate with the model "
            "patched at sp_size=1 (or unpatched), or pass use_cache=False")
    if not decoding and ids is not None and ids.dim() >= 2:
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


def install(model: nn.Module, decoder: nn.Module) -> None:
    """(Re)install the hooks on ``decoder`` (the module that runs the attention layers) and on
    ``model``, the causal LM around it (labels)."""
    params = inspect.signature(decoder.forward).parameters.values()
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        raise ValueError(
            f"{type(decoder).__name__}.forward takes no **kwargs, so the batch's documents "
            "cannot reach its attention layers: this model cannot be made sequence-parallel by "
            "patch()")
    for module in (model, decoder):
        for handle in getattr(module, _HOOKS_ATTR, ()):
            handle.remove()
        setattr(module, _HOOKS_ATTR, ())
    setattr(decoder, _HOOKS_ATTR, (
        decoder.register_forward_pre_hook(_pre_forward, with_kwargs=True),
        decoder.register_forward_hook(_post_forward),
    ))
    if model is not decoder:
        setattr(model, _HOOKS_ATTR, (
            model.register_forward_pre_hook(_outer_pre_forward, with_kwargs=True),))
