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

import functools
from types import SimpleNamespace

import torch

from ..schedule import VarlenSpec
from .band import band_backward, band_forward

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


def _tokens_major(x: torch.Tensor) -> torch.Tensor:
    """(1, H, n, D) -> (n, H, D), the varlen ops' layout: a view for the model's memory."""
    t = x[0].transpose(0, 1)
    return t if t.is_contiguous() else t.contiguous()


def flash_varlen_args(band, max_q: int, max_k: int) -> tuple[int, int, dict]:
    """max_seqlen_q, max_seqlen_k and window arguments of a FlashAttention-2 varlen call whose
    sequences have at most ``max_q`` queries and ``max_k`` keys, for a sliding-window ``band``
    (left, right|None) or None. Both max_seqlen values are upper bounds for the op.

    - max_seqlen_q >= 2: at 1 with GQA, the op swaps the query heads into the sequence dim
      assuming one query per sequence, which breaks on varlen calls with empty sequences.
    - The op's window is bottom-right aligned like the band, but it reads an open right side
      (-1) as ``max_seqlen_k`` keys right of the diagonal, and any side >= max_seqlen_k as open.
      On a sequence with more queries than keys the diagonal starts left of the first key, so
      that bound cuts off the first rows (they came back empty: lse +inf, NaN after the
      merge). An open right side is passed as ``max_q`` instead — no key lies further right of
      any row's diagonal — and max_seqlen_k is raised above it so the op keeps it.
    """
    mq = max(max_q, 2)
    if band is None:
        return mq, max_k, {}
    left, right = band
    right = max_q if right is None else right
    return mq, max(max_k, right + 1), dict(window_size_left=left, window_size_right=right)


def varlen_forward(q, k, v, spec, *, causal, scale, bucket_size=None, band=None):
    """FlashAttention-2 varlen: sequences laid end to end (``spec``: `schedule.VarlenSpec`).

    q (1, H, q_total, D), k/v (1, Hkv, k_total, D) (GQA read directly). Returns out
    (1, H, q_total, D) and lse (1, H, q_total) fp32. The op writes lse = +inf for rows whose
    sequence has no key (padding gaps); the merge needs -inf there. ``band``: a sliding window
    applied inside every sequence (`window.py`).
    """
    cu_q, cu_k = spec.cu_seqlens(q.device)
    max_q, max_k, window = flash_varlen_args(band, spec.max_q, spec.max_k)
    out, lse = aten._flash_attention_forward(
        _tokens_major(q), _tokens_major(k), _tokens_major(v), cu_q, cu_k, max_q, max_k, 0.0,
        causal, False, scale=scale, **window)[:2]
    if spec.has_empty:
        lse = lse.masked_fill(lse == float("inf"), float("-inf"))
    return out.transpose(0, 1).unsqueeze(0), lse.unsqueeze(0)


def varlen_backward(dout, q, k, v, out, lse, spec, *, causal, scale, bucket_size=None,
                    delta=None, band=None):
    """Gradients of `varlen_forward` given the MERGED out/lse. K/V grads keep Hkv heads."""
    cu_q, cu_k = spec.cu_seqlens(q.device)
    max_q, max_k, window = flash_varlen_args(band, spec.max_q, spec.max_k)
    zero = torch.zeros((), dtype=torch.int64, device=q.device)
    dq, dk, dv = aten._flash_attention_backward(
        _tokens_major(dout), _tokens_major(q), _tokens_major(k), _tokens_major(v),
        _tokens_major(out), lse[0].contiguous(), cu_q, cu_k, max_q, max_k, 0.0, causal,
        zero, zero, scale=scale, **window)
    return (dq.transpose(0, 1).unsqueeze(0), dk.transpose(0, 1).unsqueeze(0),
            dv.transpose(0, 1).unsqueeze(0))


