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

from seqpar_ring.agreement import agree, fingerprint
from seqpar_ring.config import SeqParConfig
from seqpar_ring.groups import SPGroups
from seqpar_ring.layout import doc_ids_from_positions

from . import hf_hooks

from .hf_attention import (
    ATTN_NAME,
    SPState,
    bind,
    is_bound,
    register_interface,
    resolve_groups,
)
from .hf_batch import DOC_IDS_KEY
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
    again replaces the model's settings. With torch.distributed initialised, every rank of the
    job calls it (a one-off agreement on the settings: an ``sp_size`` or layout that differs
    between ranks raises on every rank instead of training one rank alone).
    """
    return _patch(model, config, groups)


def _patch(model: nn.Module, config: SeqParConfig, groups: SPGroups | None = None, *,
           agree_world: bool = True) -> SPGroups:
    inner = _hf_model(model)
    if not isinstance(config, SeqParConfig):
        raise ValueError(f"config must be a SeqParConfig, got {type(config).__name__}")
    if agree_world:
        _agree_world(config)
    groups = resolve_groups(config, groups)
    _check_config(inner)
    check_model(inner)  # per-layer windows / sinks / soft-capping (hf_window)
    register_interface()
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
    hf_hooks.install(inner, inner.get_decoder() if hasattr(inner, "get_decoder") else inner)
    from .hf_reach import apply as apply_reach  # activation_offload, tiled_mlp (hf_reach.py)
    apply_reach(inner, config)
    return groups


def _agree_world(config: SeqParConfig) -> None:
    """Every rank of the job patches with the same SP settings (before any group is built)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    agree(dist.group.WORLD, "patch", {"seqpar_config": fingerprint(
        sorted(config.to_dict().items()))}, timeout_s=config.comm_timeout_s)


_REGISTERED: list = []  # [(config, groups)] of register(config); the global hook's handle
_LAZY_HOOK: list = []


def register(config: SeqParConfig | None = None, groups: SPGroups | None = None) -> None:
    """Register ``"seqpar_ring"`` with transformers' attention and mask interfaces.

    With ``config``, a model loaded with ``attn_implementation="seqpar_ring"`` (and never
    patched) is patched with ``config`` (and ``groups``, as in `patch`) at its first forward:
    the same SP loss, gradient guard and hooks as `patch` — there is no second, lighter path.
    Groups are resolved now, on every rank.
    """
    register_interface()
    if config is None:
        return
    if not isinstance(config, SeqParConfig):
        raise ValueError(f"config must be a SeqParConfig, got {type(config).__name__}")
    _agree_world(config)
    _REGISTERED[:] = [(config, resolve_groups(config, groups))]
    if not _LAZY_HOOK:
        from torch.nn.modules.module import register_module_forward_pre_hook

        _LAZY_HOOK.append(register_module_forward_pre_hook(_patch_on_first_forward))


def _patch_on_first_forward(module: nn.Module, args: tuple) -> None:
    import torch
    from transformers import PreTrainedModel

    if torch.compiler.is_compiling() or not isinstance(module, PreTrainedModel) or is_bound(
            module) or not _REGISTERED:
        return None
    if getattr(module.config, "_attn_implementation", None) != ATTN_NAME:
        return None
    config, groups = _REGISTERED[0]
    _patch(module, config, groups, agree_world=False)  # register() agreed already
    return None
