"""Windowed blocks on the fused GPU kernels (FlashAttention-2 with its window) vs the fp32 torch
kernel: every call geometry the window planner makes, and whole windowed passes with sinks and
packed documents.

Skipped without CUDA; run with ``python -m pytest -q -m gpu tests/test_gpu_window.py``. Same
tolerance rule as tests/test_gpu.py: max |err| <= ATOL + RTOL * max |reference| per tensor.
"""

from __future__ import annotations

import itertools

import pytest
import torch

import seqpar_ring
from seqpar_ring import calls as K
from seqpar_ring.kernels import KERNELS
from seqpar_ring.window import plan_pair

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

ATOL, RTOL = 2e-2, 2e-2
H, HKV, D = 8, 2, 128


def _close(got, want, ctx):
    for name, a, b in zip(("out", "lse/dq", "dk", "dv"), got, want):
        a, b = a.float(), b.float()
        assert torch.isfinite(a).all(), f"{ctx}: {name} not finite"
        err, scale = (a - b).abs().max().item(), b.abs().max().item()
        assert err <= ATOL + RTOL * scale, f"{ctx}: {name} max err {err:.3g} (ref {scale:.3g})"


@pytest.mark.parametrize("kernel", ["cudnn", "flash"])
def test_window_calls_match_torch_kernel(kernel):
    """Each call of a chunk pair (diagonal band, trimmed past rectangle with a band, plain
    rectangle), forward (out, lse) and backward (dq, dk, dv) with the call's own out/lse."""
    g = torch.Generator(device="cuda").manual_seed(0)
    n, b = 1024, 2
    fused, ref = KERNELS[kernel], KERNELS["torch"]
    # windows of 2-63 rows: W-blocks and slivers too small for cuDNN (its guard sends them to
    # FlashAttention-2: cuDNN rejects s_q = s_kv = 1 and crashed on other tiny shapes)
    for w, dist_chunks in itertools.product((1, 2, 5, 63, 100, 1000, 1024, 1500, 3000),
                                            (0, 1, 2)):
        qs, ks = dist_chunks * n, 0
        calls = plan_pair([(qs, n)], [(ks, n)], w)
        q = torch.randn(b, n, H, D, device="cuda", generator=g).bfloat16().transpose(1, 2)
        k = torch.randn(b, n, HKV, D, device="cuda", generator=g).bfloat16().transpose(1, 2)
        v = torch.randn(b, n, HKV, D, device="cuda", generator=g).bfloat16().transpose(1, 2)
        dout = torch.randn(b, H, n, D, device="cuda", generator=g).bfloat16()
        for call in calls:
            ctx = f"{kernel} W={w} pair distance {dist_chunks} call {call}"
            kw = dict(scale=D ** -0.5, bucket_size=512)
            o_ref, l_ref = K.forward(ref, call, q.float(), k.float(), v.float(), **kw)
            o, lse = K.forward(fused, call, q, k, v, **kw)
            _close([o, lse], [o_ref, l_ref], ctx + " forward")
            full_out = torch.zeros(b, H, n, D, device="cuda", dtype=torch.bfloat16)
            full_lse = torch.full((b, H, n), float("-inf"), device="cuda")
            full_out[:, :, call.q], full_lse[:, :, call.q] = o.bfloat16(), lse.float()
            delta = (dout.float() * full_out.float()).sum(-1)
            got = K.backward(fused, call, dout, q, k, v, full_out, full_lse, None, **kw)
            want = K.backward(ref, call, dout.float(), q.float(), k.float(), v.float(),
                              full_out.float(), full_lse, delta, **kw)
            _close([torch.zeros(1)] + list(got), [torch.zeros(1)] + list(want),
                   ctx + " backward")


def _ids(name: str, s: int):
    if name == "plain":
        return None
    ids = torch.zeros(2, s, dtype=torch.long)
    if name == "packed":  # long documents (dense calls) and short ones (varlen with a window)
        for r, lens in enumerate(([3000, 300, 200, 96, 4596], [4096, 4096])):
            ids[r] = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))
    return ids


