"""GPU block kernels: PyTorch's fused SDPA operators that also return the log-sum-exp.

The public ``scaled_dot_product_attention`` hides the lse, so the ring calls the aten ops
behind it (cuDNN and FlashAttention-2 backends) and their backward ops directly. The backward
ops are called with the MERGED out and lse of the whole ring: they recompute the block's
probabilities as exp(s - lse) and use rowsum(dout * out), which is exactly the block's share of
the full attention gradient.

Layout as in ``torch_kernel``: q (batch, heads, q_len, head_dim), k/v (batch, kv_heads, k_len,
head_dim). ``causal=True`` is used only for diagonal blocks (q and k cover the same positions),
where the ops' top-left causal mask is the right one.
"""

from __future__ import annotations

import torch

aten = torch.ops.aten


def _expand_kv(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, Hkv, n, D) -> (B, heads, n, D) for backward ops that want equal head counts."""
    if x.shape[1] == heads:
        return x
    return x.repeat_interleave(heads // x.shape[1], dim=1)


def _fold_kv_grad(dx: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """Sum the per-query-head K/V gradients of a group, in fp32 (bf16 sums lose bits)."""
    b, h, n, d = dx.shape
    if h == kv_heads:
        return dx
    return dx.unflatten(1, (kv_heads, h // kv_heads)).sum(2, dtype=torch.float32)


class CudnnKernel:
    """cuDNN fused attention (fastest on Hopper for bf16/fp16 in BENCHMARKS.md)."""

    name = "cudnn"
    supports_doc_ids = False
    needs_delta = False

    @staticmethod
    def forward(q, k, v, *, causal, scale, q_doc=None, k_doc=None, bucket_size=None):
        res = aten._scaled_dot_product_cudnn_attention(
            q, k, v, None, True, 0.0, causal, False, scale=scale
        )
        return res[0], res[1].view(q.shape[:-1])

    @staticmethod
    def backward(dout, q, k, v, out, lse, *, causal, scale, q_doc=None, k_doc=None,
                 bucket_size=None, delta=None):
        h, hkv = q.shape[1], k.shape[1]
        ke, ve = _expand_kv(k, h), _expand_kv(v, h)
        zero = torch.zeros((), dtype=torch.int64, device=q.device)
        dq, dk, dv = aten._scaled_dot_product_cudnn_attention_backward(
            dout, q, ke, ve, out, lse.unsqueeze(-1).contiguous(), zero, zero, None,
            None, None, q.shape[2], k.shape[2], 0.0, causal, scale=scale,
        )
        return dq, _fold_kv_grad(dk, hkv), _fold_kv_grad(dv, hkv)


class FlashKernel:
    """FlashAttention-2 backend of SDPA."""

    name = "flash"
    supports_doc_ids = False
    needs_delta = False

    @staticmethod
    def forward(q, k, v, *, causal, scale, q_doc=None, k_doc=None, bucket_size=None):
        res = aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)
        return res[0], res[1]

    @staticmethod
    def backward(dout, q, k, v, out, lse, *, causal, scale, q_doc=None, k_doc=None,
                 bucket_size=None, delta=None):
        h, hkv = q.shape[1], k.shape[1]
        ke, ve = _expand_kv(k, h), _expand_kv(v, h)
        zero = torch.zeros((), dtype=torch.int64, device=q.device)
        dq, dk, dv = aten._scaled_dot_product_flash_attention_backward(
            dout, q, ke, ve, out, lse.contiguous(), None, None, q.shape[2], k.shape[2],
            0.0, causal, zero, zero, scale=scale,
        )
        return dq, _fold_kv_grad(dk, hkv), _fold_kv_grad(dv, hkv)
