"""Hugging Face transformers adapter: one call turns a loaded causal LM sequence-parallel.

```python
groups = patch(model, SeqParConfig(sp_size=2, layout="zigzag"))   # on every rank
loader = shard_dataloader(dataset, config, groups, batch_size=1, collate_fn=collate)
for batch in loader:                        # this rank's shard of its DP group's samples
    model(**batch).loss.backward()          # loss: mean over the whole sample, every SP rank
```

`patch` registers the ``"seqpar_ring"`` attention (transformers' public AttentionInterface),
switches the model to it (``set_attn_implementation``), installs the SP loss
(``model.loss_function``) and adds forward hooks that check position_ids were given and that
the model really routes its attention through the interface. Nothing private in transformers
is patched. Gradients must be summed over the SP ranks: plain loops call `sync_sp_gradients`,
plain DDP `register_sp_ddp_hook` (SPTrainer does it for you); DeepSpeed's mpu does it.
"""

from __future__ import annotations

import inspect

import torch.distributed as dist
from torch import nn

from seqpar_ring.config import SeqParConfig
from seqpar_ring.groups import SPGroups, get_groups, initialize

from .hf_attention import ATTN_NAME, DOC_IDS_KEY, doc_ids_from_positions, get_state, register
from .hf_data import SPDataCollator, shard_dataloader
from .hf_grads import sync_sp_gradients, track
from .hf_loss import SPCausalLMLoss, register_sp_ddp_hook

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

_HOOKS_ATTR = "_seqpar_ring_hooks"


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


def _pre_forward(module: nn.Module, args: tuple, kwargs: dict):
    state = get_state()
    state.calls = 0
    if state.sp_size > 1:
        bound = inspect.signature(module.forward).bind_partial(*args, **kwargs).arguments
        if bound.get("position_ids") is None and kwargs.get(DOC_IDS_KEY) is None:
            raise ValueError(
                f"{type(module).__name__} was called without position_ids under sequence "
                "parallelism: every rank would use local positions 0..n-1 (wrong RoPE and "
                "masks). Pass the batch through SPDataCollator / shard_batch"
            )
    return None


def _post_forward(module: nn.Module, args: tuple, output):
    if get_state().calls == 0:
        raise RuntimeError(
            f"{type(module).__name__} ran a forward without calling the {ATTN_NAME!r} "
            "attention: this model does not route attention through transformers' "
            "AttentionInterface, so it cannot be made sequence-parallel by patch()"
        )
    return None


def patch(model: nn.Module, config: SeqParConfig, groups: SPGroups | None = None) -> SPGroups:
    """Make ``model`` (a transformers causal LM, possibly PEFT-wrapped) sequence-parallel.

    Records ``config`` and the SP ``groups`` for the attention function (default: the groups
    of `seqpar_ring.groups.get_groups()`, or new ones from ``config.sp_size`` if
    torch.distributed is up; sp_size 1 -> None, local). Returns the groups. Idempotent.
    """
    inner = _hf_model(model)
    groups = resolve_groups(config, groups)
    _check_config(inner)
    register(config, groups)
    inner.set_attn_implementation(ATTN_NAME)
    if inner.config._attn_implementation != ATTN_NAME:
        raise ValueError(
            f"{type(inner).__name__} does not route attention through transformers' "
            "AttentionInterface (set_attn_implementation refused), so seqpar_ring cannot "
            "replace its attention"
        )
    inner.loss_function = SPCausalLMLoss(groups)
    track(inner, groups)  # optimizer.step() refuses gradients never summed over SP
    for handle in getattr(inner, _HOOKS_ATTR, ()):
        handle.remove()
    setattr(inner, _HOOKS_ATTR, (
        inner.register_forward_pre_hook(_pre_forward, with_kwargs=True),
        inner.register_forward_hook(_post_forward),
    ))
    from .hf_reach import apply as apply_reach  # activation_offload, tiled_mlp (hf_reach.py)
    apply_reach(inner, config)
    return groups
