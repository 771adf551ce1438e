"""GPU kernels against the fp32 torch kernel: cuDNN, flash and the document (varlen) path.

Skipped without CUDA; run on a GPU machine with ``python -m pytest -q -m gpu tests``. Every case
runs the fused kernel in bf16 and the pure-torch kernel in fp32 on the same bf16-rounded inputs,
forward and all gradients, and compares with a stated bf16 tolerance: max |err| <= ATOL + RTOL *
max |reference| per tensor (a wrong mask or merge gives errors of the order of the values).
"""

from __future__ import annotations

import itertools

import pytest
import torch

import seqpar_ring

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

ATOL, RTOL = 2e-2, 2e-2  # bf16 inputs and outputs, fp32 accumulation
S, H, HKV, D = 4096, 8, 2, 128


def _pattern(name: str) -> torch.Tensor | None:
    """(2, S) document ids: long and short documents (dense and varlen calls), padding."""
    if name == "plain":
        return None
    ids = torch.zeros(2, S, dtype=torch.long)
    if name == "right_padded":
        ids[0, -700:] = -1
        ids[1, -1:] = -1
    elif name == "left_padded":
        ids[:, :300] = -1
    elif name == "packed":
        for r, lens in enumerate(([1500, 300, 200, 96, 2000], [2048, 2048])):
            ids[r] = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))
        ids[0, 1800:1830] = -1  # padding in the middle of the varlen group
    elif name == "equal":
        ids[:] = torch.arange(S) // 1024
    return ids


def _run(kernel, q, k, v, dout, ids, causal, dtype):
    leaves = [x.detach().to(dtype).requires_grad_(True) for x in (q, k, v)]
    out = seqpar_ring.ring_attention(*leaves, None, causal=causal, kernel=kernel,
                                     doc_ids=None if ids is None else ids.cuda())
    out.backward(dout.to(dtype))
    return [out.detach().float()] + [x.grad.float() for x in leaves]


def _compare(got, want, free, ctx):
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        if name == "out" and free is not None:  # unspecified rows: trailing padding, causal
            a, b = a.masked_fill(free, 0), b.masked_fill(free, 0)
        assert torch.isfinite(a).all(), f"{ctx}: {name} not finite"
        err, scale = (a - b).abs().max().item(), b.abs().max().item()
        assert err <= ATOL + RTOL * scale, f"{ctx}: {name} max err {err:.3g} (ref max {scale:.3g})"


@pytest.mark.parametrize("kernel", ["cudnn", "flash"])
def test_fused_kernels_match_torch_kernel(kernel):
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(2, S, H, D, device="cuda", generator=g).bfloat16()
    k = torch.randn(2, S, HKV, D, device="cuda", generator=g).bfloat16()
    v = torch.randn(2, S, HKV, D, device="cuda", generator=g).bfloat16()
    for name, causal in itertools.product(
            ("plain", "right_padded", "left_padded", "packed", "equal"), (True, False)):
        ids = _pattern(name)
        dout = torch.randn(2, S, H, D, device="cuda", generator=g)
        free = None
        if ids is not None:
            pad = (ids < 0).cuda()
            trailing = pad & (ids >= 0).long().cuda().flip(1).cumsum(1).flip(1).eq(0)
            free = (trailing if causal else torch.zeros_like(pad))[:, :, None, None]
            dout = dout.masked_fill(free, 0.0)  # no loss flows from unspecified rows
        ctx = f"kernel={kernel} rows={name} causal={causal}"
        want = _run("torch", q, k, v, dout, ids, causal, torch.float32)
        got = _run(kernel, q, k, v, dout, ids, causal, torch.bfloat16)
        _compare(got, want, free, ctx)


@pytest.mark.parametrize("causal", [True, False])
def test_dilated_fused_matches_torch_kernel(causal):
    g = torch.Generator(device="cuda").manual_seed(1)
    q = torch.randn(1, S, H, D, device="cuda", generator=g).bfloat16()
    k = torch.randn(1, S, HKV, D, device="cuda", generator=g).bfloat16()
    v = torch.randn(1, S, HKV, D, device="cuda", generator=g).bfloat16()
    dout = torch.randn(1, S, H, D, device="cuda", generator=g)
    ids = torch.zeros(1, S, dtype=torch.long, device="cuda")
    if causal:
        ids[0, -500:] = -1
        dout[0, -500:] = 0.0

    def run(kernel, dtype):
        leaves = [x.detach().to(dtype).requires_grad_(True) for x in (q, k, v)]
        out = seqpar_ring.dilated_attention(
            *leaves, None, segment_lengths=[512, 2048, S], dilation_rates=[1, 2, 4],
            causal=causal, kernel=kernel, doc_ids=ids if causal else None)
        out.backward(dout.to(dtype))
        return [out.detach().float()] + [x.grad.float() for x in leaves]

    free = (ids < 0)[:, :, None, None]
    _compare(run("cudnn", torch.bfloat16), run("torch", torch.float32), free,
             f"dilated causal={causal}")