@pytest.mark.parametrize("kernel", ["cudnn", "flash"])
def test_windowed_pass_with_sinks_matches_torch_kernel(kernel):
    s = 8192
    g = torch.Generator(device="cuda").manual_seed(1)
    q = torch.randn(2, s, H, D, device="cuda", generator=g).bfloat16()
    k = torch.randn(2, s, HKV, D, device="cuda", generator=g).bfloat16()
    v = torch.randn(2, s, HKV, D, device="cuda", generator=g).bfloat16()
    sinks = torch.randn(H, device="cuda", generator=g)
    for name, w in itertools.product(("plain", "packed"), (5, 128, 4096)):
        dout = torch.randn(2, s, H, D, device="cuda", generator=g)
        ids = _ids(name, s)
        res = []
        for kern, dt in ((kernel, torch.bfloat16), ("torch", torch.float32)):
            leaves = [x.detach().to(dt).requires_grad_(True) for x in (q, k, v)]
            sk = sinks.clone().requires_grad_(True)
            out = seqpar_ring.ring_attention(*leaves, None, kernel=kern, window=w, sinks=sk,
                                             bucket_size=2048,
                                             doc_ids=None if ids is None else ids.cuda())
            out.backward(dout.to(dt))
            res.append([out.detach(), *(x.grad for x in leaves), sk.grad])
        ctx = f"{kernel} rows={name} W={w}"
        _close(res[0][:4], res[1][:4], ctx)
        err = (res[0][4] - res[1][4]).abs().max().item()
        assert err <= ATOL + RTOL * res[1][4].abs().max().item(), f"{ctx}: dsinks err {err:.3g}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rows_kernels_match_torch_ops(dtype):
    """kernels/rows.py (Triton) against the torch ops `band.py` runs on other devices, on the
    strided (A, M, H, R, D) views the band hands them: the add bitwise (one fp32 add, rounded
    once), the merge within two roundings of the output dtype (1e-5 relative in fp32) of an
    fp64 merge."""
    from seqpar_ring.kernels import rows

    assert rows.available(torch.empty(1, device="cuda")), "Triton is missing from this install"
    g = torch.Generator(device="cuda").manual_seed(0)
    for a, m, r, d in ((1, 5, 37, 128), (2, 3, 70, 64), (1, 2, 5, 80)):
        base = torch.randn(a * (m + 1), r + 1, H, d, device="cuda", dtype=dtype, generator=g)
        before = base.clone()

        def region(x):  # the band's layout: rows 0 .. R-1 of blocks 1 .. M
            return x.transpose(1, 2).unflatten(0, (a, m + 1))[:, 1:, :, :r]
        view = region(base)
        g2 = torch.randn(a, m, H, r, d, device="cuda", dtype=dtype, generator=g)
        want = (view.float() + g2.flip(3).float()).to(dtype)
        rows.add_reversed_(view, g2)
        assert torch.equal(view, want), (a, m, r, d)

        lse_base = torch.randn(a * (m + 1), H, r + 1, device="cuda", generator=g) * 3
        lse_before = lse_base.clone()
        lse = lse_base.unflatten(0, (a, m + 1))[:, 1:, :, :r]
        lse2 = torch.randn(a, m, H, r, device="cuda", generator=g) * 3
        o2 = torch.randn(a, m, H, r, d, device="cuda", dtype=dtype, generator=g)
        l1, l2 = lse.double(), lse2.flip(3).double()
        new = torch.logaddexp(l1, l2)
        want_o = (view.double() * (l1 - new).exp()[..., None]
                  + o2.flip(3).double() * (l2 - new).exp()[..., None])
        rows.merge_reversed_(view, lse, o2, lse2)
        # Triton's exp/log are approximate (about 1e-6 relative in fp32)
        tol = max(2 * torch.finfo(dtype).eps, 1e-5) * want_o.abs().max().item()
        assert (view.double() - want_o).abs().max().item() <= tol, (a, m, r, d)
        assert (lse.double() - new).abs().max().item() <= 1e-5, (a, m, r, d)
        region(before).copy_(view)  # every row outside the view untouched
        assert torch.equal(before, base)
        lse_before.unflatten(0, (a, m + 1))[:, 1:, :, :r].copy_(lse)
        assert torch.equal(lse_before, lse_base)
