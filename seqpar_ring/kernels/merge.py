"""Log-sum-exp merge of partial attention results: the one place where blocks are combined.

A block result is (out, lse): out (batch, heads, q_len, head_dim) is the softmax-weighted value
sum over the block's keys, lse (batch, heads, q_len) the log of that softmax's normaliser. Two
results over disjoint key sets combine into the result over their union:

    L = logaddexp(lse_a, lse_b);  out = exp(lse_a - L) * out_a + exp(lse_b - L) * out_b

Rows that no key reached have lse = -inf and out = 0. ``torch.logaddexp(-inf, -inf)`` is -inf,
but ``exp(-inf - (-inf))`` is NaN, so the weights are taken against a finite stand-in for L.
"""

from __future__ import annotations

import torch


def merge_into(
    acc_out: torch.Tensor, acc_lse: torch.Tensor, out: torch.Tensor, lse: torch.Tensor
) -> None:
    """Merge a block result into the accumulators in place.

    acc_out: (B, H, n, D) fp32/fp64; acc_lse: (B, H, n) same dtype; out: (B, H, n, D) any
    float dtype; lse: (B, H, n) fp32/fp64. Never produces NaN, also when both sides are -inf.
    """
    new_lse = torch.logaddexp(acc_lse, lse.to(acc_lse.dtype))
    safe = torch.where(torch.isinf(new_lse), torch.zeros_like(new_lse), new_lse)
    w_acc = torch.exp(acc_lse - safe).unsqueeze(-1)
    w_blk = torch.exp(lse.to(acc_lse.dtype) - safe).unsqueeze(-1)
    acc_out.mul_(w_acc).add_(out.to(acc_out.dtype) * w_blk)
    acc_lse.copy_(new_lse)


def empty_accumulators(
    q: torch.Tensor, acc_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero output and -inf lse accumulators shaped like q (B, H, n, D)."""
    out = torch.zeros(q.shape, dtype=acc_dtype, device=q.device)
    lse = torch.full(q.shape[:-1], float("-inf"), dtype=acc_dtype, device=q.device)
    return out, lse


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 stays fp64 (exactness tests); every other dtype accumulates in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32
