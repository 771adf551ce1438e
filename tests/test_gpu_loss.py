"""The SP loss on GPU (Triton rows, `seqpar_ring.kernels.xent`) against fp64 cross entropy.

Skipped without CUDA. The CPU suite covers the torch path of the same function (test_loss.py);
here the Triton path must be the one that runs, and its loss and logits gradient must match
``F.cross_entropy`` in fp64 on the same rounded logits: the loss within 1e-5 relative, the
gradient within two roundings of its dtype (at least 1e-5, Triton's exp/log are approximate) of
the largest entry.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from seqpar_ring.kernels import xent
from seqpar_ring.loss import sp_cross_entropy

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_triton_loss_matches_fp64_cross_entropy(dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    # (batch, seq, vocab, row padding): vocab not a multiple of the block, smaller than it, one
    # block exactly; logits with a row stride wider than the vocab (a view), like a sliced head
    for b, s, v, pad in ((2, 300, 32000, 0), (1, 77, 50, 0), (3, 64, 4096, 0), (1, 129, 5003, 13)):
        base = torch.randn(b, s, v + pad, device="cuda", generator=g) * 4
        base[0, 0, :v] = -60.0
        base[0, 0, 3] = 60.0  # one row with an extreme max: the running max must hold it
        logits = base.to(dtype)[..., :v].requires_grad_(True)
        labels = torch.randint(0, v, (b, s), device="cuda", generator=g)
        labels[:, ::7] = -100  # ignored tokens
        x = logits.detach().reshape(-1, v)
        assert xent.available(x), "the Triton path must run on CUDA"
        loss = sp_cross_entropy(logits, labels)
        dout = torch.tensor(1.7, device="cuda")
        loss.backward(dout)

        ref_x = logits.detach().double().requires_grad_(True)
        ref = F.cross_entropy(ref_x.reshape(-1, v), labels.reshape(-1), ignore_index=-100)
        ref.backward(dout.double())
        ctx = f"{dtype} b={b} s={s} v={v}"
        assert abs(loss.item() - ref.item()) <= 1e-5 * abs(ref.item()), ctx
        want = ref_x.grad
        tol = max(2 * torch.finfo(dtype).eps, 1e-5) * want.abs().max().item()
        err = (logits.grad.double() - want).abs().max().item()
        assert logits.grad.dtype == dtype and err <= tol, f"{ctx}: grad err {err:.3g} > {tol:.3g}"
        assert torch.all(logits.grad[:, ::7] == 0), ctx  # ignored tokens: no gradient
