"""Row operations of `band.py` that read one operand with its rows reversed — Triton on GPU.

The reversed causal call of a band returns its rows in reverse order. Flipping them back costs
a copy of the output (and, in backward, of dQ, dK and dV) before the merge or the add, and the
torch merge runs on strided views with a broadcast weight, off the vectorized path. These two
kernels read the reversed operand in place and do the merge / add in one pass:

- ``merge_reversed_(o, lse, o2, lse2)``: rows r of (o, lse) take the log-sum-exp merge with
  rows R - 1 - r of (o2, lse2), in place; the weights in fp32;
- ``add_reversed_(g, g2)``: g[..., r, :] += g2[..., R - 1 - r, :] in fp32, rounded once.

Layout: o/o2/g/g2 (A, M, H, R, D) with any strides (views of the band's W-blocks), lse/lse2
(A, M, H, R) fp32. CUDA tensors only; `band.py` keeps the torch ops for every other device.
"""

from __future__ import annotations

import torch

try:  # torch's CUDA wheels ship Triton; CPU builds do not
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

__all__ = ["available", "merge_reversed_", "add_reversed_"]

BLOCK_R = 32


def available(x: torch.Tensor) -> bool:
    """Can these kernels run on x's device?"""
    return triton is not None and x.is_cuda


if triton is not None:

    @triton.jit
    def _offsets(pid, M, H, R, s_a, s_m, s_h, s_r, reverse: tl.constexpr,
                 BLOCK_R: tl.constexpr):
        """Row offsets (BLOCK_R,) of program ``pid``'s rows, and the row mask."""
        amh = tl.program_id(0).to(tl.int64)
        h = amh % H
        am = amh // H
        base = (am // M) * s_a + (am % M) * s_m + h * s_h
        r = pid.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        rr = R - 1 - r if reverse else r
        return base + rr * s_r, r < R

    @triton.jit
    def _merge_kernel(o, lse, o2, lse2, M, H, R, D,
                      so_a, so_m, so_h, so_r, so_d, sl_a, sl_m, sl_h, sl_r,
                      s2_a, s2_m, s2_h, s2_r, s2_d, t2_a, t2_m, t2_h, t2_r,
                      BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
        pid = tl.program_id(1)
        ro, rm = _offsets(pid, M, H, R, so_a, so_m, so_h, so_r, False, BLOCK_R)
        r2, _ = _offsets(pid, M, H, R, s2_a, s2_m, s2_h, s2_r, True, BLOCK_R)
        rl, _ = _offsets(pid, M, H, R, sl_a, sl_m, sl_h, sl_r, False, BLOCK_R)
        rl2, _ = _offsets(pid, M, H, R, t2_a, t2_m, t2_h, t2_r, True, BLOCK_R)
        l1 = tl.load(lse + rl, mask=rm, other=0.0)
        l2 = tl.load(lse2 + rl2, mask=rm, other=0.0)
        top = tl.maximum(l1, l2)
        new = top + tl.log(tl.exp(l1 - top) + tl.exp(l2 - top))
        d = tl.arange(0, BLOCK_D)
        mask = rm[:, None] & (d < D)[None, :]
        po = o + ro[:, None] + d[None, :] * so_d
        x1 = tl.load(po, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(o2 + r2[:, None] + d[None, :] * s2_d, mask=mask, other=0.0).to(tl.float32)
        out = x1 * tl.exp(l1 - new)[:, None] + x2 * tl.exp(l2 - new)[:, None]
        tl.store(po, out.to(o.dtype.element_ty), mask=mask)
        tl.store(lse + rl, new, mask=rm)

    @triton.jit
    def _add_kernel(g, g2, M, H, R, D, sg_a, sg_m, sg_h, sg_r, sg_d,
                    s2_a, s2_m, s2_h, s2_r, s2_d, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
        pid = tl.program_id(1)
        rg, rm = _offsets(pid, M, H, R, sg_a, sg_m, sg_h, sg_r, False, BLOCK_R)
        r2, _ = _offsets(pid, M, H, R, s2_a, s2_m, s2_h, s2_r, True, BLOCK_R)
        d = tl.arange(0, BLOCK_D)
        mask = rm[:, None] & (d < D)[None, :]
        pg = g + rg[:, None] + d[None, :] * sg_d
        x = tl.load(pg, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(g2 + r2[:, None] + d[None, :] * s2_d, mask=mask, other=0.0).to(tl.float32)
        tl.store(pg, (x + x2).to(g.dtype.element_ty), mask=mask)


def _grid(x: torch.Tensor):
    a, m, h, r = x.shape[:4]
    return (a * m * h, triton.cdiv(r, BLOCK_R))


def _check(x: torch.Tensor, y: torch.Tensor, dims: int) -> None:
    if x.dim() != dims or x.shape != y.shape:
        raise ValueError(f"rows kernels take two {dims}-d tensors of one shape, got "
                         f"{tuple(x.shape)} and {tuple(y.shape)}")


def merge_reversed_(o, lse, o2, lse2) -> None:
    """Merge (o2, lse2), rows reversed, into the views (o, lse) in place (module doc)."""
    _check(o, o2, 5)
    _check(lse, lse2, 4)
    d, lse2 = o.shape[-1], lse2.to(lse.dtype)
    _merge_kernel[_grid(o)](o, lse, o2, lse2, o.shape[1], o.shape[2],
                            o.shape[3], d, *o.stride(), *lse.stride(), *o2.stride(),
                            *lse2.stride(), BLOCK_R=BLOCK_R,
                            BLOCK_D=triton.next_power_of_2(d))


def add_reversed_(g, g2) -> None:
    """g += g2 with g2's rows reversed, in place (module doc)."""
    _check(g, g2, 5)
    d = g.shape[-1]
    _add_kernel[_grid(g)](g, g2, g.shape[1], g.shape[2], g.shape[3], d, *g.stride(),
                          *g2.stride(), BLOCK_R=BLOCK_R, BLOCK_D=triton.next_power_of_2(d))
