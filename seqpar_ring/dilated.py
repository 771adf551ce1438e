"""LongNet dilated attention over the sequence-parallel ring (the function of docs/dilated.md).

Branch i (segment length w, rate r) lets head h attend among the positions p with
p ≡ h (mod r) inside one segment of w' = min(w, S) tokens. Because every segment starts at a
multiple of r, a branch is plain (causal) attention on a *sparsified* sequence — the rows
p = o + t·r of each head, t = 0, 1, … — cut into windows of w'/r rows. So each branch:

1. gathers its rows locally (``sparse.py``: strided copies per offset, none for r = 1) —
   K/V shrink by r before they travel;
2. runs one ring pass (``ring.ring_forward``) in those sparse coordinates: segments that fit in
   a rank's shard are one local kernel call with no communication; longer segments use a
   sub-ring of just the w'/n ranks that share the segment;
3. returns its sparse (out, lse). The branches are merged once at the end: the merged lse from
   the small lse tensors first, then out = sum_i exp(lse_i - L) out_i — the same log-sum-exp
   rule as ring blocks. The r = 1 branch's output is kept as the dense result; the others are
   summed in fp32 in the 1/c-size coordinates of their common rate c and added once
   (``_MergePlan``), so no dense fp32 accumulator is ever built. Gradients combine the same way.

Everything stays in the model's (batch, seq_local, heads, head_dim) layout, so a branch's
segments are views (windows become batch entries) and the fused kernels read them in place.

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
from dataclasses import dataclass
from functools import partial

import torch

from . import comm as C
from .checks import check_inputs
from .documents import single_document
from .kernels import select_kernel
from .kernels.merge import accumulation_dtype
from .recompute import kept
from .ring import RingPass, ring_backward, ring_forward
from .sparse import BranchHeads, branch_heads, nested_heads


def validate_schedule(segment_lengths, dilation_rates, seq_len: int | None = None):
    """The validation rules of docs/dilated.md; returns the lists as tuples."""
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
    heads: BranchHeads
    zigzag: _Zigzag | None = None


def _branches(n, heads, kv_heads, device, group, ws, rs, *, causal, kernel, scale, bucket_size,
              timeout_s):
    p, me = C.group_size(group), C.group_rank(group)
    seq = n * p
    out = []
    for w, r in zip(ws, rs):
        wp = min(w, seq)
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
        out.append(_Branch(ps, branch_heads(heads, kv_heads, r, str(device)), zigzag))
    return out


def _bhsd(x: torch.Tensor) -> torch.Tensor:
    """(B, rows, heads, D) <-> (B, heads, rows, D): the ring's layout, as a view."""
    return x.transpose(1, 2)


def _branch_forward(br: _Branch, q, k, v):
    """One branch on its sparse rows: out (B, n/r, H, D) in any float dtype, lse (B, n/r, H)."""
    hq, hkv = br.heads.q, br.heads.kv
    rows = [_bhsd(hq.take(q)), _bhsd(hkv.take(k)), _bhsd(hkv.take(v))]
    if br.zigzag is not None:
        rows = br.zigzag.to_zigzag(rows)
    o, lse = ring_forward(br.ps, *rows)
    if br.zigzag is not None:
        o, lse = br.zigzag.from_zigzag([o, lse])
    return _bhsd(o), lse.transpose(1, 2)


