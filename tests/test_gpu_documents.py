"""Documents of any length on the fused kernels (one process): edge patterns and a fuzz.

Skipped without CUDA; run with ``python -m pytest -q -s -m gpu tests``. bf16 fused kernels
(kernel auto = cuDNN, and flash) against one fp32 SDPA call per document, forward and every
gradient, with the rule of `tests/_gpu.py`:

- the rows that crashed cuDNN ("s_q = s_kv = 1 is not supported", or a segmentation fault):
  a 1-token document between or after long ones ([2000, 1, 2095], [4095, 1]), and documents
  starting or ending on the 1,024-token dense threshold and on bucket edges, padding runs
  left / middle / right, rows of only 1-3-token documents;
- 200 seeded random patterns (documents of 1...5,000 tokens, padding runs; every fourth case
  two rows that differ), causal and not.
"""

from __future__ import annotations

import random

import pytest
import torch
from _gpu import compare, doc_reference, ids_of, inputs, random_lengths, unspecified

import seqpar_ring

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

H, HKV, D = 8, 2, 128
EDGE = [[2000, 1, 2095], [4095, 1], [1, 4095], [2047, 1, 1, 2047], [1024, 1, 3071],
        [1023, 1, 1024, 2048], [-300, 3795, 1], [1000, -1, 1, 3094], [4094, 1, -1],
        [2048, -1, 2047], [1, 2, 3] * 682 + [4], [-1, 1] * 2048, [3, 1, -2, 4090]]


def _check(lengths_rows, kernel: str, causal: bool, seed: int, ctx: str) -> float:
    ids = torch.stack([ids_of(x) for x in lengths_rows])
    b, s = ids.shape
    q, k, v, dout = inputs(seed, b, s, H, HKV, D)
    free = unspecified(ids, causal)
    dout = dout.masked_fill(free.cuda()[:, :, None, None], 0.0)
    want = doc_reference(q, k, v, dout, ids, causal)
    leaves = [x.detach().bfloat16().requires_grad_(True) for x in (q, k, v)]
    out = seqpar_ring.ring_attention(*leaves, None, causal=causal, kernel=kernel,
                                     doc_ids=ids.cuda())
    out.backward(dout.bfloat16())
    got = [out.detach().float()] + [x.grad.float() for x in leaves]
    return compare(got, want, ctx, free)


@pytest.mark.parametrize("kernel", ["auto", "flash"])
def test_edge_patterns(kernel):
    worst = 0.0
    for i, lens in enumerate(EDGE):
        assert sum(abs(n) for n in lens) == 4096, lens
        for causal in (True, False):
            worst = max(worst, _check([lens], kernel, causal, i,
                                      f"kernel={kernel} {lens[:6]} causal={causal}"))
    print(f"GPU-ERR documents edge kernel={kernel}: largest error {worst:.3f} of the bound")


def test_random_patterns_world1():
    rng, worst, seq = random.Random(2024), 0.0, 8192
    for i in range(200):
        rows = [random_lengths(rng, seq) for _ in range(2 if i % 4 == 0 else 1)]
        worst = max(worst, _check(rows, "auto", i % 2 == 0, 1000 + i,
                                  f"fuzz #{i} causal={i % 2 == 0} rows={[r[:8] for r in rows]}"))
    print(f"GPU-ERR documents fuzz world=1 (200 patterns): largest error {worst:.3f} of bound")
