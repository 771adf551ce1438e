"""LongNet dilated attention over the sequence-parallel ring (the function of SPEC-dilated.md).

Branch i (segment length w, rate r) lets head h attend among the positions p with
p ≡ h (mod r) inside one segment of w' = min(w, S) tokens. Because every segment starts at a
multiple of r, a branch is plain (causal) attention on a *sparsified* sequence — the rows
p = o + t·r of each head, t = 0, 1, … — cut into windows of w'/r rows. So each branch:

1. selects its rows locally (cached index tensors, no Python loop over tokens) — K/V shrink by
   r before they travel;
2. runs one ring pass (``ring.ring_forward``) in those sparse coordinates: segments that fit in
   a rank's shard are computed locally with no communication; longer segments use a sub-ring of
   just the w'/n ranks that share the segment;
3. scatters its (out, lse) back to the dense rows (unselected rows: lse = -inf) and merges them
   with the other branches by log-sum-exp — the same merge as ring blocks.

Backward runs each branch's ring backward with the MERGED out and lse (one softmax over all
branches' keys), so no branch weight is treated as a constant.

Layout: contiguous only (each rank holds n = S/p consecutive tokens); every rate must divide
n. Segments aligned with the shards (w' divides n or is a multiple of it — e.g. powers of two)
run on any kernel and send K/V only within their sub-ring; other segment lengths are exact too,
but use the whole ring and the row-masked torch kernel. Query head h reads kv head h // (H/Hkv);
with GQA, K/V are sent once per (kv head, offset) pair that some query head needs.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache, partial

import torch

from . import comm as C
from .kernels import select_kernel
from .kernels.merge import accumulation_dtype, empty_accumulators, merge_into
from .checks import check_inputs
from .ring import RingPass, ring_backward, ring_forward


def validate_schedule(segment_lengths, dilation_rates, seq_len: int | None = None):
    """The validation rules of SPEC-dilated.md; returns the lists as tuples."""
    ws, rs = tuple(segment_lengths or ()), tuple(dilation_rates or ())
    if not ws or len(ws) != len(rs):
        raise ValueError(f"segment_lengths {list(ws)} and dilation_rates {list(rs)} must be "
                         "non-empty lists of the same length (one rate per segment length)")
    for w, r in zip(ws, rs):
        if int(w) != w or int(r) != r or w < 1 or r < 1:
            raise ValueError(f"segment length {w} / dilation rate {r}: both must be integers >= 1")
        if w % r:
            raise ValueError(f"segment length {w} is not a multiple of its dilation rate {r}: "
                             f"use a segment length divisible by {r}")
        if seq_len is not None and seq_len % min(w, seq_len):
            raise ValueError(f"sequence length {seq_len} is not a multiple of segment length {w}: "
                             f"pad the sequence to a multiple of {w} or change the segment length")
    return ws, rs


@dataclass(frozen=True)
class HeadPlan:
    """Which (kv head, offset) pairs travel, and the query-head order that groups them.

    Query heads in ``perm`` order map to sparse kv head i // (heads / U), U = len(kv_head).
    ``q_identity`` / ``kv_identity``: no head reordering is needed (MHA, and GQA whenever the
    rate keeps heads in order) — then rows are gathered and scattered in place, no dense copies.
    """

    perm: torch.Tensor
    inv: torch.Tensor
    q_off: torch.Tensor
    kv_head: torch.Tensor
    kv_off: torch.Tensor
    q_identity: bool
    kv_identity: bool


@lru_cache(maxsize=64)
def _head_plan(heads: int, kv_heads: int, r: int, device: str) -> HeadPlan:
    g = heads // kv_heads
    pairs = [(h // g, h % r) for h in range(heads)]
    counts = Counter(pairs)
    if len(set(counts.values())) == 1:  # uniform groups: send each pair once, GQA-style
        perm = sorted(range(heads), key=lambda h: (pairs[h], h))
        uniq = sorted(counts)
    else:  # irregular grouping: one sparse kv head per query head
        perm = list(range(heads))
        uniq = pairs
    dev = torch.device(device)

    def t(x):
        return torch.tensor(x, dtype=torch.long, device=dev)

    inv = [0] * heads
    for i, h in enumerate(perm):
        inv[h] = i
    kv_head = [u[0] for u in uniq]
    return HeadPlan(t(perm), t(inv), t([pairs[h][1] for h in perm]), t(kv_head),
                    t([u[1] for u in uniq]), perm == list(range(heads)),
                    kv_head == list(range(kv_heads)))


def _index(offsets: torch.Tensor, shape) -> torch.Tensor:
    b, h, m, d = shape
    return offsets.view(1, h, 1, 1, 1).expand(b, h, m, 1, d)


def _select(x: torch.Tensor, offsets: torch.Tensor, r: int) -> torch.Tensor:
    """(B, H, n, D) -> (B, H, n/r, D): row o_h + t·r of head h."""
    b, h, n, d = x.shape
    if r == 1:
        return x
    return x.reshape(b, h, n // r, r, d).gather(3, _index(offsets, (b, h, n // r, d))).squeeze(3)


def _scatter(xs: torch.Tensor, offsets: torch.Tensor, r: int, fill: float = 0.0) -> torch.Tensor:
    """Inverse of ``_select``: (B, H, m, D) -> (B, H, m·r, D), ``fill`` in unselected rows."""
    if r == 1:
        return xs
    b, h, m, d = xs.shape
    out = xs.new_full((b, h, m, r, d), fill)
    out.scatter_(3, _index(offsets, xs.shape), xs.unsqueeze(3))
    return out.view(b, h, m * r, d)


def _q_rows(x: torch.Tensor, plan: HeadPlan, r: int) -> torch.Tensor:
    return _select(x if plan.q_identity else x[:, plan.perm], plan.q_off, r)


def _kv_rows(x: torch.Tensor, plan: HeadPlan, r: int) -> torch.Tensor:
    return _select(x if plan.kv_identity else x[:, plan.kv_head], plan.kv_off, r)


def _add_rows(dst: torch.Tensor, src: torch.Tensor, heads: torch.Tensor, identity: bool,
              offsets: torch.Tensor, r: int) -> None:
    """dst (B, H, n, D) += src (B, U, n/r, D) placed at its heads' rows (inverse of selection)."""
    if identity and r == 1:
        dst += src
    elif identity:
        b, h, n, d = dst.shape
        dst.view(b, h, n // r, r, d).scatter_add_(3, _index(offsets, src.shape), src.unsqueeze(3))
    else:
        dst.index_add_(1, heads, _scatter(src, offsets, r))


def _merge_branch(out, lse, o, lse_b, plan: HeadPlan, r: int) -> None:
    """Merge one branch's sparse (out, lse) into the dense accumulators, in place."""
    if plan.q_identity and r == 1:
        merge_into(out, lse, o, lse_b)
    elif plan.q_identity:  # gather the touched rows, merge, put them back: O(n/r) traffic
        b, h, n, d = out.shape
        sel_o, sel_l = _select(out, plan.q_off, r), _select(lse.unsqueeze(-1), plan.q_off, r)
        sel_l = sel_l.squeeze(-1)
        merge_into(sel_o, sel_l, o, lse_b)
        out.view(b, h, n // r, r, d).scatter_(3, _index(plan.q_off, o.shape), sel_o.unsqueeze(3))
        lse.view(b, h, n // r, r, 1).scatter_(
            3, _index(plan.q_off, (b, h, n // r, 1)), sel_l.unsqueeze(-1).unsqueeze(3))
    else:  # reordered heads: go through dense copies (-inf where the branch has no row)
        o = _scatter(o, plan.q_off, r)[:, plan.inv]
        lse_b = _scatter(lse_b.unsqueeze(-1), plan.q_off, r, float("-inf")).squeeze(-1)
        merge_into(out, lse, o, lse_b[:, plan.inv])


class _Zigzag:
    """Deal a sub-ring's sparse rows out in zigzag order, and back.

    Member i of a sub-ring of P ranks holds the contiguous sparse chunk i of its segment; under
    causal attention member P-1 would do 2P-1 times the work of member 0. Cut every chunk in two
    halves (2P half-chunks); zigzag order gives member i halves i and 2P-1-i, so all members do
    equal work. Only half of each sparse tensor moves, once before and once after the ring pass.
    """

    def __init__(self, group, base: int, size: int, me: int, rows: int, timeout_s: float):
        self.group, self.base, self.size, self.timeout_s = group, base, size, timeout_s
        self.i, self.half = me - base, rows // 2
        self.contig = [2 * self.i, 2 * self.i + 1]              # half-chunks held before
        self.zig = [self.i, 2 * size - 1 - self.i]               # half-chunks held after

    def zig_owner(self, c: int) -> int:
        return c if c < self.size else 2 * self.size - 1 - c

    def chunks_of(self, member: int, start: int) -> list[tuple[int, int]]:
        """Chunks (sparse global coordinates) of group rank ``member`` in zigzag order."""
        i, h = member - self.base, self.half
        return [(start + i * h, h), (start + (2 * self.size - 1 - i) * h, h)]

    def _move(self, tensors, have, want, dest, src):
        out = [torch.empty_like(t) for t in tensors]
        sends, recvs, landing = [], [], []
        for ti, (t, o) in enumerate(zip(tensors, out)):
            halves, targets = t.split(self.half, dim=2), o.split(self.half, dim=2)
            for slot, c in enumerate(have):  # increasing c on both sides: pairs match in order
                d = dest(c)
                if d == self.i:
                    targets[want.index(c)].copy_(halves[slot])
                else:
                    sends.append((halves[slot].contiguous(), self.base + d, ti * 64 + c))
            for slot, c in enumerate(want):
                s_ = src(c)
                if s_ != self.i:
                    buf = torch.empty_like(targets[slot], memory_format=torch.contiguous_format)
                    recvs.append((buf, self.base + s_, ti * 64 + c))
                    landing.append((targets[slot], buf))
        C.exchange(self.group, sends, recvs, self.timeout_s)
        for target, buf in landing:
            target.copy_(buf)
        return out

    def to_zigzag(self, tensors):
        return self._move(tensors, self.contig, self.zig, self.zig_owner, lambda c: c // 2)

    def from_zigzag(self, tensors):
        return self._move(tensors, self.zig, self.contig, lambda c: c // 2, self.zig_owner)


@dataclass
class _Branch:
    ps: RingPass
    r: int
    plan: HeadPlan
    zigzag: _Zigzag | None = None


def _branches(q, k, group, ws, rs, *, causal, kernel, scale, bucket_size, timeout_s):
    p, me = C.group_size(group), C.group_rank(group)
    n = q.shape[2]
    seq = n * p
    out = []
    for w, r in zip(ws, rs):
        wp = min(w, seq)
        plan = _head_plan(q.shape[1], k.shape[1], r, str(q.device))
        m = n // r  # sparse rows per rank
        chunks_of, zigzag = (lambda j, m=m: [(j * m, m)]), None
        if wp <= n and n % wp == 0:  # segments inside the shard: local, never on the network
            ring, origins = None, [me]
        elif wp > n and wp % n == 0:  # a segment spans `size` whole shards: a sub-ring of them
            size = wp // n
            base = (me // size) * size
            ring = C.RingComm(group, list(range(base, base + size)), timeout_s=timeout_s)
            origins = [base + (me - base - s) % size for s in range(size)]
            if causal and m % 2 == 0:  # balance the causal work of the sub-ring
                zigzag = _Zigzag(group, base, size, me, m, timeout_s)
                chunks_of = partial(zigzag.chunks_of, start=base * m)
        else:  # segments straddle shard boundaries: the whole ring, masked by window index
            ring = C.RingComm(group, timeout_s=timeout_s) if p > 1 else None
            origins = [(me - s) % p for s in range(p)]
        ps = RingPass(ring=ring, origins=origins, chunks_of=chunks_of, me=me, causal=causal,
                      kernel=kernel, scale=scale, bucket_size=bucket_size, window=wp // r)
        out.append(_Branch(ps, r, plan, zigzag))
    return out


class DilatedAttentionFunction(torch.autograd.Function):
    """q (B, H, n, D), k/v (B, Hkv, n, D) -> out (B, H, n, D), all branches merged."""

    @staticmethod
    def forward(ctx, q, k, v, branches):
        out, lse = empty_accumulators(q, accumulation_dtype(q.dtype))
        for br in branches:
            pl, r = br.plan, br.r
            qs, ks, vs = _q_rows(q, pl, r), _kv_rows(k, pl, r), _kv_rows(v, pl, r)
            if br.zigzag is not None:
                qs, ks, vs = br.zigzag.to_zigzag([qs, ks, vs])
            o, lse_b = ring_forward(br.ps, qs, ks, vs)
            if br.zigzag is not None:
                o, lse_b = br.zigzag.from_zigzag([o, lse_b])
            _merge_branch(out, lse, o, lse_b, pl, r)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.branches = branches
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        acc = accumulation_dtype(q.dtype)
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        dk = torch.zeros(k.shape, dtype=acc, device=q.device)
        dv = torch.zeros(v.shape, dtype=acc, device=q.device)
        for br in ctx.branches:
            pl, r = br.plan, br.r
            lses = _q_rows(lse.unsqueeze(-1), pl, r).squeeze(-1)
            rows = [_q_rows(dout, pl, r), _q_rows(q, pl, r), _kv_rows(k, pl, r),
                    _kv_rows(v, pl, r), _q_rows(out, pl, r), lses]
            if br.zigzag is not None:
                rows = br.zigzag.to_zigzag(rows)
            dqs, dks, dvs = ring_backward(br.ps, *rows)
            if br.zigzag is not None:
                dqs, dks, dvs = br.zigzag.from_zigzag([dqs, dks, dvs])
            _add_rows(dq, dqs, pl.perm, pl.q_identity, pl.q_off, r)
            _add_rows(dk, dks, pl.kv_head, pl.kv_identity, pl.kv_off, r)
            _add_rows(dv, dvs, pl.kv_head, pl.kv_identity, pl.kv_off, r)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None


def dilated_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group=None,
    *,
    segment_lengths,
    dilation_rates,
    causal: bool = True,
    layout: str = "contiguous",
    scale: float | None = None,
    bucket_size: int | None = None,
    kernel: str = "auto",
    timeout_s: float = C.DEFAULT_TIMEOUT_S,
) -> torch.Tensor:
    """LongNet dilated attention (SPEC-dilated.md) of the sequence sharded across ``group``.

    q: (batch, seq_local, heads, head_dim); k, v: (batch, seq_local, kv_heads, head_dim), tokens
    laid out contiguously (rank r holds [r·n, (r+1)·n)). Returns (batch, seq_local, heads,
    head_dim): exactly the rows of the spec's function at this rank's positions.
    ``segment_lengths=[S], dilation_rates=[1]`` is dense attention.
    """
    if layout != "contiguous":
        raise ValueError(f"dilated attention supports layout='contiguous' only (got {layout!r}): "
                         "segments are balanced by construction, so set layout='contiguous'")
    p = C.group_size(group)
    n = q.shape[1]
    seq = n * p
    ws, rs = validate_schedule(segment_lengths, dilation_rates, seq)
    aligned = True
    for w, r in zip(ws, rs):
        wp = min(w, seq)
        if n % r:
            raise ValueError(f"seq_local {n} is not a multiple of dilation rate {r}: pad the "
                             f"sequence to a multiple of sp_size * {r} = {p * r}")
        aligned &= (wp <= n and n % wp == 0) or (wp > n and wp % n == 0)
    check_inputs(q, k, v, group, what="dilated_attention",
                 extra=dict(causal=int(causal), branches=len(ws), w0=ws[0], r0=rs[0]))
    # Segments that straddle shards are masked per row, which only the torch kernel can do.
    kern = select_kernel(kernel, q, doc_ids=not aligned)
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    branches = _branches(qh, kh, group, ws, rs, causal=causal, kernel=kern,
                         scale=scale if scale is not None else 1.0 / math.sqrt(q.shape[-1]),
                         bucket_size=bucket_size, timeout_s=timeout_s)
    return DilatedAttentionFunction.apply(qh, kh, vh, branches).transpose(1, 2)
