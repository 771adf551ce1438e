"""Naive, independent reference implementations used by the exactness tests.

Nothing here imports or mirrors ``seqpar_ring``: these functions work on FULL sequences and are
written for clarity (Python loops, explicit masks), not speed. Fine for S <= ~128.

Shapes: q (B, S, H, D); k, v (B, S, Hkv, D) with H % Hkv == 0; query head h reads K/V head
h // (H / Hkv).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

NEG_INF = float("-inf")


def expand_kv_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, S, Hkv, D) -> (B, S, heads, D): query head h gets K/V head h // (heads // Hkv)."""
    kv_heads = x.shape[2]
    if heads % kv_heads != 0:
        raise ValueError(f"heads ({heads}) must be a multiple of kv_heads ({kv_heads})")
    return x.repeat_interleave(heads // kv_heads, dim=2)


def sdpa_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    scale: float | None = None,
    doc_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax attention over full sequences; returns (B, S, H, D).

    With ``doc_ids`` (B, S): key j is visible to query i iff doc_ids[i] == doc_ids[j] and
    doc_ids[j] >= 0 (and j <= i when causal). Rows with no visible key give exactly 0.
    """
    heads, head_dim = q.shape[2], q.shape[3]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    k = expand_kv_heads(k, heads)
    v = expand_kv_heads(v, heads)
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))  # (B, H, S, D)
    if doc_ids is None:
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal, scale=scale)
        return out.transpose(1, 2)

    seq = q.shape[1]
    visible = (doc_ids[:, :, None] == doc_ids[:, None, :]) & (doc_ids[:, None, :] >= 0)
    if causal:
        visible = visible & torch.ones(seq, seq, dtype=torch.bool).tril()
    scores = scale * (qt @ kt.transpose(-1, -2))  # (B, H, S, S)
    scores = scores.masked_fill(~visible[:, None], NEG_INF)
    # Subtracting a constant per row leaves softmax unchanged, so a detached max is exact;
    # rows with no visible key use 0 so that exp() gives 0 instead of NaN.
    row_max = scores.amax(dim=-1, keepdim=True).detach()
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    weights = torch.exp(scores - row_max)
    denom = weights.sum(dim=-1, keepdim=True)
    denom = torch.where(denom > 0, denom, torch.ones_like(denom))
    out = (weights @ vt) / denom
    return out.transpose(1, 2)


def validate_dilated(
    seq_len: int, segment_lengths: Sequence[int], dilation_rates: Sequence[int]
) -> None:
    """Raise ValueError for every rule of docs/dilated.md "What is refused"."""
    w_list, r_list = list(segment_lengths), list(dilation_rates)
    if len(w_list) == 0 or len(r_list) == 0:
        raise ValueError(f"segment_lengths {w_list} and dilation_rates {r_list} must be non-empty")
    if len(w_list) != len(r_list):
        raise ValueError(
            f"segment_lengths {w_list} (len {len(w_list)}) and dilation_rates {r_list} "
            f"(len {len(r_list)}) must have the same length"
        )
    for name, values in (("segment_lengths", w_list), ("dilation_rates", r_list)):
        for value in values:
            if value < 1:
                raise ValueError(f"{name} holds {value}; every value must be >= 1")
    for w, r in zip(w_list, r_list):
        if w % r != 0:
            raise ValueError(f"segment length {w} is not a multiple of dilation rate {r}")
        w_eff = min(w, seq_len)
        if seq_len % w_eff != 0:
            raise ValueError(
                f"sequence length {seq_len} is not a multiple of segment length {w_eff}"
            )


def dilated_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    causal: bool,
    scale: float | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """LongNet dilated attention exactly as docs/dilated.md defines it, on the full sequence.

    Returns out (B, S, H, D) and, with ``return_lse``, the merged L (B, S, H) (-inf where no
    branch selects the position).
    """
    batch, seq, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    if heads % kv_heads != 0:
        raise ValueError(f"heads ({heads}) must be a multiple of kv_heads ({kv_heads})")
    validate_dilated(seq, segment_lengths, dilation_rates)
    group = heads // kv_heads
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale

    branch_out, branch_lse = [], []
    for w, r in zip(segment_lengths, dilation_rates):
        w_eff = min(w, seq)
        o_i = q.new_zeros(batch, seq, heads, head_dim)
        lse_i = q.new_full((batch, seq, heads), NEG_INF)
        for h in range(heads):
            offset = h % r
            kv_h = h // group
            for s in range(seq // w_eff):
                positions = list(range(s * w_eff + offset, (s + 1) * w_eff, r))
                if not positions:
                    continue
                idx = torch.tensor(positions)
                q_sel = q[:, idx, h]  # (B, n, D)
                k_sel = k[:, idx, kv_h]
                v_sel = v[:, idx, kv_h]
                scores = scale * (q_sel @ k_sel.transpose(-1, -2))  # (B, n, n)
                if causal:
                    allowed = idx[None, :] <= idx[:, None]  # key position <= query position
                    scores = scores.masked_fill(~allowed, NEG_INF)
                o_i[:, idx, h] = torch.softmax(scores, dim=-1) @ v_sel
                lse_i[:, idx, h] = torch.logsumexp(scores, dim=-1)
        branch_out.append(o_i)
        branch_lse.append(lse_i)

    lse = torch.stack(branch_lse)  # (m, B, S, H)
    outs = torch.stack(branch_out)  # (m, B, S, H, D)
    # out = sum_i exp(lse_i - L) o_i with L = logsumexp_i lse_i, written with a detached
    # finite shift so that all -inf rows give 0 (and no NaN reaches the gradients).
    shift = lse.amax(dim=0).detach()
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
    weights = torch.exp(lse - shift)  # 0 where lse_i = -inf
    total = weights.sum(dim=0)
    safe_total = torch.where(total > 0, total, torch.ones_like(total))
    out = (weights[..., None] * outs).sum(dim=0) / safe_total[..., None]
    if not return_lse:
        return out
    merged = torch.where(total > 0, shift + torch.log(safe_total), torch.full_like(total, NEG_INF))
    return out, merged


def shard_reference(
    x: torch.Tensor, sp_size: int, sp_rank: int, layout: str, dim: int = 1
) -> torch.Tensor:
    """Tokens of rank ``sp_rank`` along ``dim``: contiguous = chunk r of p; zigzag = chunks
    r and 2p-1-r of 2p (in that order)."""
    if layout == "contiguous":
        return x.chunk(sp_size, dim=dim)[sp_rank]
    if layout == "zigzag":
        chunks = x.chunk(2 * sp_size, dim=dim)
        return torch.cat([chunks[sp_rank], chunks[2 * sp_size - 1 - sp_rank]], dim=dim)
    raise ValueError(f"unknown layout {layout!r}")


def positions_reference(seq_len: int, sp_size: int, sp_rank: int, layout: str) -> torch.Tensor:
    """Global token positions held by a rank, in local order."""
    return shard_reference(torch.arange(seq_len)[None], sp_size, sp_rank, layout)[0]


def window_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int | None,
    scale: float | None = None,
    doc_ids: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention with transformers' sliding window and gpt-oss sinks; returns (B, S, H, D).

    Key j is visible to query i iff j <= i, i - j < ``window`` (None: no window) and, with
    ``doc_ids``, both share a document id >= 0. ``sinks`` (H,): one extra logit per head in
    every row's softmax whose value is zero. Rows with no visible key (and no sink) give 0.
    """
    heads, head_dim = q.shape[2], q.shape[3]
    seq = q.shape[1]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    qt, kt, vt = (x.transpose(1, 2) for x in (q, expand_kv_heads(k, heads),
                                              expand_kv_heads(v, heads)))
    i = torch.arange(seq).view(seq, 1)
    j = torch.arange(seq).view(1, seq)
    visible = (j <= i) & ((i - j < window) if window is not None else True)
    visible = visible.view(1, seq, seq).expand(q.shape[0], seq, seq)
    if doc_ids is not None:
        visible = visible & (doc_ids[:, :, None] == doc_ids[:, None, :]) & (
            doc_ids[:, None, :] >= 0)
    scores = scale * (qt @ kt.transpose(-1, -2))
    scores = scores.masked_fill(~visible[:, None], NEG_INF)
    if sinks is not None:
        col = sinks.view(1, heads, 1, 1).expand(q.shape[0], heads, seq, 1).to(scores.dtype)
        scores = torch.cat([scores, col], dim=-1)
    row_max = scores.amax(dim=-1, keepdim=True).detach()
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    weights = torch.exp(scores - row_max)
    denom = weights.sum(dim=-1, keepdim=True)
    denom = torch.where(denom > 0, denom, torch.ones_like(denom))
    probs = weights / denom
    if sinks is not None:
        probs = probs[..., :-1]
    return (probs @ vt).transpose(1, 2)