@dataclass(frozen=True)
class _MergePlan:
    """How branch results combine into dense tensors with the least memory traffic.

    The base is a branch with r = 1 (all rows, heads in order): its kernel output already is a
    dense tensor, kept as the result. Every other branch's rows lie inside the rows of rate
    c = gcd(their rates), so they are summed (fp32) in those 1/c-size sparse coordinates and
    added to the base once, with one rounding. Without a base the sum starts from zero.
    """

    base: int | None
    outer: BranchHeads | None               # rows of rate c (None: no other branch)
    nested: tuple[BranchHeads | None, ...]  # each other branch's rows inside them

    @staticmethod
    def of(rates: list[int], heads: int, kv_heads: int, device) -> "_MergePlan":
        base = rates.index(1) if 1 in rates else None
        rest = [r for i, r in enumerate(rates) if i != base]
        if not rest:
            return _MergePlan(base, None, tuple(None for _ in rates))
        c, dev = math.gcd(*rest), str(device)
        nested = tuple(None if i == base else nested_heads(heads, kv_heads, c, r, dev)
                       for i, r in enumerate(rates))
        return _MergePlan(base, branch_heads(heads, kv_heads, c, dev), nested)

    def sums(self, like: torch.Tensor, kv: bool, acc: torch.dtype) -> torch.Tensor:
        rows = self.outer.kv if kv else self.outer.q
        b, n, _, d = like.shape
        return torch.zeros((b, n // rows.r, len(rows.heads), d), dtype=acc, device=like.device)


def _merge(parts, branches, mp: _MergePlan, q):
    """Merge the branches' (out, lse) into out (B, n, H, D) in q's dtype and lse (B, n, H).

    The merged lse first (small tensors), then out = sum_i exp(lse_i - L) * out_i: the base's
    rows outside the other branches are its own output unchanged (weight exactly 1 there).
    Rows that no branch reaches keep lse = -inf and out = 0.
    """
    acc = accumulation_dtype(q.dtype)
    lse = torch.full(q.shape[:3], float("-inf"), dtype=acc, device=q.device)
    for (_, l_), br in zip(parts, branches):
        rows = br.heads.q
        rows.put(lse, torch.logaddexp(rows.take(lse), l_.to(acc)))
    safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    out = None if mp.base is None else parts[mp.base][0].to(q.dtype)
    if mp.outer is None:
        return out, lse
    rows_c = mp.outer.q
    if mp.base is not None:  # the base's share of the rows the other branches also reach
        o_b, l_b = parts[mp.base]
        sums = rows_c.take(o_b, torch.exp(rows_c.take(l_b.to(acc) - safe))).to(acc)
    else:
        sums = mp.sums(q, False, acc)
    for i, ((o, l_), br) in enumerate(zip(parts, branches)):
        if i != mp.base:
            weight = torch.exp(l_.to(acc) - br.heads.q.take(safe))
            mp.nested[i].q.add_to(sums, o, weight)
    if out is None:
        out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    rows_c.put(out, sums)
    return out, lse


class DilatedAttentionFunction(torch.autograd.Function):
    """q (B, n, H, D), k/v (B, n, Hkv, D) -> out (B, n, H, D), all branches merged."""

    @staticmethod
    def forward(ctx, q, k, v, branches, mp):
        def compute():
            parts = [_branch_forward(br, q, k, v) for br in branches]
            return _merge(parts, branches, mp, q)

        out, lse = kept(compute, q)  # computed once under checkpointing (recompute.py)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.branches, ctx.mp = branches, mp
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dout = dout.contiguous()  # the fused kernels want dout laid out like out
        mp, acc = ctx.mp, accumulation_dtype(q.dtype)
        base, sums = None, None  # base: the r = 1 branch's grads; sums: the others', fp32
        for i, br in enumerate(ctx.branches):
            hq, hkv = br.heads.q, br.heads.kv
            # each branch's backward takes the MERGED out and lse: one softmax over all branches
            rows = [_bhsd(hq.take(dout)), _bhsd(hq.take(q)), _bhsd(hkv.take(k)),
                    _bhsd(hkv.take(v)), _bhsd(hq.take(out)), hq.take(lse).transpose(1, 2)]
            if br.zigzag is not None:
                rows = br.zigzag.to_zigzag(rows)
            grads = ring_backward(br.ps, *rows)
            del rows
            if br.zigzag is not None:
                grads = br.zigzag.from_zigzag(list(grads))
            grads = [_bhsd(g) for g in grads]
            if i == mp.base:
                base = grads
                continue
            nest = mp.nested[i]
            sums = sums or [None, None, None]
            for j, (g, rows_in, x) in enumerate(zip(grads, (nest.q, nest.kv, nest.kv), (q, k, v))):
                if sums[j] is None and rows_in.identity:  # fp32 sums in rate-c coordinates
                    sums[j] = g.to(acc, copy=True)
                    continue
                if sums[j] is None:
                    sums[j] = mp.sums(x, j > 0, acc)
                rows_in.add_to(sums[j], g)
        if base is None:
            base = [torch.zeros(x.shape, dtype=x.dtype, device=x.device) for x in (q, k, v)]
        if mp.outer is not None:  # one rounding: base (its dtype) += fp32 sums
            for g, total, rows_c in zip(base, sums, (mp.outer.q, mp.outer.kv, mp.outer.kv)):
                rows_c.add_to(g, total)
        return (*(g.to(x.dtype) for g, x in zip(base, (q, k, v))), None, None)


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
    doc_ids: torch.Tensor | None = None,
    timeout_s: float = C.DEFAULT_TIMEOUT_S,
    agreed: bool = False,
) -> torch.Tensor:
    """LongNet dilated attention (docs/dilated.md) of the sequence sharded across ``group``.

    q: (batch, seq_local, heads, head_dim); k, v: (batch, seq_local, kv_heads, head_dim), tokens
    laid out contiguously (rank r holds [r·n, (r+1)·n)). Returns (batch, seq_local, heads,
    head_dim): exactly the rows of the spec's function at this rank's positions.
    ``segment_lengths=[S], dilation_rates=[1]`` is dense attention.

    ``doc_ids`` (batch, seq_local), as for `ring_attention`: only right-padded rows under
    ``causal`` are accepted (the padding lies in every real token's future, so the function on
    real tokens is unchanged and padding carries no loss); packed documents raise.
    Shapes, the schedule and the settings are agreed across ``group`` first, as in
    `ring_attention` (``agreed=True``: the caller did it for this step).
    """
    p = C.group_size(group)
    n = q.shape[1] if q.dim() == 4 else 0
    seq = n * p
    state = {}

    def local():
        if layout != "contiguous":
            raise ValueError(f"dilated attention supports layout='contiguous' only (got "
                             f"{layout!r}): segments are balanced by construction, so set "
                             "layout='contiguous'")
        ws, rs = validate_schedule(segment_lengths, dilation_rates, seq)
        aligned = True
        for w, r in zip(ws, rs):
            wp = min(w, seq)
            if n % r:
                raise ValueError(f"seq_local {n} is not a multiple of dilation rate {r}: pad the "
                                 f"sequence to a multiple of sp_size * {r} = {p * r}")
            aligned &= (wp <= n and n % wp == 0) or (wp > n and wp % n == 0)
        if doc_ids is not None and tuple(doc_ids.shape) != tuple(q.shape[:2]):
            raise ValueError(f"doc_ids must be (batch, seq_local) = {tuple(q.shape[:2])}, "
                             f"got {tuple(doc_ids.shape)}")
        # Segments that straddle shards are masked per row, which only the torch kernel can do.
        state.update(ws=ws, rs=rs, kernel=select_kernel(kernel, q, masked=not aligned))

    check_inputs(q, k, v, group, what="dilated_attention", local=local, agreed=agreed,
                 timeout_s=timeout_s, settings=dict(
                     causal=causal, layout=layout, scale=scale, kernel=kernel,
                     bucket_size=bucket_size, docs=doc_ids is not None,
                     segment_lengths=tuple(segment_lengths or ()),
                     dilation_rates=tuple(dilation_rates or ())))
    ws, rs, kern = state["ws"], state["rs"], state["kernel"]
    if doc_ids is not None and not single_document(doc_ids, group, layout, causal):
        raise ValueError(
            "dilated attention takes right-padded rows under causal attention only; packed "
            "documents, left/middle padding or non-causal padding need attention='ring'"
        )
    branches = _branches(n, q.shape[2], k.shape[2], q.device, group, ws, rs, causal=causal,
                         kernel=kern,
                         scale=scale if scale is not None else 1.0 / math.sqrt(q.shape[-1]),
                         bucket_size=bucket_size, timeout_s=timeout_s)
    mp = _MergePlan.of(list(rs), q.shape[2], k.shape[2], q.device)
    return DilatedAttentionFunction.apply(q, k, v, branches, mp)
