"""Hugging Face transformers adapter: one call turns a loaded causal LM sequence-parallel.

```python
groups = patch(model, SeqParConfig(sp_size=2, layout="zigzag"))   # on every rank
loader = shard_dataloader(dataset, config, groups, batch_size=1, collate_fn=collate)
for batch in loader:                        # this rank's shard of its DP group's samples
    model(**batch).loss.backward()          # loss: mean over the whole sample, every SP rank
```

`patch` registers the ``"seqpar_ring"`` attention (transformers' public AttentionInterface),
switches the model to it (``set_attn_implementation``), gives the model its own settings (every
module of it maps to one `SPState`: several models with different configs coexist), installs
the SP loss (``model.loss_function``) and puts hooks on its decoder that agree the batch across
the SP ranks once per forward and check that attention really routes through the interface
(`hf_hooks`). Nothing private in transformers is patched. Gradients must be summed over the
SP ranks: plain loops call `sync_sp_gradients`, plain DDP `register_sp_ddp_hook` (SPTrainer
does it for you); DeepSpeed's mpu does it.
"""

from __future__ import annotations

from torch import nn

from seqpar_ring.config import SeqParConfig
from seqpar_ring.groups import SPGroups

from . import hf_hooks
from .hf_attention import (
    ATTN_NAME,
    DOC_IDS_KEY,
    SPState,
    bind,
    doc_ids_from_positions,
    register,
    resolve_groups,
)
from .hf_data import SPDataCollator, shard_dataloader
from .hf_grads import sync_sp_gradients, track
from .hf_loss import SPCausalLMLoss, register_sp_ddp_hook
from .hf_window import check_model

__all__ = [
    "ATTN_NAME",
    "DOC_IDS_KEY",
    "patch",
    "register",
    "resolve_groups",
    "doc_ids_from_positions",
    "SPDataCollator",
    "shard_dataloader",
    "SPCausalLMLoss",
    "register_sp_ddp_hook",
    "sync_sp_gradients",
]

def _hf_model(model: nn.Module) -> nn.Module:
    """The transformers PreTrainedModel inside ``model`` (PEFT wrappers are unwrapped)."""
    from transformers import PreTrainedModel

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not isinstance(inner, PreTrainedModel):
        raise ValueError(
            f"patch() needs a transformers PreTrainedModel (or a PEFT model around one), got "
            f"{type(model).__name__}; for plain modules use seqpar_ring.modules.sp_attention"
        )
    return inner


def _check_config(model: nn.Module) -> None:
    cfg = model.config
    drop = getattr(cfg, "attention_dropout", 0.0) or 0.0
    if drop > 0:
        raise ValueError(
            f"{type(model).__name__} has attention_dropout={drop}; seqpar_ring attention has no "
            "dropout. Set model.config.attention_dropout = 0.0 before patch()"
        )


def patch(model: nn.Module, config: SeqParConfig, groups: SPGroups | None = None) -> SPGroups:
    """Make ``model`` (a transformers causal LM, possibly PEFT-wrapped) sequence-parallel.

    The model's attention calls use ``config`` and the SP ``groups`` (default: the groups of
    `seqpar_ring.groups.get_groups()`, or new ones from ``config.sp_size`` if torch.distributed
    is up; sp_size 1 -> None, local); other models keep theirs. Returns the groups. Patching
    again replaces the model's settings.
    """
    inner = _hf_model(model)
    if not isinstance(config, SeqParConfig):
        raise ValueError(f"config must be a SeqParConfig, got {type(config).__name__}")
    groups = resolve_groups(config, groups)
    _check_config(inner)
    check_model(inner)  # per-layer windows / sinks / soft-capping (hf_window)
    register()
    bind(model, SPState(config=config, groups=groups))
    inner.set_attn_implementation(ATTN_NAME)
    if inner.config._attn_implementation != ATTN_NAME:
        raise ValueError(
            f"{type(inner).__name__} does not route attention through transformers' "
            "AttentionInterface (set_attn_implementation refused), so seqpar_ring cannot "
            "replace its attention"
        )
    inner.loss_function = SPCausalLMLoss(groups)
    track(inner, groups)  # optimizer.step() refuses gradients never summed over SP
    # On the decoder, not the LM wrapper: explicit-loss paths (hf_tiled) call it directly.
    hf_hooks.install(inner.get_decoder() if hasattr(inner, "get_decoder") else inner)
    from .hf_reach import apply as apply_reach  # activation_offload, tiled_mlp (hf_reach.py)
    apply_reach(inner, config)
    return groups
