"""Batches for sequence parallelism: collate the whole row, then keep this SP rank's shard.

Every SP rank of a group must see the SAME samples (they hold different tokens of them), so the
sampler shards the dataset over the data-parallel group only (``num_replicas=dp_size``,
``rank=dp_rank``); the collator then pads, shifts labels over the whole row, computes document
ids of packed / padded rows from the global row and shards with `seqpar_ring.layout.shard_batch`.
"""

from __future__ import annotations

from typing import Any, Callable

from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset

from seqpar_ring.config import SeqParConfig
from seqpar_ring.groups import SPGroups
from seqpar_ring.layout import doc_ids_from_positions, shard_batch

from .hf_attention import LAYOUT_KEY
from .hf_hooks import layout_tag

__all__ = ["SPDataCollator", "shard_dataloader"]


class SPDataCollator:
    """Collate with ``base`` (default ``transformers.default_data_collator``) and shard for SP.

    Output (every tensor ``(batch, seq_local)``): ``input_ids``, ``position_ids`` (global),
    ``attention_mask`` (if given), ``shift_labels`` (shifted over the whole row before sharding),
    ``labels`` (= ``shift_labels``: HF models compute a loss only when ``labels`` is given; the
    SP loss reads ``shift_labels``), ``sp_layout`` (for which SP settings and rank the batch was
    sharded: a model patched with other settings refuses it) and, for padded or packed rows,
    ``sp_doc_ids`` (document of each token, -1 = padding). Rows are right-padded to a multiple
    of ``pad_to_multiple_of`` (default ``config.seq_len_divisor``). Under causal attention
    right padding costs nothing extra: the ring treats it as part of the row's last document
    (it is in every real token's future), so such rows stay on the plain fused path; dilated
    attention accepts only that.
    """

    def __init__(
        self,
        config: SeqParConfig,
        groups: SPGroups | None = None,
        base: Callable[[list], dict] | None = None,
        *,
        pad_to_multiple_of: int | None = None,
        pad_token_id: int = 0,
    ):
        self.config, self.groups, self.base = config, groups, base
        self.pad_to_multiple_of = pad_to_multiple_of
        self.pad_token_id = pad_token_id
        if (groups.sp_size if groups is not None else 1) != config.sp_size:
            raise ValueError(f"config.sp_size={config.sp_size} does not match the groups {groups}")
        if groups is not None and groups.ulysses_size != config.ulysses_size:
            raise ValueError(f"config.ulysses_size={config.ulysses_size!r} does not match the "
                             f"groups {groups}")

    def __call__(self, features: list) -> dict[str, Any]:
        if self.base is None:
            from transformers import default_data_collator

            batch = default_data_collator(features)
        else:
            batch = self.base(features)
        return self.shard(dict(batch))

    def shard(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Shard an already collated batch of full rows ``(batch, seq)`` for this SP rank."""
        cfg = self.config
        p = cfg.sp_size
        rank = 0 if self.groups is None else self.groups.sp_rank
        ids = batch.get("input_ids", batch.get("inputs_embeds"))
        if ids is None:
            raise ValueError("SPDataCollator needs input_ids (or inputs_embeds) in the batch")
        pos = batch.get("position_ids")
        packed = None if pos is None else doc_ids_from_positions(pos)
        if cfg.attention == "dilated" and packed is not None and bool((packed[:, -1] > 0).any()):
            raise ValueError(
                "dilated attention cannot attend within packed documents (position_ids restart "
                "inside a row): use attention='ring' for packed rows, or one document per row"
            )
        multiple = self.pad_to_multiple_of or cfg.seq_len_divisor
        out = shard_batch(batch, p, rank, cfg.layout, pad_to_multiple_of=multiple,
                          pad_token_id=self.pad_token_id, ulysses_size=cfg.ulysses_size)
        # for whom the batch was sharded: a model patched with other settings refuses it
        out[LAYOUT_KEY] = layout_tag(p, cfg.layout, cfg.ulysses_size, rank)
        return out


class _SPDataLoader(DataLoader):
    """A DataLoader whose ``set_epoch`` reaches the DP sampler (HF Trainer calls it per epoch)."""

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)


def shard_dataloader(
    dataset: Dataset,
    config: SeqParConfig,
    groups: SPGroups | None = None,
    *,
    batch_size: int = 1,
    collate_fn: Callable[[list], dict] | None = None,
    shuffle: bool = True,
    seed: int = 0,
    drop_last: bool = False,
    pad_to_multiple_of: int | None = None,
    pad_token_id: int = 0,
    **loader_kwargs: Any,
) -> DataLoader:
    """DataLoader giving this rank its SP shard of the DP group's samples.

    The sampler is a ``DistributedSampler(num_replicas=dp_size, rank=dp_rank)``, so all SP ranks
    of a group draw the same samples; ``collate_fn`` collates full rows and `SPDataCollator`
    shards them. ``groups`` None: one process, no sharding.
    """
    if isinstance(dataset, IterableDataset):
        raise ValueError(
            "shard_dataloader needs a map-style dataset (DP sharding uses DistributedSampler); "
            "for an IterableDataset shard it by dp_rank yourself and use SPDataCollator"
        )
    dp, dp_rank = (1, 0) if groups is None else (groups.dp_size, groups.dp_rank)
    sampler = DistributedSampler(dataset, num_replicas=dp, rank=dp_rank, shuffle=shuffle,
                                 seed=seed, drop_last=drop_last)
    collator = SPDataCollator(config, groups, collate_fn, pad_to_multiple_of=pad_to_multiple_of,
                              pad_token_id=pad_token_id)
    return _SPDataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collator,
                         drop_last=drop_last, **loader_kwargs)
