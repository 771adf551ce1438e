"""The torch kernel planned and checked like the fused GPU kernels, for CPU tests.

What the GPU kernels do differently from the torch kernel, made visible on CPU:

- document calls with fewer than ``min_rows`` rows on a side become varlen calls
  (`documents._small_to_varlen`; the fused kernels' `FUSED_MIN_ROWS`);
- windowed diagonal blocks are rebuilt from causal calls by `kernels/band.py` (as on cuDNN);
- every window a FlashAttention-2 call would get is read through a model of that op's argument
  rules (`flash_op_visible`), which must show exactly the band's keys and leave no query row
  without a key (the op returns lse = +inf there, NaN after the merge);
- causal dense calls are squares (cuDNN aligns causal top-left, FlashAttention bottom-right).

The arithmetic is the torch kernel's, so results stay exact (fp64) against the references.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from _exact import band_prim

from seqpar_ring.kernels import TorchKernel
from seqpar_ring.kernels import band as B
from seqpar_ring.kernels import torch_kernel as T
from seqpar_ring.kernels.sdpa import flash_varlen_args


def flash_op_visible(nq: int, nk: int, max_k: int, causal: bool, window: dict) -> torch.Tensor:
    """(nq, nk) bool: the keys FlashAttention-2 shows each query of one sequence, given the
    call's max_seqlen_k and window arguments.

    From the op's source (PyTorch's ``flash_api.cpp`` and FlashAttention-2's masks): a side >=
    max_seqlen_k is opened (-1); causal sets right = 0; one open side with the other set becomes
    max_seqlen_k; query i then sees i + (nk - nq) - left <= j <= i + (nk - nq) + right (both
    open: every key).
    """
    left = window.get("window_size_left", -1)
    right = window.get("window_size_right", -1)
    left = -1 if left >= max_k else left
    right = -1 if right >= max_k else right
    if causal:
        right = 0
    if left < 0 and right >= 0:
        left = max_k
    if left >= 0 and right < 0:
        right = max_k
    if left < 0 and right < 0:
        return torch.ones(nq, nk, dtype=torch.bool)
    i = torch.arange(nq).view(-1, 1)
    j = torch.arange(nk).view(1, -1)
    c = nk - nq
    return (j >= i + c - left) & (j <= i + c + right)


def band_visible(nq: int, nk: int, causal: bool, band) -> torch.Tensor:
    """What a band means (`kernels.torch_kernel`): bottom-right aligned, None = open."""
    i = torch.arange(nq).view(-1, 1)
    j = torch.arange(nk).view(1, -1)
    c = nk - nq
    if band is None:
        return (j <= i + c) if causal else torch.ones(nq, nk, dtype=torch.bool)
    left, right = band
    ok = j >= i + c - left
    return ok & (j <= i + c + right) if right is not None else ok


def check_flash_call(band, causal: bool, seqs, max_q: int, max_k: int) -> None:
    """Assert a FlashAttention-2 call over sequences ``seqs`` [(nq, nk)] means ``band``."""
    mq, mk, window = flash_varlen_args(band, max_q, max_k)
    for nq, nk in seqs:
        if nq == 0 or nk == 0:
            continue  # an empty sequence: no row, or rows the varlen call maps to -inf
        if causal and band is None:
            assert nq == nk, f"causal varlen sequence {nq} x {nk} is not square"
        got = flash_op_visible(nq, nk, mk, causal, window)
        want = band_visible(nq, nk, causal, band)
        assert torch.equal(got, want), f"FlashAttention window {window} on {nq} x {nk} " \
            f"(max_k {mk}) does not mean band {band}"
        assert got.any(1).all(), f"band {band} on {nq} x {nk} leaves a query without a key"


def fused_like_kernel(log: list, min_rows: int):
    """A kernel namespace like `kernels.TorchKernel`, planned and checked as the module doc
    says; ``log`` collects band.py's primitive calls ("causal" / "band")."""
    prim = band_prim(log)

    def band_checked(fn):
        def call(q, k, v, band, *rest):
            n = q.shape[0]
            check_flash_call(band, False, [(q.shape[2], k.shape[2])] * n, q.shape[2],
                             k.shape[2])
            return fn(q, k, v, band, *rest)
        return call

    def band_checked_bwd(fn):
        def call(dout, q, k, v, out, lse, band, *rest):
            check_flash_call(band, False, [(q.shape[2], k.shape[2])], q.shape[2], k.shape[2])
            return fn(dout, q, k, v, out, lse, band, *rest)
        return call

    prim = SimpleNamespace(causal_forward=prim.causal_forward,
                           causal_backward=prim.causal_backward,
                           band_forward=band_checked(prim.band_forward),
                           band_backward=band_checked_bwd(prim.band_backward))

    def forward(q, k, v, *, causal, scale, band=None, **kw):
        if kw.get("q_doc") is not None:  # element-masked calls: the torch kernel's own
            return T.block_forward(q, k, v, causal=causal, scale=scale, band=band, **kw)
        if band is None:
            assert not causal or q.shape[2] == k.shape[2], "causal dense call not square"
            return T.block_forward(q, k, v, causal=causal, scale=scale, **kw)
        return B.band_forward(prim, q, k, v, band, scale)

    def backward(dout, q, k, v, out, lse, *, causal, scale, band=None, delta=None, **kw):
        if band is None or kw.get("q_doc") is not None:
            return T.block_backward(dout, q, k, v, out, lse, causal=causal, scale=scale,
                                    band=band, delta=delta, **kw)
        return B.band_backward(prim, dout, q, k, v, out, lse, band, scale, delta)

    def varlen_forward(q, k, v, spec, *, causal, scale, bucket_size=None, band=None):
        check_flash_call(band, causal, spec.seqs, spec.max_q, spec.max_k)
        return T.varlen_forward(q, k, v, spec, causal=causal, scale=scale, band=band)

    def varlen_backward(dout, q, k, v, out, lse, spec, *, causal, scale, bucket_size=None,
                        delta=None, band=None):
        return T.varlen_backward(dout, q, k, v, out, lse, spec, causal=causal, scale=scale,
                                 delta=delta, band=band)

    return SimpleNamespace(**{**vars(TorchKernel), "forward": forward, "backward": backward,
                              "varlen_forward": varlen_forward,
                              "varlen_backward": varlen_backward, "min_rows": min_rows})
