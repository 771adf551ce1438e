"""kernels/band.py: a sliding-window band rebuilt from causal calls (W-blocks, reversed rows)
equals the band computed directly — forward and every gradient, fp64 (≤ 1e-12), on the torch
kernel standing in for cuDNN; the calls it makes are the ones the module doc names."""

import pytest
import torch
from _exact import band_prim

from seqpar_ring.kernels import band as B
from seqpar_ring.kernels import torch_kernel as T


def _inputs(b, n, h, hkv, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    # the model's memory layout (B, n, H, D), seen as (B, H, n, D), as the ring hands it over
    q, k, v, do = (torch.randn(b, n, x, d, generator=g, dtype=torch.float64).transpose(1, 2)
                   for x in (h, hkv, hkv, h))
    return q, k, v, do


CASES = [  # (batch, rows, heads, kv heads, band, calls forward makes)
    (1, 24, 4, 2, (7, 0), ["causal", "causal"]),           # 3 whole W-blocks
    (2, 27, 4, 1, (7, 0), ["causal", "causal", "band"]),   # 3 blocks and a 3-row tail, batch 2
    (1, 13, 2, 2, (7, 0), ["causal", "band"]),             # one block and a tail
    (1, 16, 4, 2, (1, 0), ["causal", "causal"]),           # W = 2: 8 blocks
    (2, 9, 4, 2, (0, None), ["causal"]),                   # key j >= i: reversed causal
    (1, 9, 4, 2, (8, 0), ["band"]),                        # W = n: no block to cut
    (1, 9, 4, 2, (0, 0), ["band"]),                        # W = 1: the diagonal only
    (1, 9, 4, 2, (3, None), ["band"]),                     # a rectangle's band: fallback
]


@pytest.mark.parametrize("b,n,h,hkv,band,calls", CASES)
def test_band_from_causal_calls(b, n, h, hkv, band, calls):
    q, k, v, do = _inputs(b, n, h, hkv)
    scale = 0.3
    out, lse = T.block_forward(q, k, v, causal=False, scale=scale, band=band)
    want = T.block_backward(do, q, k, v, out, lse, causal=False, scale=scale, band=band)
    log = []
    o, l_ = B.band_forward(band_prim(log), q, k, v, band, scale)
    assert log == calls
    torch.testing.assert_close(o, out, atol=1e-12, rtol=0)
    torch.testing.assert_close(l_, lse, atol=1e-12, rtol=0)
    delta = (do * out).sum(-1)
    got = B.band_backward(band_prim([]), do, q, k, v, out, lse, band, scale, delta)
    for name, g, w in zip("qkv", got, want):
        assert g.shape == w.shape, name
        torch.testing.assert_close(g, w, atol=1e-12, rtol=0, msg=f"d{name}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_reversed_rows_move_wide_words_exactly(dtype):
    """`_rev` flips rows as 16- or 8-byte words where the layout allows, else element-wise:
    bitwise the same as ``flip(2)``, on views with offsets and odd head dims too."""
    x = torch.randn(2, 40, 3, 16, dtype=torch.float64).to(dtype).transpose(1, 2)
    views = [x, x[:, :, 5:33], x[:, 1:, 3:], x[..., 1:9], x[..., :6], x.contiguous()[:, :, 2:]]
    wide = [B._wide(v) for v in views]
    assert wide[0] is torch.complex128 and wide[3] is None  # odd offset: element-wise
    for v in views:
        r = B._rev(v)
        assert torch.equal(r, v.flip(2)) and r.dtype == dtype
    lse = torch.randn(2, 3, 40, dtype=torch.float32)
    assert torch.equal(B._rev(lse), lse.flip(2))
