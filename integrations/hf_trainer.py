"""``SPTrainer``: transformers.Trainer with sequence parallelism over plain DDP or one process.

What changes against ``Trainer``:

* the model is `patch`-ed (attention, SP loss) at construction;
* train/eval DataLoaders shard samples over the DP group only (all SP ranks of a group see the
  same samples) and shard each collated batch for this SP rank (`shard_dataloader`);
* the gradient sum over SP ranks is made to hold in every parallel mode the Trainer can be in:
  under DDP a comm hook sums over SP and averages over DP (`register_sp_ddp_hook`); under
  DeepSpeed (``TrainingArguments(deepspeed=...)``) the SP x DP groups become DeepSpeed's mpu
  (`setup_sequence_parallel`, the JSON's ``"sequence_parallel"`` section must agree with
  ``sp_config``); any other mode (no DDP wrapper, e.g. CPU without ``use_cpu=True``; FSDP;
  DataParallel) is refused at construction, naming the fix.

The logged loss and ``num_items_in_batch`` follow the Trainer's own convention (see hf_loss.py),
so logged losses equal a single-process run's on the same data.
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from transformers import Trainer
from transformers.training_args import ParallelMode

from seqpar_ring.config import SeqParConfig
from seqpar_ring.groups import SPGroups

from .hf import patch
from .hf_data import shard_dataloader
from .hf_loss import register_sp_ddp_hook

__all__ = ["SPTrainer"]


class SPTrainer(Trainer):
    """``Trainer(model, args, ..., sp_config=SeqParConfig(sp_size=...), sp_groups=None)``.

    ``data_collator`` collates FULL rows (default ``default_data_collator``); SP sharding,
    padding to the layout's multiple and document ids are added on top.
    """

    def __init__(self, *args: Any, sp_config: SeqParConfig, sp_groups: SPGroups | None = None,
                 pad_token_id: int = 0, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.sp_config = sp_config
        self.sp_pad_token_id = pad_token_id
        if sp_config.sp_size > 1:
            self._check_parallel_mode()
            if not self.args.average_tokens_across_devices:
                raise ValueError(
                    "SPTrainer needs TrainingArguments(average_tokens_across_devices=True): the "
                    "loss is normalised by the valid-label count of all ranks"
                )
        self.sp_groups = patch(self.model, sp_config, sp_groups)
        if sp_config.sp_size > 1 and self.is_deepspeed_enabled:
            self._setup_deepspeed()
        self._sp_hooked: set[int] = set()

    def _check_parallel_mode(self) -> None:
        """Refuse every mode in which nothing would sum the gradients over the SP ranks."""
        mode = self.args.parallel_mode
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if mode != ParallelMode.DISTRIBUTED:
            raise ValueError(
                f"SPTrainer: {world} processes run, but TrainingArguments resolved parallel_mode="
                f"{mode.value} (world_size={self.args.world_size}): accelerate found no "
                "distributed setup, so the Trainer would not wrap the model in DDP and the SP "
                "ranks' gradients would never be summed (each rank would train on its own tokens "
                "only and the ranks would drift apart). On CPU pass TrainingArguments(..., "
                "use_cpu=True); on GPUs launch with torchrun, accelerate launch or deepspeed so "
                "every process has a LOCAL_RANK"
            )
        if self.is_fsdp_enabled:
            raise ValueError(
                "SPTrainer does not support FSDP: FSDP averages gradients over all ranks, while "
                "the SP ranks' shares must be summed. Use DDP or DeepSpeed (ZeRO-3 partitions "
                "parameters like FSDP)"
            )

    def _setup_deepspeed(self) -> None:
        """DeepSpeed must reduce over our SP x DP groups: hand them over as its mpu."""
        from .accelerate import setup_sequence_parallel

        cfg, groups = setup_sequence_parallel(self.accelerator, self.model, patch_model=False)
        if cfg != self.sp_config:
            raise ValueError(
                f"SPTrainer(sp_config={self.sp_config}) differs from the DeepSpeed config's "
                f"sequence_parallel section ({cfg}): make them equal (e.g. sp_config="
                "seqpar_ring.integrations.deepspeed.split_config(path)[0]) or add the section "
                "to the JSON"
            )
        self.sp_groups = patch(self.model, cfg, groups)

    def _sp_loader(self, dataset, batch_size: int, shuffle: bool) -> DataLoader:
        return shard_dataloader(
            dataset, self.sp_config, self.sp_groups, batch_size=batch_size,
            collate_fn=self.data_collator, shuffle=shuffle, seed=self.args.seed,
            drop_last=self.args.dataloader_drop_last, pad_token_id=self.sp_pad_token_id,
            num_workers=self.args.dataloader_num_workers,
        )

    def get_train_dataloader(self) -> DataLoader:
        if self.train_dataset is None:
            raise ValueError("SPTrainer: training requires a train_dataset")
        return self._sp_loader(self.train_dataset, self.args.per_device_train_batch_size, True)

    def get_eval_dataloader(self, eval_dataset=None) -> DataLoader:
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if isinstance(dataset, str):
            dataset = self.eval_dataset[dataset]
        if dataset is None:
            raise ValueError("SPTrainer: evaluation requires an eval_dataset")
        return self._sp_loader(dataset, self.args.per_device_eval_batch_size, False)

    def training_step(self, model, inputs, num_items_in_batch=None):
        # accelerate wraps the model in DDP or DeepSpeed inside train(): check (and hook DDP)
        # before the first backward
        if self.sp_groups is not None and self.sp_groups.sp_size > 1 \
                and id(model) not in self._sp_hooked:
            self._check_wrapper(model)
            self._sp_hooked.add(id(model))
        return super().training_step(model, inputs, num_items_in_batch)

    def _check_wrapper(self, model) -> None:
        g = self.sp_groups
        if isinstance(model, DistributedDataParallel):
            register_sp_ddp_hook(model, g)
            return
        if self.is_deepspeed_enabled:
            got = (getattr(model, "dp_world_size", None), getattr(model, "seq_dp_world_size", None))
            if got != (g.dp_size, g.sp_size * g.dp_size):
                raise RuntimeError(
                    f"SPTrainer: DeepSpeed reduces over (dp, sp*dp) = {got}, expected "
                    f"{(g.dp_size, g.sp_size * g.dp_size)} for {g}: it did not take the SP "
                    "groups as its mpu"
                )
            return
        raise RuntimeError(
            f"SPTrainer: the Trainer runs the model as {type(model).__name__}, neither DDP nor "
            "DeepSpeed, so nothing would sum the gradients over the SP ranks. Run it under "
            "DDP (TrainingArguments(use_cpu=True) on CPU, or a launcher on GPUs) or DeepSpeed"
        )