def _rows_major(x: torch.Tensor) -> torch.Tensor:
    """(B, H, n, D) -> (B*n, H, D): a view for the model's memory with B = 1, else a copy."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b * n, h, d)


def _batch_spec(q, k) -> VarlenSpec:
    return _spec(q.shape[0], q.shape[2], k.shape[2])


@functools.lru_cache(maxsize=64)
def _spec(b: int, nq: int, nk: int) -> VarlenSpec:
    """One spec per block shape: its offsets are copied to the device once, not per call."""
    return VarlenSpec.of(((nq, nk),) * b)


def flash_band_forward(q, k, v, *, band, scale, causal=False):
    """A block (every batch entry one sequence) on FlashAttention-2, with the window of a
    sliding-window ``band`` if any (no element-wise mask); ``causal`` (band None) on squares.
    q (B, H, nq, D), k/v (B, Hkv, nk, D) -> out (B, H, nq, D), lse (B, H, nq) fp32. cuDNN has
    no window: its kernel sends here the bands `band.py` cannot rebuild from causal calls, and
    the calls too small for it (`CUDNN_MIN_ROWS`)."""
    b, h, nq, d = q.shape
    spec = _batch_spec(q, k)
    cu_q, cu_k = spec.cu_seqlens(q.device)
    max_q, max_k, window = flash_varlen_args(band, spec.max_q, spec.max_k)
    out, lse = aten._flash_attention_forward(
        _rows_major(q), _rows_major(k), _rows_major(v), cu_q, cu_k, max_q, max_k, 0.0,
        causal, False, scale=scale, **window)[:2]
    return out.view(b, nq, h, d).transpose(1, 2), lse.view(h, b, nq).transpose(0, 1)


def flash_band_backward(dout, q, k, v, out, lse, *, band, scale, causal=False):
    """Gradients of `flash_band_forward` given the MERGED out/lse; dk/dv keep Hkv heads."""
    b, h, nq, d = q.shape
    spec = _batch_spec(q, k)
    cu_q, cu_k = spec.cu_seqlens(q.device)
    max_q, max_k, window = flash_varlen_args(band, spec.max_q, spec.max_k)
    zero = torch.zeros((), dtype=torch.int64, device=q.device)
    dq, dk, dv = aten._flash_attention_backward(
        _rows_major(dout), _rows_major(q), _rows_major(k), _rows_major(v), _rows_major(out),
        lse.transpose(0, 1).reshape(h, b * nq).contiguous(), cu_q, cu_k, max_q, max_k, 0.0,
        causal, zero, zero, scale=scale, **window)
    nk, hkv = k.shape[2], k.shape[1]
    return (dq.view(b, nq, h, d).transpose(1, 2), dk.view(b, nk, hkv, d).transpose(1, 2),
            dv.view(b, nk, hkv, d).transpose(1, 2))


# cuDNN rejects s_q = s_kv = 1 ("cuDNN Frontend error") and crashed on other tiny shapes; calls
# with fewer rows on a side (tiny windows' blocks, a window's sliver of a rectangle) take
# FlashAttention-2, which takes any length. Document plans avoid such calls on their own
# (`documents.FUSED_MIN_ROWS`): this is the kernel's guard for every other caller.
CUDNN_MIN_ROWS = 64


def _tiny(q, k) -> bool:
    return min(q.shape[2], k.shape[2]) < CUDNN_MIN_ROWS


def cudnn_forward(q, k, v, *, causal, scale):
    """cuDNN attention: out (B, H, nq, D), lse (B, H, nq) fp32; GQA read directly. ``causal``
    on square blocks only (cuDNN aligns it top-left, FlashAttention-2 bottom-right)."""
    if _tiny(q, k):
        return flash_band_forward(q, k, v, band=None, scale=scale, causal=causal)
    res = aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal, False,
                                                   scale=scale)
    return res[0], res[1].view(q.shape[:-1])


def cudnn_backward(dout, q, k, v, out, lse, *, causal, scale):
    """Gradients of `cudnn_forward` given the MERGED out/lse; dk/dv keep Hkv heads.

    cuDNN reads GQA K/V directly and reduces dK/dV over each group itself: on one H200 this
    ran 1.19x faster than expanding K/V to every query head and folding the gradients
    (4K-row causal blocks, 32/8 heads x 128), and allocates no expanded copies."""
    if _tiny(q, k):
        return flash_band_backward(dout, q, k, v, out, lse, band=None, scale=scale,
                                   causal=causal)
    zero = torch.zeros((), dtype=torch.int64, device=q.device)
    return aten._scaled_dot_product_cudnn_attention_backward(
        dout, q, k, v, out, lse.unsqueeze(-1).contiguous(), zero, zero, None,
        None, None, q.shape[2], k.shape[2], 0.0, causal, scale=scale,
    )


# Bands on cuDNN: causal cuDNN calls where `band.py` can rebuild the band, FlashAttention-2's
# window for the rest (rectangles of a zigzag or short-shard ring).
_CUDNN_BAND = SimpleNamespace(
    causal_forward=lambda q, k, v, scale: cudnn_forward(q, k, v, causal=True, scale=scale),
    causal_backward=lambda dout, q, k, v, out, lse, scale, delta: cudnn_backward(
        dout, q, k, v, out, lse, causal=True, scale=scale),
    band_forward=lambda q, k, v, band, scale: flash_band_forward(q, k, v, band=band,
                                                                 scale=scale),
    band_backward=lambda dout, q, k, v, out, lse, band, scale, delta: flash_band_backward(
        dout, q, k, v, out, lse, band=band, scale=scale),
)


class CudnnKernel:
    """cuDNN fused attention (the fastest on Hopper for bf16/fp16 in our H200 runs)."""

    name = "cudnn"
    supports_masks = False
    needs_delta = False
    # cuDNN's own varlen backward returned wrong gradients on torch 2.11: documents go to flash
    varlen_forward = staticmethod(varlen_forward)
    varlen_backward = staticmethod(varlen_backward)

    @staticmethod
    def forward(q, k, v, *, causal, scale, q_doc=None, k_doc=None, bucket_size=None, band=None):
        if band is not None:
            return band_forward(_CUDNN_BAND, q, k, v, band, scale)
        return cudnn_forward(q, k, v, causal=causal, scale=scale)

    @staticmethod
    def backward(dout, q, k, v, out, lse, *, causal, scale, q_doc=None, k_doc=None,
                 bucket_size=None, delta=None, band=None):
        if band is not None:
            return band_backward(_CUDNN_BAND, dout, q, k, v, out, lse, band, scale)
        return cudnn_backward(dout, q, k, v, out, lse, causal=causal, scale=scale)


class FlashKernel:
    """FlashAttention-2 backend of SDPA."""

    name = "flash"
    supports_masks = False
    needs_delta = False
    varlen_forward = staticmethod(varlen_forward)
    varlen_backward = staticmethod(varlen_backward)

    @staticmethod
    def forward(q, k, v, *, causal, scale, q_doc=None, k_doc=None, bucket_size=None, band=None):
        if band is not None:
            return flash_band_forward(q, k, v, band=band, scale=scale)
        res = aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)
        return res[0], res[1]

    @staticmethod
    def backward(dout, q, k, v, out, lse, *, causal, scale, q_doc=None, k_doc=None,
                 bucket_size=None, delta=None, band=None):
        if band is not None:
            return flash_band_backward(dout, q, k, v, out, lse, band=band, scale=scale)
        h, hkv = q.shape[1], k.shape[1]
        ke, ve = _expand_kv(k, h), _expand_kv(v, h)
        zero = torch.zeros((), dtype=torch.int64, device=q.device)
        dq, dk, dv = aten._scaled_dot_product_flash_attention_backward(
            dout, q, ke, ve, out, lse.contiguous(), None, None, q.shape[2], k.shape[2],
            0.0, causal, zero, zero, scale=scale,
        )
        return dq, _fold_kv_grad(dk, hkv), _fold_kv_grad(dv, hkv)
