"""Cached decoding (``generate``, ``past_key_values``) for a model patched with seqpar_ring.

Decoding runs a few new queries against the cached keys of the whole row: there is nothing to
shard, so at sp_size 1 it is computed here exactly, in the model's own eager form (causal over
the cache, the 2D padding mask, sliding window, sinks and soft-capping as the layer passes
them). Under sequence parallelism each rank's cache would hold only its shard, so decoding is
refused with the fix.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["cached_attention"]


def cached_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor,
                     value: torch.Tensor, attention_mask: torch.Tensor | None,
                     scaling: float | None, sp_size: int, **kwargs) -> torch.Tensor:
    """Attention of the last ``q_len`` positions of a row over its ``kv_len`` cached keys.

    query: (batch, heads, q_len, dim); key, value: (batch, kv_heads, kv_len, dim), kv_len >
    q_len; attention_mask: (batch, kv_len) 0/1 or None. Query i sits at position
    kv_len - q_len + i. Returns (batch, q_len, heads, dim).
    """
    b, h, q_len, d = query.shape
    kv_len = key.shape[2]
    if sp_size > 1:
        raise ValueError(
            f"cached decoding ({q_len} new tokens against {kv_len} cached ones: generate / "
            "past_key_values) is not supported under sequence parallelism — each rank's cache "
            "holds only its shard. Generate with the model patched at sp_size=1 (or unpatched), "
            "or pass use_cache=False")
    if q_len > kv_len:
        raise ValueError(f"{q_len} queries but only {kv_len} keys: not a cached decoding step")
    if attention_mask is not None and (attention_mask.dim() != 2
                                       or attention_mask.shape[-1] != kv_len):
        raise ValueError(
            f"cached decoding needs a 2D (batch, {kv_len}) attention_mask over the cache, got "
            f"{tuple(attention_mask.shape)}")
    groups = h // key.shape[1]
    k = key.repeat_interleave(groups, dim=1)
    v = value.repeat_interleave(groups, dim=1)
    scale = scaling if scaling is not None else d ** -0.5
    scores = torch.matmul(query, k.transpose(2, 3)).float() * scale
    softcap = kwargs.get("softcap")
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    q_pos = torch.arange(kv_len - q_len, kv_len, device=query.device)[:, None]
    k_pos = torch.arange(kv_len, device=query.device)[None, :]
    allowed = k_pos <= q_pos if getattr(module, "is_causal", True) else torch.ones_like(
        k_pos <= q_pos)
    window = kwargs.get("sliding_window")
    if window is not None:
        allowed = allowed & (k_pos > q_pos - window)  # transformers' sliding_window_overlay
    allowed = allowed.expand(b, 1, q_len, kv_len)
    if attention_mask is not None:
        allowed = allowed & attention_mask.bool()[:, None, None, :]
    scores = scores.masked_fill(~allowed, float("-inf"))
    sinks = kwargs.get("s_aux")
    if sinks is not None:  # a per-head logit that joins the denominator only (gpt-oss)
        sink = sinks.float().reshape(1, h, 1, 1).expand(b, h, q_len, 1)
        probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    else:
        probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs.to(v.dtype), v)
    return out.transpose(1, 2).contiguous()
