"""The structure of one forward's batch — documents and padding — computed from its own tensors.

Every attention layer of a forward (and its recomputation under gradient checkpointing) must
see the documents of THAT forward's batch. So the model's pre-forward hook (`hf_hooks`) computes
them once from the call's own tensors and adds them to the call's keyword arguments, which HF
decoders hand down to every attention call; gradient checkpointing keeps a layer's keyword
arguments for its recomputation. Nothing is cached between calls: two forwards before one
backward, an eval forward in between, or a mask changed in place all stay exact.

Sources, first match wins (``doc_ids``: (batch, seq_local) int64, 0, 1, ... per row, -1 =
padding; None = every row is one plain document):

1. ``sp_doc_ids`` given by the batch (`SPDataCollator`, `seqpar_ring.shard_batch`);
2. ``cu_seq_lens_q``/``cu_seq_lens_k`` or ``seq_idx`` (transformers' flattening collator for
   FlashAttention), one process only — they describe an unsharded row;
3. global ``position_ids`` (a new document wherever they do not step by +1) and the 2D
   ``attention_mask`` (0 = padding), gathered over the SP group in one collective;
4. at sp_size 1 without ``position_ids``: the ``attention_mask`` alone (positions 0..S-1, as the
   model itself uses them).
"""

from __future__ import annotations

from typing import Callable

import torch

from seqpar_ring.layout import DOC_IDS_KEY, doc_ids_from_positions, gather, shard

__all__ = ["AGREED_KEY", "DOC_IDS_KEY", "batch_doc_ids", "check_doc_ids", "check_flash_kwargs",
           "check_mask"]

AGREED_KEY = "sp_agreed"  # model kwarg: the SP ranks agreed on this forward's batch (hf_hooks)
FLASH_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "seq_idx")


def check_mask(mask) -> None:
    """A mask the ring can use: 2D (batch, seq_local) of 0/1, or None."""
    if mask is not None and (not isinstance(mask, torch.Tensor) or mask.dim() != 2):
        what = f"a {mask.dim()}D" if isinstance(mask, torch.Tensor) else f"a {type(mask).__name__}"
        raise ValueError(
            f"seqpar_ring attention got {what} attention_mask: it takes a 2D (batch, seq) mask "
            "of 0 (padding) and 1. A 3D/4D mask describes the local block only and cannot be "
            "split across the ring: pass the 2D padding mask, and position_ids that restart at "
            f"0 for packed documents (or {DOC_IDS_KEY!r} with a document id per token)"
        )


def check_doc_ids(doc_ids, shape: tuple[int, ...]) -> None:
    """``sp_doc_ids`` given by the batch: an integer (batch, seq_local) tensor."""
    if not isinstance(doc_ids, torch.Tensor):
        raise ValueError(f"{DOC_IDS_KEY} must be a tensor, got {type(doc_ids).__name__}")
    if doc_ids.dtype in (torch.bool,) or doc_ids.is_floating_point() or doc_ids.is_complex():
        raise ValueError(
            f"{DOC_IDS_KEY} must hold integer document ids (-1 = padding), got dtype "
            f"{doc_ids.dtype}: build it with SPDataCollator / shard_batch or cast it with .long()"
        )
    if tuple(doc_ids.shape) != tuple(shape):
        raise ValueError(f"{DOC_IDS_KEY} must be (batch, seq_local) = {tuple(shape)}, got "
                         f"{tuple(doc_ids.shape)}")


def check_flash_kwargs(get: Callable, sp_size: int) -> None:
    """cu_seq_lens_q/k and seq_idx are taken at sp_size 1 only."""
    if sp_size > 1 and any(get(k) is not None for k in FLASH_KEYS):
        raise ValueError(
            "cu_seq_lens_q/k and seq_idx describe the whole flattened row, not this rank's "
            "shard: under sequence parallelism drop them and shard the flattened batch with "
            "SPDataCollator / shard_batch (its position_ids, restarting at 0 per document, "
            "give the documents)")


