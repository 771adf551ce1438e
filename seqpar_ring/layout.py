"""Where each token lives: contiguous and zigzag sharding of a sequence over the SP ranks.

Layouts for p ranks and a sequence of S tokens (S must be a multiple of ``seq_len_divisor``):

* ``contiguous``: rank r holds tokens [r*S/p, (r+1)*S/p).
* ``zigzag``: the sequence is cut into 2p chunks of S/(2p); rank r holds chunk r followed by
  chunk 2p-1-r. Under a causal mask every rank then does the same amount of work.

Ulysses x ring (``ulysses_size`` u > 1, ring size r = p/u; `seqpar_ring.ulysses`): SP rank
s = i·u + j (ring rank i, Ulysses rank j) holds the j-th of u equal consecutive pieces of what
ring rank i holds under ``layout`` over r ranks, in that rank's local order. The all-to-all over
Ulysses group i puts its members' pieces one after the other in order j = 0..u-1, which is
exactly ring rank i's shard: no reordering, and the ring sees the usual zigzag / contiguous
layout over r ranks. Example, S = 16, p = 4, u = r = 2, zigzag (4 chunks of 4 over the ring):
ring rank 0 holds [0..3, 12..15], ring rank 1 [4..11]; SP ranks 0, 1, 2, 3 hold [0..3],
[12..15], [4..7], [8..11]. u = 1 is the plain layout. The divisor stays p (contiguous) or 2p
(zigzag).

Every function shards along ``dim`` (default 1: tensors are ``(batch, seq, ...)``).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from .comm import DEFAULT_TIMEOUT_S, all_gather_flat
from .config import LAYOUTS

__all__ = [
    "seq_len_divisor",
    "chunk_ranges",
    "local_positions",
    "shard",
    "unshard",
    "gather",
    "shard_batch",
    "doc_ids_from_positions",
    "DOC_IDS_KEY",
]

DOC_IDS_KEY = "sp_doc_ids"  # batch key / model kwarg: (batch, seq_local) document id per token


def _check(sp_size: int, layout: str, sp_rank: int | None = None, ulysses_size: int = 1) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is not one of {LAYOUTS}")
    if isinstance(sp_size, bool) or not isinstance(sp_size, int) or sp_size < 1:
        raise ValueError(f"sp_size={sp_size!r} must be an integer >= 1")
    if sp_rank is not None and not 0 <= sp_rank < sp_size:
        raise ValueError(f"sp_rank={sp_rank!r} must be in [0, {sp_size}) for sp_size={sp_size}")
    u = ulysses_size
    if isinstance(u, bool) or not isinstance(u, int) or u < 1:
        hint = (" (resolve 'auto' first: seqpar_ring.tools.plan.resolve_ulysses_size)"
                if u == "auto" else "")
        raise ValueError(f"ulysses_size={u!r} must be an integer >= 1{hint}")
    if sp_size % u:
        raise ValueError(f"ulysses_size({u}) does not divide sp_size({sp_size})")


def seq_len_divisor(sp_size: int, layout: str) -> int:
    """The multiple every total sequence length must be: p (contiguous) or 2p (zigzag).

    One rank holds the whole row in order whatever the layout, so sp_size 1 needs nothing (1).
    """
    _check(sp_size, layout)
    return sp_size * (2 if layout == "zigzag" and sp_size > 1 else 1)


def chunk_ranges(
    seq_len: int, sp_size: int, sp_rank: int, layout: str, ulysses_size: int = 1
) -> list[tuple[int, int]]:
    """``[(global_start, length), ...]`` owned by ``sp_rank``, in local order.

    contiguous -> one chunk; zigzag -> chunk r then chunk 2p-1-r. With ``ulysses_size`` u > 1:
    piece j of u of ring rank i's ranges over p/u ranks, for sp_rank = i·u + j (module doc).
    """
    _check(sp_size, layout, sp_rank, ulysses_size)
    div = seq_len_divisor(sp_size, layout)
    if seq_len % div != 0:
        raise ValueError(
            f"seq_len={seq_len} is not a multiple of {div} (layout={layout!r}, "
            f"sp_size={sp_size}): pad the batch, e.g. shard_batch(..., pad_to_multiple_of={div})"
        )
    if ulysses_size > 1:
        ring_rank, piece = divmod(sp_rank, ulysses_size)
        ring = chunk_ranges(seq_len, sp_size // ulysses_size, ring_rank, layout)
        return _slice_ranges(ring, piece * (seq_len // sp_size), seq_len // sp_size)
    if layout == "contiguous" or sp_size == 1:
        n = seq_len // sp_size
        return [(sp_rank * n, n)]
    c = seq_len // (2 * sp_size)
    return [(sp_rank * c, c), ((2 * sp_size - 1 - sp_rank) * c, c)]


def _slice_ranges(ranges: list[tuple[int, int]], offset: int, length: int) -> list[tuple[int, int]]:
    """Local tokens [offset, offset + length) of ``ranges`` as global ranges, in local order."""
    out, pos = [], 0
    for start, n in ranges:
        lo, hi = max(offset, pos), min(offset + length, pos + n)
        if lo < hi:
            out.append((start + lo - pos, hi - lo))
        pos += n
    return out


def local_positions(
    seq_len: int, sp_size: int, sp_rank: int, layout: str, ulysses_size: int = 1
) -> torch.LongTensor:
    """``(seq_len // p,)`` global positions of the rank's tokens, in local order."""
    ranges = chunk_ranges(seq_len, sp_size, sp_rank, layout, ulysses_size)
    return torch.cat([torch.arange(s, s + n) for s, n in ranges])  # type: ignore[return-value]


def shard(
    x: Tensor, sp_size: int, sp_rank: int, layout: str, dim: int = 1, ulysses_size: int = 1
) -> Tensor:
    """The rank's tokens of ``x`` along ``dim``: ``(..., S, ...)`` -> ``(..., S/p, ...)``."""
    ranges = chunk_ranges(x.shape[dim], sp_size, sp_rank, layout, ulysses_size)
    parts = [x.narrow(dim, s, n) for s, n in ranges]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


def unshard(
    shards: Sequence[Tensor], layout: str, dim: int = 1, ulysses_size: int = 1
) -> Tensor:
    """Inverse of ``[shard(x, p, r, layout, dim, ulysses_size) for r in range(p)]``."""
    p = len(shards)
    _check(p, layout, ulysses_size=ulysses_size)
    n = shards[0].shape[dim]
    if any(s.shape[dim] != n for s in shards):
        raise ValueError(
            f"shards differ in length along dim {dim}: {[s.shape[dim] for s in shards]}; "
            "pass the shards of one tensor, one per sp_rank in order"
        )
    if ulysses_size > 1:
        pieces = []  # (global start, tensor) of every range of every rank, then sorted
        for r, s in enumerate(shards):
            local = 0
            for start, m in chunk_ranges(n * p, p, r, layout, ulysses_size):
                pieces.append((start, s.narrow(dim, local, m)))
                local += m
        return torch.cat([t for _, t in sorted(pieces, key=lambda x: x[0])], dim=dim)
    if layout == "contiguous" or p == 1:
        return torch.cat(list(shards), dim=dim)
    if n % 2 != 0:
        raise ValueError(f"zigzag shards hold two equal chunks, got odd length {n} on dim {dim}")
    c = n // 2
    chunks: list[Tensor | None] = [None] * (2 * p)
    for r, s in enumerate(shards):
        chunks[r] = s.narrow(dim, 0, c)
        chunks[2 * p - 1 - r] = s.narrow(dim, c, c)
    return torch.cat(chunks, dim=dim)  # type: ignore[arg-type]


def gather(
    x_local: Tensor, group: dist.ProcessGroup | None, layout: str, dim: int = 1,
    ulysses_size: int = 1,
) -> Tensor:
    """All-gather the shards of ``x_local`` over ``group`` and put tokens back in global order.

    ``(..., S/p, ...)`` -> ``(..., S, ...)`` on every rank. ``group`` None or of size 1: no
    communication (returns ``x_local``). Not differentiable: for outputs, metrics and tests.
    ``group`` is the whole SP group (group rank = sp_rank), also under Ulysses x ring.
    """
    if group is None or dist.get_world_size(group) == 1:
        return x_local
    x = x_local.detach().contiguous()
    p = dist.get_world_size(group)
    parts = all_gather_flat(x, group, DEFAULT_TIMEOUT_S, "layout.gather").view(p, *x.shape)
    return unshard(list(parts.unbind(0)), layout, dim=dim, ulysses_size=ulysses_size)


def doc_ids_from_positions(position_ids: Tensor, attention_mask: Tensor | None = None
                           ) -> Tensor | None:
    """Document ids of GLOBAL rows: a new document starts where positions do not step by +1.

    position_ids, attention_mask: (batch, seq) in global token order. Returns (batch, seq) int64
    (0, 1, ... per row; -1 where attention_mask == 0), or None when no row is packed or padded.
    """
    pos = position_ids
    starts = torch.ones_like(pos, dtype=torch.bool)
    starts[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
    doc = starts.long().cumsum(1) - 1
    pad = None if attention_mask is None else attention_mask == 0
    if not bool((doc[:, -1] > 0).any()) and (pad is None or not bool(pad.any())):
        return None
    return doc if pad is None else doc.masked_fill(pad, -1)


def _positive(n: Any) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"pad_to_multiple_of={n!r} must be an integer >= 1")
    return n


def _pad_right(x: Tensor, amount: int, value: Any) -> Tensor:
    shape = list(x.shape)
    shape[1] = amount
    return torch.cat([x, torch.full(shape, value, dtype=x.dtype, device=x.device)], dim=1)


def shard_batch(
    batch: dict[str, Any],
    sp_size: int,
    sp_rank: int,
    layout: str,
    *,
    pad_to_multiple_of: int | None = None,
    pad_token_id: int = 0,
    ignore_index: int = -100,
    ulysses_size: int = 1,
) -> dict[str, Any]:
    """Shard an HF-style batch of ``(batch, seq, ...)`` tensors for one SP rank.

    1. ``labels`` (if given) are shifted over the WHOLE row into ``shift_labels`` (position t
       holds the label of token t+1, the last is ``ignore_index``; labels of tokens with
       ``attention_mask == 0`` become ``ignore_index``). Shifting after sharding would lose the
       first label of every shard. The output's ``labels`` is the same tensor as
       ``shift_labels``: HF models compute a loss only when ``labels`` is given, and then use
       ``shift_labels`` as given (no second shift). A given ``shift_labels`` is kept.
    2. ``position_ids`` are made global (``0..S-1`` per row) when absent, since RoPE and causal
       masks need each token's global position, not its position in the shard.
       ``sp_doc_ids`` (`DOC_IDS_KEY`), the document of every token (-1 = padding), is added when
       a row is packed (positions restart) or padded (``attention_mask`` 0, or the padding of
       step 3): the attention then needs no collective to find the documents, and documents
       exactly one shard long are told apart from per-shard positions. A given one is kept.
    3. With ``pad_to_multiple_of`` the row is padded on the right to a multiple of
       lcm(pad_to_multiple_of, seq_len_divisor): ``input_ids`` with ``pad_token_id``,
       ``attention_mask`` 0, labels ``ignore_index``, positions continue, other tensors 0.
       No ``attention_mask`` is created: right padding with ignored labels is invisible to the
       real tokens under a causal mask.
    4. Every tensor with sequence dim 1 is sharded with `shard` (``ulysses_size``: the
       Ulysses x ring placement of the module doc); other values pass unchanged.
    """
    div = seq_len_divisor(sp_size, layout)
    _check(sp_size, layout, sp_rank, ulysses_size)
    seq = {k: v for k, v in batch.items() if isinstance(v, Tensor) and v.dim() >= 2}
    if not seq:
        raise ValueError("shard_batch needs at least one (batch, seq, ...) tensor, e.g. input_ids")
    ref = next((k for k in ("input_ids", "inputs_embeds", "labels") if k in seq), next(iter(seq)))
    bsz, seq_len = seq[ref].shape[:2]
    for k, v in seq.items():
        if tuple(v.shape[:2]) != (bsz, seq_len):
            raise ValueError(
                f"batch[{k!r}] has shape {tuple(v.shape)} but {ref!r} is ({bsz}, {seq_len}, ...): "
                "sequence parallelism needs every per-token tensor as (batch, seq, ...) "
                "(4D attention masks are not supported: pass a 2D attention_mask)"
            )

    out = dict(batch)
    mask = seq.get("attention_mask")
    labels = out.pop("labels", None)
    if "shift_labels" not in seq and isinstance(labels, Tensor):
        if mask is not None:
            labels = labels.masked_fill(mask == 0, ignore_index)
        seq["shift_labels"] = _pad_right(labels[:, 1:], 1, ignore_index)
    seq.pop("labels", None)
    if "position_ids" not in seq:
        device = seq[ref].device
        seq["position_ids"] = torch.arange(seq_len, device=device).expand(bsz, seq_len)
    amount = 0 if pad_to_multiple_of is None else -seq_len % math.lcm(
        _positive(pad_to_multiple_of), div)
    if DOC_IDS_KEY not in seq:
        doc = doc_ids_from_positions(seq["position_ids"], mask)
        if doc is None and amount:
            doc = torch.zeros_like(seq["position_ids"], dtype=torch.long)
        if doc is not None:  # + 1: padding below adds 0, which becomes -1 (padding) after sharding
            seq[DOC_IDS_KEY] = doc + 1
    else:
        seq[DOC_IDS_KEY] = seq[DOC_IDS_KEY] + 1

    if pad_to_multiple_of is not None:
        if amount:
            for k, v in seq.items():
                if k == "position_ids":
                    step = torch.arange(1, amount + 1, device=v.device, dtype=v.dtype)
                    seq[k] = torch.cat([v, v[:, -1:] + step], dim=1)
                else:
                    value = {"input_ids": pad_token_id, "shift_labels": ignore_index}.get(k, 0)
                    seq[k] = _pad_right(v, amount, value)
    elif seq_len % div != 0:
        raise ValueError(
            f"seq_len={seq_len} is not a multiple of {div} (layout={layout!r}, "
            f"sp_size={sp_size}): pass pad_to_multiple_of={div} to shard_batch"
        )

    for k, v in seq.items():
        out[k] = shard(v, sp_size, sp_rank, layout, dim=1, ulysses_size=ulysses_size)
    if DOC_IDS_KEY in out:
        out[DOC_IDS_KEY] = out[DOC_IDS_KEY] - 1
    if "shift_labels" in out:
        out["labels"] = out["shift_labels"]
    return out
