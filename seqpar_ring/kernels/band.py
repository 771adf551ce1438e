"""A sliding-window band on a kernel that only knows "causal": W-blocks and reversed rows.

cuDNN's SDPA, the fastest kernel on Hopper, has no window; FlashAttention-2 has one but runs at
about half cuDNN's speed there. The two band shapes of a causal window (`window.py`) are
rebuilt from causal calls:

- ``(0, None)`` on a square block — key j visible iff j >= i (the part of the previous block a
  window reaches, trimmed) — is a causal call on the rows in reverse order;
- ``(W - 1, 0)`` on a square diagonal block of n > W rows, cut into W-blocks:

  1. every W-block against itself: causal (all of a block's past lies inside the window) —
     one call, the blocks batched;
  2. the first W - 1 queries of block i against the last W - 1 keys of block i - 1: key j
     visible iff j >= i in those coordinates, the reversed causal call above — one call;
  3. the n mod W rows after the last whole block: one banded call of the fallback kernel.

  (1) and (2) meet on the first W - 1 rows of every block but the first: their results are
  merged there by the log-sum-exp rule, in place.

Every useful (query, key) pair is computed exactly once, and no element-wise mask is built.
Backward runs the same calls with the MERGED out/lse and adds the pieces' gradients.

``prim`` is a kernel namespace with ``causal_forward(q, k, v, scale)``,
``causal_backward(dout, q, k, v, out, lse, scale, delta)``, ``band_forward(q, k, v, band,
scale)`` and ``band_backward(dout, q, k, v, out, lse, band, scale, delta)``. Layout as every
kernel: q (B, H, n, D), k/v (B, Hkv, n, D), lse/delta (B, H, n).
"""

from __future__ import annotations

import torch

from ..calls import segmented, unsegmented
from . import rows

__all__ = ["band_forward", "band_backward", "blocked"]


def _rev(x: torch.Tensor | None) -> torch.Tensor | None:
    """Rows (dim 2) in reverse order: a copy with the input's memory layout.

    The copy moves 16-byte words where the last dim allows it: ``flip`` is an indexing kernel
    that spends its time per element, so flipping bf16 rows 2 bytes at a time ran at a third of
    the bandwidth (14% of a 256K windowed fwd+bwd on an H200, `bench window --profile`).
    """
    if x is None:
        return None
    wide = _wide(x)
    return x.flip(2) if wide is None else x.view(wide).flip(2).view(x.dtype)


def _wide(x: torch.Tensor) -> torch.dtype | None:
    """A 16- or 8-byte dtype x's rows can be viewed as (last dim contiguous, every other stride
    and the offset whole words), or None."""
    if x.dim() < 4 or x.stride(-1) != 1 or x.is_complex():
        return None
    for dtype in (torch.complex128, torch.int64):
        k = dtype.itemsize // x.element_size()
        if k > 1 and x.shape[-1] % k == 0 and x.storage_offset() % k == 0 and all(
                s % k == 0 for s in x.stride()[:-1]):
            return dtype
    return None


def _seg_rows(x: torch.Tensor | None, w: int) -> torch.Tensor | None:
    """(B, H, n) per-row values -> (B * n/w, H, w)."""
    return None if x is None else segmented(x.unsqueeze(-1), w).squeeze(-1)


def _heads(x: torch.Tensor, w: int, body: int) -> torch.Tensor:
    """Queries of the reversed call (2): rows 0 .. W-2 of blocks 1 .. m-1, reversed.
    ``x`` (B, H, n, ...) or per-row (B, H, n); ``body`` = m * W."""
    rows = x[:, :, w:body]
    seg = segmented(rows, w) if rows.dim() == 4 else _seg_rows(rows, w)
    return _rev(seg[:, :, :w - 1])


def _tails(x: torch.Tensor, w: int, body: int) -> torch.Tensor:
    """Keys of the reversed call (2): rows 1 .. W-1 of blocks 0 .. m-2, reversed."""
    return _rev(segmented(x[:, :, :body - w], w)[:, :, 1:])


def _reversed(band, nq: int, nk: int) -> bool:
    return band == (0, None) and nq == nk


def blocked(band, nq: int, nk: int) -> bool:
    """Is this call a causal window over a square block longer than the window?"""
    return band[1] == 0 and nq == nk and band[0] + 1 < nq and band[0] >= 1


