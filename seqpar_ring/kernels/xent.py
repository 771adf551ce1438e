"""Cross-entropy rows on GPU (Triton): one read of the logits per pass, nothing upcast in memory.

`seqpar_ring.loss` needs, for (N, V) logits in their own dtype (bf16 from an LM head), the
fp32 log-sum-exp of every row and, in backward, the gradient (softmax - onehot(label)) scaled
per row. The torch path upcasts a slice of rows at a time and makes several fp32 passes over it
(upcast, subtract, exp, scale, downcast), each slice an fp32 temporary. These kernels read each
logit once per pass, write the gradient once and allocate nothing else (on one H200, 1.1B
Mistral shape at 32K: 0.8 GiB less peak memory, step time unchanged within noise):

- ``row_lse(x)``: (N,) fp32 log-sum-exp of every row (online max / sum over vocab blocks);
- ``row_grad(x, labels, lse, weight)``: (N, V) in x's dtype,
  ``(exp(x - lse) - [col == label]) * weight[row]`` computed in fp32, rounded once.

x: (N, V) with any row stride and unit column stride; labels (N,) int64 in [0, V); lse, weight
(N,) fp32. CUDA tensors of fp32/bf16/fp16 only (`available`); `loss.py` keeps the torch path
for every other case; `tests/test_gpu_loss.py` checks these against fp64 cross entropy.
"""

from __future__ import annotations

import torch

try:  # torch's CUDA wheels ship Triton; CPU builds do not
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

__all__ = ["available", "row_lse", "row_grad"]

BLOCK_V = 4096
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def available(x: torch.Tensor) -> bool:
    """Can these kernels run on x ((N, V) logits)?"""
    return (triton is not None and x.is_cuda and x.dtype in _DTYPES and x.dim() == 2
            and x.stride(1) == 1)


if triton is not None:

    @triton.jit
    def _lse_kernel(x, out, V, stride, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        # per-lane running max and sum; lanes that saw no column keep (-inf, 0)
        m = tl.full((BLOCK,), float("-inf"), tl.float32)
        s = tl.zeros((BLOCK,), tl.float32)
        for start in range(0, V, BLOCK):
            c = start + cols
            v = tl.load(x + row * stride + c, mask=c < V, other=float("-inf")).to(tl.float32)
            new = tl.maximum(m, v)
            seen = new > float("-inf")
            s = tl.where(seen, s * tl.exp(m - new) + tl.exp(v - new), s)
            m = new
        top = tl.max(m, 0)
        total = tl.sum(tl.where(m > float("-inf"), s * tl.exp(m - top), 0.0), 0)
        tl.store(out + row, top + tl.log(total))

    @triton.jit
    def _grad_kernel(x, g, labels, lse, weight, V, sx, sg, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        inside = c < V
        w = tl.load(weight + row)
        v = tl.load(x + row * sx + c, mask=inside, other=float("-inf")).to(tl.float32)
        p = tl.exp(v - tl.load(lse + row))
        p = tl.where(c == tl.load(labels + row), p - 1.0, p)
        tl.store(g + row * sg + c, (p * w).to(g.dtype.element_ty), mask=inside)


def row_lse(x: torch.Tensor) -> torch.Tensor:
    """(N,) fp32 log-sum-exp of the rows of x (N, V)."""
    n, v = x.shape
    out = torch.empty(n, dtype=torch.float32, device=x.device)
    if n:
        _lse_kernel[(n,)](x, out, v, x.stride(0), BLOCK=BLOCK_V, num_warps=8)
    return out


def row_grad(x: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor,
             weight: torch.Tensor) -> torch.Tensor:
    """(softmax(x) - onehot(labels)) * weight[:, None] in x's dtype, (N, V)."""
    n, v = x.shape
    g = torch.empty((n, v), dtype=x.dtype, device=x.device)
    if n:
        _grad_kernel[(n, triton.cdiv(v, BLOCK_V))](
            x, g, labels.contiguous(), lse.float().contiguous(), weight.float().contiguous(),
            v, x.stride(0), g.stride(0), BLOCK=BLOCK_V, num_warps=8)
    return g
