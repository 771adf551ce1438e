"""Helpers of the GPU suites: an independent fp32 reference for packed rows, fuzzed document
patterns, sharded runs on the fused kernels and the bf16 comparison rule.

Tolerance (bf16 inputs and outputs, fp32 accumulation), per tensor: max |err| <= ATOL + RTOL *
max |reference|. A wrong mask, merge or exchange gives errors of the order of the values.
Ranks sharing one GPU: every rank computes on cuda:0 (gloo group, host-staged collectives).
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from seqpar_ring.layout import shard

ATOL, RTOL = 2e-2, 2e-2
NAMES = ("out", "dq", "dk", "dv")
DEV = "cuda"  # a CPU smoke run of the suites' plumbing sets "cpu" (and small sizes)


def dev() -> str:
    return DEV


def random_lengths(rng: random.Random, seq: int, longest: int = 5000) -> list[int]:
    """Document lengths 1...``longest`` (1-3 tokens often) and padding runs (negative), filling
    ``seq`` exactly."""
    out, left = [], seq
    while left:
        n = min(left, rng.choice([1, 1, 2, 3, rng.randint(1, 64), rng.randint(1, longest),
                                  rng.randint(min(1000, longest), longest)]))
        out.append(-n if rng.random() < 0.15 else n)
        left -= n
    return out


def ids_of(lengths: list[int]) -> torch.Tensor:
    """(S,) document ids of ``lengths`` (negative length: a padding run, id -1)."""
    row, doc = [], 0
    for n in lengths:
        row += [-1] * -n if n < 0 else [doc] * n
        doc += n > 0
    return torch.tensor(row)


def unspecified(ids: torch.Tensor, causal: bool) -> torch.Tensor:
    """(B, S) bool: trailing padding under causal (its output is unspecified, no loss flows)."""
    real = ids >= 0
    trailing = ~real & (real.long().flip(1).cumsum(1).flip(1) == 0)
    return trailing if causal else torch.zeros_like(trailing)


def inputs(seed: int, b: int, s: int, h: int, hkv: int, d: int):
    """q, k, v, dout (B, S, heads, D) fp32 on ``dev``, identical on every rank."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    return [torch.randn(b, s, n, d, device=DEV, generator=g) for n in (h, hkv, hkv, h)]


def doc_reference(q, k, v, dout, ids: torch.Tensor | None, causal: bool,
                  window: int | None = None):
    """fp32 reference, one SDPA call per document (independent of the planner): out, dq, dk, dv
    (B, S, heads, D). ``ids`` (B, S) on the host, None = one document; padding rows give 0.
    ``window`` (causal): query i sees keys i - window < j <= i (an explicit boolean mask)."""
    leaves = [x.detach().float().requires_grad_(True) for x in (q, k, v)]
    qf, kf, vf = leaves
    rep = qf.shape[2] // kf.shape[2]
    b, s = qf.shape[:2]
    ids = torch.zeros(b, s, dtype=torch.long) if ids is None else ids.cpu()
    rows = []
    for r in range(b):
        vals, counts = torch.unique_consecutive(ids[r], return_counts=True)
        pieces, a = [], 0
        for val, n in zip(vals.tolist(), counts.tolist()):
            e = a + n
            if val < 0:
                pieces.append(qf.new_zeros(1, n, qf.shape[2], qf.shape[3]))
            else:
                qs = qf[r:r + 1, a:e].transpose(1, 2)
                ks = kf[r:r + 1, a:e].repeat_interleave(rep, dim=2).transpose(1, 2)
                vs = vf[r:r + 1, a:e].repeat_interleave(rep, dim=2).transpose(1, 2)
                # the math backend: fp32 on CUDA may otherwise go to cuDNN, which refuses
                # 1-token sequences (s_q = s_kv = 1) — and the reference must be independent
                mask = None
                if window is not None and window < n:
                    i = torch.arange(n, device=qs.device)
                    mask = (i[None] <= i[:, None]) & (i[None] > i[:, None] - window)
                with sdpa_kernel(SDPBackend.MATH):
                    piece = F.scaled_dot_product_attention(
                        qs, ks, vs, attn_mask=mask, is_causal=causal and mask is None)
                pieces.append(piece.transpose(1, 2))
            a = e
        rows.append(torch.cat(pieces, dim=1))
    out = torch.cat(rows, dim=0)
    out.backward(dout.float())
    return [out.detach()] + [x.grad for x in leaves]


def run_sharded(fn, q, k, v, dout, p: int, me: int, layout: str, u: int = 1,
                dtype=torch.bfloat16):
    """Shard the full tensors for rank ``me``, run ``fn(q, k, v)`` and backward in ``dtype``:
    out, dq, dk, dv of this rank's tokens (fp32)."""
    def local(t):
        return shard(t, p, me, layout, ulysses_size=u).to(dtype).contiguous()

    ql, kl, vl = (local(t).requires_grad_(True) for t in (q, k, v))
    out = fn(ql, kl, vl)
    out.backward(local(dout))
    return [out.detach().float()] + [x.grad.float() for x in (ql, kl, vl)]


def compare(got, want, ctx: str, free: torch.Tensor | None = None) -> float:
    """Assert the bf16 rule on every tensor; return the worst err / (ATOL + RTOL * max|ref|)."""
    worst = 0.0
    for name, a, b in zip(NAMES, got, want):
        if name == "out" and free is not None:  # unspecified rows (trailing padding, causal)
            m = free.to(a.device)[:, :, None, None]
            a, b = a.masked_fill(m, 0), b.masked_fill(m, 0)
        assert torch.isfinite(a).all(), f"{ctx}: {name} not finite"
        err, scale = (a - b).abs().max().item(), b.abs().max().item()
        bound = ATOL + RTOL * scale
        assert err <= bound, f"{ctx}: {name} max err {err:.3g} (ref max {scale:.3g})"
        worst = max(worst, err / bound)
    return worst


def shards_of(full, p: int, me: int, layout: str, u: int = 1):
    return [shard(t, p, me, layout, ulysses_size=u) for t in full]


def cuda_worker_env() -> None:
    """Every rank of a shared-GPU group computes on cuda:0."""
    import os

    os.environ["LOCAL_RANK"] = "0"  # DeepSpeed/accelerate pick cuda:LOCAL_RANK
    if DEV == "cuda":
        torch.cuda.set_device(0)
    torch.set_num_threads(2)