def band_forward(prim, q, k, v, band, scale):
    """(out, lse) of a banded call; see the module doc for which calls run."""
    nq, nk = q.shape[2], k.shape[2]
    if _reversed(band, nq, nk):
        o, lse = prim.causal_forward(_rev(q), _rev(k), _rev(v), scale)
        return _rev(o), _rev(lse)
    if not blocked(band, nq, nk):
        return prim.band_forward(q, k, v, band, scale)
    w = band[0] + 1
    b, m, body = q.shape[0], nq // w, (nq // w) * w
    o, lse = prim.causal_forward(segmented(q[:, :, :body], w), segmented(k[:, :, :body], w),
                                 segmented(v[:, :, :body], w), scale)
    if m > 1:
        o2, lse2 = prim.causal_forward(_heads(q, w, body), _tails(k, w, body),
                                       _tails(v, w, body), scale)
        # rows 0 .. W-2 of blocks 1 .. m-1 hold both results
        _merge_reversed(o.unflatten(0, (b, m))[:, 1:, :, :w - 1],
                        lse.unflatten(0, (b, m))[:, 1:, :, :w - 1],
                        o2.unflatten(0, (b, m - 1)), lse2.unflatten(0, (b, m - 1)))
    out = unsegmented(o, b)
    lse = unsegmented(lse.unsqueeze(-1), b).squeeze(-1)
    if body == nq:
        return out, lse
    # rows after the last whole block: their window starts in the last whole block
    o3, lse3 = prim.band_forward(q[:, :, body:], k[:, :, body - w + 1:], v[:, :, body - w + 1:],
                                 band, scale)
    full = torch.empty((b, nq, q.shape[1], o.shape[-1]), dtype=o.dtype, device=o.device)
    full = full.transpose(1, 2)  # (B, H, n, D) over the model's (B, n, H, D) memory
    full[:, :, :body], full[:, :, body:] = out, o3
    return full, torch.cat([lse, lse3.to(lse.dtype)], dim=2)


def _merge_reversed(o, lse, o2, lse2) -> None:
    """Merge (o2, lse2), whose rows (dim 3) come reversed, into the views (o, lse) in place.
    Every row has a key on both sides. (A, M, H, R, D) / (A, M, H, R)."""
    if rows.available(o):
        rows.merge_reversed_(o, lse, o2, lse2)
        return
    o2, lse2 = o2.flip(3), lse2.flip(3)
    new = torch.logaddexp(lse, lse2.to(lse.dtype))
    # out = o + w2 (o2 - o) with w2 = exp(lse2 - new): one pass over o, weights in o's dtype
    o.lerp_(o2.to(o.dtype), torch.exp(lse2 - new).unsqueeze(-1).to(o.dtype))
    lse.copy_(new)


def _add_reversed(g, g2) -> None:
    """g += g2 with g2's rows (dim 3) reversed, in place; (A, M, H, R, D)."""
    if rows.available(g):
        rows.add_reversed_(g, g2)
    else:
        g += g2.flip(3)


def band_backward(prim, dout, q, k, v, out, lse, band, scale, delta=None):
    """(dq, dk, dv) of `band_forward` given the MERGED out/lse (and delta when the kernel takes
    it precomputed); dk/dv keep Hkv heads."""
    nq, nk = q.shape[2], k.shape[2]
    if _reversed(band, nq, nk):
        grads = prim.causal_backward(_rev(dout), _rev(q), _rev(k), _rev(v), _rev(out),
                                     _rev(lse), scale, _rev(delta))
        return tuple(_rev(g) for g in grads)
    if not blocked(band, nq, nk):
        return prim.band_backward(dout, q, k, v, out, lse, band, scale, delta)
    w = band[0] + 1
    b, m, body = q.shape[0], nq // w, (nq // w) * w

    def seg(x):
        return segmented(x[:, :, :body], w)

    def seg_r(x):
        return None if x is None else _seg_rows(x[:, :, :body], w)

    dq, dk, dv = prim.causal_backward(seg(dout), seg(q), seg(k), seg(v), seg(out), seg_r(lse),
                                      scale, seg_r(delta))
    if m > 1:
        d2 = prim.causal_backward(
            _heads(dout, w, body), _heads(q, w, body), _tails(k, w, body), _tails(v, w, body),
            _heads(out, w, body), _heads(lse, w, body), scale,
            None if delta is None else _heads(delta, w, body))
        _add_reversed(dq.unflatten(0, (b, m))[:, 1:, :, :w - 1], d2[0].unflatten(0, (b, m - 1)))
        for g, g2 in ((dk, d2[1]), (dv, d2[2])):
            _add_reversed(g.unflatten(0, (b, m))[:, :m - 1, :, 1:], g2.unflatten(0, (b, m - 1)))
    dq, dk, dv = (unsegmented(g, b) for g in (dq, dk, dv))
    if body == nq:
        return dq, dk, dv
    lo = body - w + 1
    d3 = prim.band_backward(dout[:, :, body:], q[:, :, body:], k[:, :, lo:], v[:, :, lo:],
                            out[:, :, body:], lse[:, :, body:], band, scale,
                            None if delta is None else delta[:, :, body:])
    dq = torch.cat([dq, d3[0].to(dq.dtype)], dim=2)
    grads = []
    for g, g3 in ((dk, d3[1]), (dv, d3[2])):
        full = torch.zeros((*g.shape[:2], nk, g.shape[3]), dtype=torch.promote_types(
            g.dtype, g3.dtype), device=g.device)
        full[:, :, :body] = g
        full[:, :, lo:] += g3
        grads.append(full)
    return dq, grads[0], grads[1]
