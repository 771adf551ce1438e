"""accelerate + DeepSpeed: the same ``"sequence_parallel"`` JSON section, one call before prepare.

```bash
accelerate launch --num_processes 8 --use_deepspeed \
    --deepspeed_config_file configs/zero3_sp.json train.py
```
```python
accelerator = Accelerator()
model = AutoModelForCausalLM.from_pretrained(...)
config, groups = setup_sequence_parallel(accelerator, model)     # before prepare()
loader = shard_dataloader(dataset, config, groups, batch_size=micro)   # NOT through prepare()
# the config has an "optimizer" section: accelerate then wants a DummyOptim here
model, optimizer = accelerator.prepare(model, DummyOptim(model.parameters()))
for batch in loader:
    accelerator.backward(model(**batch).loss)
    optimizer.step(); optimizer.zero_grad()
```

Wrong states it can see are errors naming the fix (called after ``prepare``; not running
DeepSpeed; ``train_micro_batch_size_per_gpu: "auto"``, which accelerate could only fill from a
loader passed to ``prepare``). One it cannot fix is reported: on CPU accelerate 1.15 has no
multi-process DeepSpeed mode, so ``accelerator.num_processes`` is 1 and ``is_main_process`` is
true on every rank; training is still right (our groups come from the process group), but
rank-0-only work must test ``torch.distributed.get_rank() == 0``.

accelerate 1.15 calls ``deepspeed.initialize`` without an ``mpu`` (its own sequence parallelism
is DeepSpeed-Ulysses). DeepSpeed then reads its process groups from the module-level
``deepspeed.utils.groups.mpu`` (the slot its engine fills from an ``mpu`` argument), so
`setup_sequence_parallel` puts our `SPGroups` there, and DeepSpeed's config code takes the
data-parallel size from the top-level ``sequence_parallel_size`` (world / sp). The data loader
must not go through ``accelerator.prepare``: accelerate would shard it over all sp x dp ranks,
whereas the ranks of one SP group must read the same samples (`shard_dataloader` shards over DP).
"""

from __future__ import annotations

import argparse
import warnings
from typing import Any

import torch.distributed as dist
from torch import nn

from seqpar_ring import groups as sp_groups
from seqpar_ring.config import SeqParConfig
from seqpar_ring.groups import SPGroups

from .deepspeed import (
    _init_distributed,
    _resolve_auto,
    _world_size_before_init,
    prepare_model_for_zero3,
)
from .ds_config import DS_SIZE_KEY, SECTION, config_from_args, validate_for_world
from .hf_grads import mark_reduced_by

__all__ = ["setup_sequence_parallel"]


def setup_sequence_parallel(
    accelerator: Any, model: nn.Module, args: argparse.Namespace | None = None,
    *, patch_model: bool = True, seq_len: int | None = None,
) -> tuple[SeqParConfig, SPGroups]:
    """Read the SP section of accelerate's DeepSpeed config, build groups, patch ``model``.

    ``args``: ``--sequence-parallel-*`` flags (they override the file). Call on every rank,
    after ``Accelerator()`` and before ``accelerator.prepare(model, ...)``. ``seq_len``: total
    tokens per sample, needed only to resolve ``ulysses_size="auto"``.
    """
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        raise ValueError(
            "accelerate is not running DeepSpeed: launch with `accelerate launch --num_processes "
            "<N> --use_deepspeed --deepspeed_config_file configs/<file>.json` or pass a "
            "DeepSpeedPlugin"
        )
    from deepspeed import DeepSpeedEngine

    if isinstance(model, DeepSpeedEngine) or getattr(accelerator, "_models", None):
        raise ValueError(
            "setup_sequence_parallel must run before accelerator.prepare(model, ...): DeepSpeed "
            "has to see the SP groups (its mpu) and the patched model when prepare builds the "
            "engine. Call it right after loading the model"
        )
    live = plugin.deepspeed_config  # the dict accelerate later hands to deepspeed.initialize
    if live.get("train_micro_batch_size_per_gpu") == "auto":
        raise ValueError(
            "train_micro_batch_size_per_gpu is \"auto\" in the DeepSpeed config: accelerate fills "
            "it from a data loader passed to prepare(), but under SP the loader must come from "
            "shard_dataloader and stay out of prepare(). Write the number (rows per SP group)"
        )
    cfg, ds = config_from_args(args, live)
    if ds.get("train_batch_size") == "auto":
        # accelerate fills "auto" with micro * grad_acc * world_size, counting the SP ranks as
        # data parallel; without the key DeepSpeed derives micro * grad_acc * (world / sp).
        del ds["train_batch_size"]
        del live["train_batch_size"]
    # the process group's size, not accelerator.num_processes: accelerate 1.15 reports 1 for
    # DeepSpeed on CPU (gloo), where it has no multi-process DeepSpeed mode
    world = _world_size_before_init() or accelerator.num_processes
    validate_for_world(cfg, ds, world)
    cfg = _resolve_auto(cfg, ds, model, seq_len)
    live[SECTION] = ds[SECTION]
    live[DS_SIZE_KEY] = cfg.sp_size
    live.pop("data_parallel_size", None)  # checked; DeepSpeed would build its own mesh from it

    if dist.is_initialized():  # accelerate started the process group; DeepSpeed's comm wraps it
        _init_distributed(None)
    groups = sp_groups.initialize(cfg.sp_size, ulysses_size=cfg.ulysses_size)
    _explain_process_count(accelerator, world)
    if patch_model:
        from .hf import patch

        patch(model, cfg, groups)
    elif cfg.activation_offload or cfg.tiled_mlp:  # not silently ignored without patch()
        from .hf_reach import apply as apply_reach

        apply_reach(model, cfg)
    mark_reduced_by(model, "deepspeed", groups)  # its mpu sums over SP: no second sum, no check
    if int((ds.get("zero_optimization") or {}).get("stage", 0)) == 3:
        prepare_model_for_zero3(model, ds, groups)
    from deepspeed.utils import groups as ds_groups

    ds_groups.mpu = groups
    return cfg, groups


def _explain_process_count(accelerator: Any, world: int) -> None:
    """accelerate 1.15 counts one process under DeepSpeed on CPU: say what that breaks."""
    if accelerator.num_processes == world:
        return
    if dist.get_rank() == 0:
        warnings.warn(
            f"accelerate reports num_processes={accelerator.num_processes} but {world} processes "
            "run (accelerate has no multi-process DeepSpeed mode on CPU): every rank sees "
            "is_main_process=True and accelerator.gather/num_processes are wrong. Sequence "
            "parallelism and DeepSpeed use the process group and train correctly; guard "
            "rank-0-only work (saving, printing) with torch.distributed.get_rank() == 0",
            stacklevel=3,
        )
