"""``SPTrainer``: transformers.Trainer with sequence parallelism over plain DDP or one process.

What changes against ``Trainer``:

* the model is `patch`-ed (attention, SP loss) at construction;
* train/eval DataLoaders shard samples over the DP group only (all SP ranks of a group see the
  same samples) and shard each collated batch for this SP rank (`shard_dataloader`);
* under DDP a comm hook sums gradients over SP ranks and averages over DP (`register_sp_ddp_hook`).

The logged loss and ``num_items_in_batch`` follow the Trainer's own convention (see hf_loss.py),
so logged losses equal a single-process run's on the same data.
"""

from __future__ import annotations

from typing import Any

from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from transformers import Trainer

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
        self.sp_groups = patch(self.model, sp_config, sp_groups)
        self.sp_pad_token_id = pad_token_id
        if sp_config.sp_size > 1 and not self.args.average_tokens_across_devices:
            raise ValueError(
                "SPTrainer needs TrainingArguments(average_tokens_across_devices=True): the loss "
                "is normalised by the valid-label count of all ranks"
            )
        self._sp_hooked: set[int] = set()

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
        # accelerate wraps the model in DDP inside train(): hook it before its first backward
        if (isinstance(model, DistributedDataParallel) and self.sp_groups is not None
                and id(model) not in self._sp_hooked):
            register_sp_ddp_hook(model, self.sp_groups)
            self._sp_hooked.add(id(model))
        return super().training_step(model, inputs, num_items_in_batch)