def _from_flash_kwargs(get: Callable, batch: int, seq: int, device) -> torch.Tensor:
    cu_q, cu_k, seq_idx = (get(k) for k in FLASH_KEYS)
    if cu_q is not None or cu_k is not None:
        if cu_q is None or cu_k is None or not torch.equal(cu_q.cpu(), cu_k.cpu()):
            raise ValueError(
                "cu_seq_lens_q and cu_seq_lens_k must both be given and equal (self-attention "
                "over the same flattened documents)")
        bounds = cu_q.to(device=device, dtype=torch.long).flatten()
        if batch != 1 or int(bounds[0]) != 0 or int(bounds[-1]) != seq or bool(
                (bounds[1:] < bounds[:-1]).any()):
            raise ValueError(
                f"cu_seq_lens_q={bounds.tolist()} does not describe one flattened row of {seq} "
                f"tokens (batch {batch}): it must start at 0, grow, and end at {seq}")
        doc = torch.bucketize(torch.arange(seq, device=device), bounds[1:], right=True)
        return doc.unsqueeze(0)
    if tuple(seq_idx.shape) != (batch, seq):
        raise ValueError(f"seq_idx must be (batch, seq) = {(batch, seq)}, got "
                         f"{tuple(seq_idx.shape)}")
    return seq_idx.to(device=device, dtype=torch.long)


def batch_doc_ids(get: Callable, batch: int, seq_local: int, device, *, group, sp_size: int,
                  sp_rank: int, layout: str, ulysses_size: int) -> torch.Tensor | None:
    """This rank's document ids for one forward, from the call's own tensors (module doc).

    ``get(name)``: the call's argument ``name`` or None. Returns (batch, seq_local) int64 on
    ``device`` or None (plain rows). Collective over ``group`` (sp_size > 1, source 3 only):
    every SP rank calls it at the same point of the same forward.
    """
    check_flash_kwargs(get, sp_size)
    given = get(DOC_IDS_KEY)
    if given is not None:
        check_doc_ids(given, (batch, seq_local))
        return given.to(device=device, dtype=torch.long)
    mask, pos = get("attention_mask"), get("position_ids")
    check_mask(mask)
    if any(get(k) is not None for k in FLASH_KEYS):
        doc = _from_flash_kwargs(get, batch, seq_local, device)
        return doc if mask is None else doc.masked_fill(mask.to(device) == 0, -1)
    if pos is None:
        if mask is None or sp_size > 1:
            return None  # sp > 1 without positions is refused by the hook's checks
        pos = torch.arange(seq_local, device=device).expand(batch, seq_local)
    local = pos.to(device).expand(batch, -1).long()
    both = torch.stack([local, torch.ones_like(local) if mask is None else
                        mask.to(device=device, dtype=torch.long)], dim=-1)
    full = gather(both, group, layout, dim=1, ulysses_size=ulysses_size) if sp_size > 1 else both
    if sp_size > 1:
        _check_global(full[..., 0], sp_size, layout, ulysses_size, seq_local)
    doc = doc_ids_from_positions(full[..., 0], None if mask is None else full[..., 1])
    if doc is None or sp_size == 1:
        return doc
    return shard(doc, sp_size, sp_rank, layout, dim=1, ulysses_size=ulysses_size)


def _check_global(full_pos: torch.Tensor, p: int, layout: str, u: int, n: int) -> None:
    # Per-shard positions 0..n-1 on every rank look like packed documents one shard long; that
    # is what a loop that forgot to pass global positions produces, so it is refused. Real
    # documents of exactly one shard come with their ids from SPDataCollator / shard_batch.
    shard_pos = torch.arange(n, device=full_pos.device, dtype=full_pos.dtype)
    if all(bool((shard(full_pos, p, r, layout, ulysses_size=u) == shard_pos).all())
           for r in range(p)):
        raise ValueError(
            "position_ids restart at 0 on every SP rank: they are per-shard positions, not "
            "global ones. Pass global position_ids (SPDataCollator / shard_batch make them); "
            f"for documents exactly one shard long, pass {DOC_IDS_KEY!r} as well "
            "(SPDataCollator / shard_batch do)"
        )
