"""Tiled LM-head loss for transformers causal LMs: one explicit call per training step.

```python
use_tiled_lm_head(model)                            # once; before deepspeed.initialize
engine, *_ = seqpar_ring.integrations.deepspeed.initialize(model=model, ...)
for batch in loader:                                # SPDataCollator / shard_dataloader batches
    loss = tiled_causal_lm_loss(engine.module, batch, engine.seqpar_groups)
    engine.backward(loss)                           # instead of engine(**batch).loss
    engine.step()
```

`use_tiled_lm_head` replaces the model's output embedding by a `seqpar_ring.tiled.TiledLMHead`
owning the same Parameters. Called by the model's own forward (``model(**batch)``: evaluation,
generation, the regular loss) it is the plain linear layer and returns logits. The tiled loss
comes only from `tiled_causal_lm_loss`, which runs the model's decoder for the final hidden
states and calls the head with the labels and the SP group, so the (tokens x vocab) logits
never exist. Nothing else changes — no hook, no replacement of ``model.loss_function`` — so
`integrations.hf.patch` and `use_tiled_lm_head` can be applied in any order, and
``model(**batch).loss`` remains the SP loss that ``patch`` installed. The value and gradients
equal that loss (token mean over the SP group; each rank's backward gives its share, which
DeepSpeed's mpu sums over the SP ranks).

Under DeepSpeed pass ``engine.module`` (ZeRO-3 gathers parameters per module, so calling the
decoder and the head directly is what ``engine(...)`` does inside). Under PyTorch DDP use the
regular loss: calling the wrapped module past DDP's forward skips DDP's bookkeeping.
"""

from __future__ import annotations

import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from seqpar_ring.groups import SPGroups
from seqpar_ring.tiled import TiledLMHead

__all__ = ["use_tiled_lm_head", "tiled_causal_lm_loss"]

# config keys of models that transform the logits after the head: the tiled loss would skip it
_UNSUPPORTED = ("final_logit_softcapping", "logit_scale", "output_multiplier_scale")


def _causal_lm(model: nn.Module) -> nn.Module:
    """The transformers model inside ``model`` (PEFT wrappers are unwrapped)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not (hasattr(inner, "get_output_embeddings") and hasattr(inner, "get_decoder")):
        raise ValueError(f"expected a transformers causal LM (or a PEFT model around one), got "
                         f"{type(model).__name__}; for other models call "
                         "seqpar_ring.tiled.tiled_lm_loss(hidden, weight, shift_labels, group)")
    return inner


def use_tiled_lm_head(model: nn.Module, tile_size: int | None = None) -> TiledLMHead:
    """Replace ``model``'s LM head by a `TiledLMHead` (same Parameters); returns the head.

    ``tile_size``: tokens per tile (None = about 2**26 logits per tile). Call before
    ``deepspeed.initialize`` (ZeRO-3 attaches its hooks to the modules present then); calling
    again only updates the tile size. Models that transform the logits after the head
    (soft-capping, logit scale) are refused.
    """
    inner = _causal_lm(model)
    head = inner.get_output_embeddings()
    if isinstance(head, TiledLMHead):
        head.tile_size = tile_size
        return head
    cfg = getattr(inner, "config", None)
    text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    for key in _UNSUPPORTED:
        if getattr(text_cfg, key, None) not in (None, 1.0):
            raise ValueError(f"{type(inner).__name__} applies `{key}` to the logits after the "
                             "LM head; the tiled loss would skip it. Use the model's loss "
                             "(integrations.hf.patch installs the SP one)")
    new = TiledLMHead(head, tile_size=tile_size)
    inner.set_output_embeddings(new)
    return new


def tiled_causal_lm_loss(model: nn.Module, batch: dict,
                         groups: SPGroups | dist.ProcessGroup | None, *,
                         num_items: float | Tensor | None = None) -> Tensor:
    """The causal-LM loss of ``batch`` through the tiled head: decoder forward, then the head.

    ``batch``: model inputs of this rank (``input_ids``, ``position_ids``, ``attention_mask``,
    the collator's document ids, ...) plus ``shift_labels`` (batch, seq_local) shifted over the
    whole row before sharding (`SPDataCollator`, `shard_batch`); without SP, ``labels`` is
    accepted and shifted here. ``groups``: the `SPGroups` the batch was sharded for (e.g.
    ``engine.seqpar_groups``), or the SP ProcessGroup; None = no SP. ``num_items``: optional
    denominator instead of the SP group's valid-label count. Returns the fp32 token-mean loss,
    the same on every SP rank.
    """
    inner = _causal_lm(model)
    head = inner.get_output_embeddings()
    if not isinstance(head, TiledLMHead):
        raise ValueError("the model's LM head is not a TiledLMHead: call "
                         "use_tiled_lm_head(model) once, before deepspeed.initialize")
    group = getattr(groups, "sp_group", groups)
    sp = 1 if group is None else dist.get_world_size(group)
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "shift_labels")}
    shift = batch.get("shift_labels")
    if shift is None:
        labels = batch.get("labels")
        if labels is None:
            raise ValueError("batch has neither shift_labels nor labels")
        if sp > 1:
            raise ValueError("under sequence parallelism pass shift_labels (shifted over the "
                             "whole row before sharding: SPDataCollator / shard_batch)")
        shift = F.pad(labels[:, 1:], (0, 1), value=head.ignore_index)
    if sp > 1 and inputs.get("position_ids") is None:
        raise ValueError("batch has no position_ids under sequence parallelism: every rank "
                         "would use local positions 0..n-1. Pass it through SPDataCollator / "
                         "shard_batch")
    out = inner.get_decoder()(**inputs, use_cache=False)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    # hidden goes positionally: ZeRO-3's module hooks see positional inputs only
    return head(hidden, shift.to(hidden.device), None if sp == 1 else group,
                num_items=num_items)
