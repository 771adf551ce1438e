"""accelerate + DeepSpeed: the same ``"sequence_parallel"`` JSON section, one call before prepare.

```bash
accelerate launch --use_deepspeed --deepspeed_config_file configs/zero3_sp.json train.py
```
```python
accelerator = Accelerator()
model = AutoModelForCausalLM.from_pretrained(...)
config, groups = setup_sequence_parallel(accelerator, model)     # before prepare()
loader = shard_dataloader(dataset, config, groups, batch_size=micro)   # NOT through prepare()
model, optimizer = accelerator.prepare(model, DummyOptim(model.parameters()))
for batch in loader:
    accelerator.backward(model(**batch).loss)
    optimizer.step(); optimizer.zero_grad()
```

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
from typing import Any

from torch import nn

from seqpar_ring import groups as sp_groups
from seqpar_ring.config import SeqParConfig
from seqpar_ring.groups import SPGroups

from .deepspeed import _world_size_before_init, prepare_model_for_zero3
from .ds_config import DS_SIZE_KEY, SECTION, config_from_args, validate_for_world

__all__ = ["setup_sequence_parallel"]


def setup_sequence_parallel(
    accelerator: Any, model: nn.Module, args: argparse.Namespace | None = None,
    *, patch_model: bool = True,
) -> tuple[SeqParConfig, SPGroups]:
    """Read the SP section of accelerate's DeepSpeed config, build groups, patch ``model``.

    ``args``: ``--sequence-parallel-*`` flags (they override the file). Call on every rank,
    after ``Accelerator()`` and before ``accelerator.prepare(model, ...)``.
    """
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        raise ValueError(
            "accelerate is not running DeepSpeed: launch with `accelerate launch --use_deepspeed "
            "--deepspeed_config_file configs/<file>.json` or pass a DeepSpeedPlugin"
        )
    live = plugin.deepspeed_config  # the dict accelerate later hands to deepspeed.initialize
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
    live[SECTION] = ds[SECTION]
    live[DS_SIZE_KEY] = cfg.sp_size
    live.pop("data_parallel_size", None)  # checked; DeepSpeed would build its own mesh from it

    groups = sp_groups.initialize(cfg.sp_size)
    if patch_model:
        from .hf import patch

        patch(model, cfg, groups)
    elif cfg.activation_offload or cfg.tiled_mlp:  # not silently ignored without patch()
        from .hf_reach import apply as apply_reach

        apply_reach(model, cfg)
    if int((ds.get("zero_optimization") or {}).get("stage", 0)) == 3:
        prepare_model_for_zero3(model, ds, groups)
    from deepspeed.utils import groups as ds_groups

    ds_groups.mpu = groups
    return cfg, groups
