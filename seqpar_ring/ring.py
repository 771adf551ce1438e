"""Exact ring attention over an explicit sequence-parallel group.

Three layers, read top to bottom:

1. ``ring_forward`` / ``ring_backward``: plain functions that run one *pass* — the local Q shard
   against every K/V shard of the ring — given a ``RingPass`` (who sends to whom, which chunks
   each rank holds, the mask rule, the kernel). Q never moves. K/V travel as one packed
   (2, batch, kv_heads, seq, head_dim) buffer; the next exchange is posted before the current
   block is computed (double buffer) and awaited after. Backward sends K/V around again and the
   fp32 dK/dV accumulators travel with them, one hop behind, so each rank ends with the full
   gradient of its own K/V. ``comm="allgather"`` gathers K/V once instead and reduce-scatters
   dK/dV.
2. ``RingAttentionFunction``: the autograd wrapper. It saves q, k, v, out and lse — nothing
   quadratic and no per-step K/V copies — and recomputes block attention in backward.
3. ``ring_attention``: the public function on (batch, seq_local, heads, head_dim) tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

from . import comm as C
from .checks import check_inputs
from .kernels import select_kernel
from .kernels.merge import accumulation_dtype, empty_accumulators, merge_into
from .layout import chunk_ranges
from .schedule import BlockCall, Chunks, plan_blocks


@dataclass
class RingPass:
    """Static description of one pass of the ring (shared by forward and backward)."""

    ring: C.RingComm | None          # None: no communication (world size 1 or local segments)
    origins: list[int]               # group rank whose K/V this rank holds at each step
    chunks_of: Callable[[int], Chunks]  # group rank -> its chunks (global coordinates)
    me: int                          # this rank's group rank
    causal: bool
    kernel: Any
    scale: float
    bucket_size: int | None = None
    window: int | None = None        # dilated segment length (chunk coordinates)
    gather_group: Any = None         # set for comm="allgather"

    def calls(self, origin: int) -> list[BlockCall]:
        mine, theirs = self.chunks_of(self.me), self.chunks_of(origin)
        return plan_blocks(mine, theirs, self.causal, self.window)


def _segmented(x: torch.Tensor, w: int) -> torch.Tensor:
    """(B, H, L, D) -> (B * L/w, H, w, D): windows become batch entries.

    A view when x's memory is (B, L, H, D) — the model's layout, which the ring keeps — so the
    fused kernels read the windows in place.
    """
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b * (n // w), w, h, d).transpose(1, 2)


def _unsegmented(x: torch.Tensor, b: int) -> torch.Tensor:
    """Inverse of ``_segmented`` for (B*L/w, H, w, ...) -> (B, H, L, ...)."""
    nseg, h, w = x.shape[0] // b, x.shape[1], x.shape[2]
    return x.transpose(1, 2).reshape(b, nseg * w, h, *x.shape[3:]).transpose(1, 2)


def _window_ids(call: BlockCall, b: int, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Window index of every row of a masked call, as (batch, rows) document ids."""
    q = (torch.arange(n, device=device) + call.q0) // call.window
    k = (torch.arange(n, device=device) + call.k0) // call.window
    return q.expand(b, n), k.expand(b, n)


def _fwd_call(ps: RingPass, call: BlockCall, q, k, v, q_doc, k_doc):
    qb, kb, vb = q[:, :, call.q], k[:, :, call.k], v[:, :, call.k]
    kw = dict(causal=call.causal, scale=ps.scale, bucket_size=ps.bucket_size)
    if call.masked:
        qd, kd = _window_ids(call, q.shape[0], qb.shape[2], q.device)
        return ps.kernel.forward(qb, kb, vb, q_doc=qd, k_doc=kd, **kw)
    if call.window is None:
        qd = None if q_doc is None else q_doc[:, call.q]
        kd = None if k_doc is None else k_doc[:, call.k]
        return ps.kernel.forward(qb, kb, vb, q_doc=qd, k_doc=kd, **kw)
    w, b = call.window, q.shape[0]
    o, lse = ps.kernel.forward(_segmented(qb, w), _segmented(kb, w), _segmented(vb, w), **kw)
    return _unsegmented(o, b), _unsegmented(lse.unsqueeze(-1), b).squeeze(-1)


def _bwd_call(ps: RingPass, call: BlockCall, dout, q, k, v, out, lse, delta, q_doc, k_doc):
    sl = (slice(None), slice(None), call.q)
    kw = dict(causal=call.causal, scale=ps.scale, bucket_size=ps.bucket_size)
    delta_b = None if delta is None else delta[sl]
    if call.window is None or call.masked:
        if call.masked:
            qd, kd = _window_ids(call, q.shape[0], q[sl].shape[2], q.device)
        else:
            qd = None if q_doc is None else q_doc[:, call.q]
            kd = None if k_doc is None else k_doc[:, call.k]
        return ps.kernel.backward(
            dout[sl], q[sl], k[:, :, call.k], v[:, :, call.k], out[sl], lse[sl],
            q_doc=qd, k_doc=kd, delta=delta_b, **kw,
        )
    w, b = call.window, q.shape[0]

    def seg(x):
        return _segmented(x, w)

    def seg_rows(x):  # (B, H, L) per-row values
        return None if x is None else seg(x.unsqueeze(-1)).squeeze(-1)

    dq, dk, dv = ps.kernel.backward(
        seg(dout[sl]), seg(q[sl]), seg(k[:, :, call.k]), seg(v[:, :, call.k]), seg(out[sl]),
        seg_rows(lse[sl]), delta=seg_rows(delta_b), **kw,
    )
    return _unsegmented(dq, b), _unsegmented(dk, b), _unsegmented(dv, b)


def _wire(x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """The contiguous tensor that travels for a (B, H, n, D) view, without a copy when possible.

    Model code usually hands us (B, n, H, D) memory viewed as (B, H, n, D): that memory is sent
    as it is and viewed back on arrival.
    """
    t = x.transpose(1, 2)
    return (t, True) if t.is_contiguous() else (x.contiguous(), False)


class _KVRing:
    """K/V (and doc ids) moving around the ring: own tensors first, then two receive buffers.

    The tensors of step s are sent while step s is computed and step s+1's arrive in a buffer
    that is neither the one being sent nor the caller's own K/V.
    """

    def __init__(self, ps: RingPass, k, v, doc):
        (kw, self.tk), (vw, self.tv) = _wire(k), _wire(v)
        self.ps, self.bufs = ps, [[kw, vw] + ([] if doc is None else [doc]), None, None]
        self.works = None

    def step(self, s: int):
        """Post step s+1's exchange (if any); return step s's (k, v, doc) views."""
        cur = self.bufs[0] if s == 0 else self.bufs[1 + (s - 1) % 2]
        if s + 1 < len(self.ps.origins):
            slot = 1 + s % 2
            if self.bufs[slot] is None:
                self.bufs[slot] = [torch.empty_like(t) for t in cur]
            self.works = self.ps.ring.post(cur, self.bufs[slot])
        k = cur[0].transpose(1, 2) if self.tk else cur[0]
        v = cur[1].transpose(1, 2) if self.tv else cur[1]
        return k, v, cur[2] if len(cur) > 2 else None

    def wait(self):
        if self.works is not None:
            self.ps.ring.wait(self.works)
            self.works = None


def _gathered(ps: RingPass, k, v, doc):
    """All-gather mode: every origin's (k, v, doc) at once, in (B, H, n, D) views."""
    kw, tk = _wire(k)
    vw, tv = _wire(v)
    ks, vs = C.all_gather_kv(kw, ps.gather_group), C.all_gather_kv(vw, ps.gather_group)
    docs = None if doc is None else C.all_gather_kv(doc, ps.gather_group)
    return [(ks[j].transpose(1, 2) if tk else ks[j], vs[j].transpose(1, 2) if tv else vs[j],
             None if docs is None else docs[j]) for j in range(ks.shape[0])]


def _local_call(ps: RingPass, n_q: int, n_k: int) -> BlockCall | None:
    """The single kernel call of a pass that stays on this rank and covers every row, if so."""
    if ps.ring is not None or ps.gather_group is not None or len(ps.origins) != 1:
        return None
    calls = ps.calls(ps.origins[0])
    if len(calls) != 1:
        return None
    c = calls[0]
    whole = all(s.start in (0, None) and s.stop == n for s, n in ((c.q, n_q), (c.k, n_k)))
    return c if whole else None


def _delta(ps: RingPass, dout, out):
    """rowsum(dout * out) for kernels that take it precomputed (the fused ones compute it)."""
    if not ps.kernel.needs_delta:
        return None
    acc = accumulation_dtype(dout.dtype)
    return (dout.to(acc) * out.to(acc)).sum(-1)


def ring_forward(ps: RingPass, q, k, v, q_doc=None, k_doc=None):
    """One pass forward. q (B, H, n, D); k, v (B, Hkv, n, D); docs (B, n) or None.

    Returns out (B, H, n, D) and lse (B, H, n): out in the accumulation dtype (fp32; fp64 for
    fp64 inputs), except when one local kernel call makes the whole pass (world size 1, local
    dilated segments) — then the kernel's own result, with no accumulator and no merge.
    """
    call = _local_call(ps, q.shape[2], k.shape[2])
    if call is not None:
        return _fwd_call(ps, call, q, k, v, q_doc, k_doc)
    out, lse = empty_accumulators(q, accumulation_dtype(q.dtype))
    if ps.gather_group is not None:
        blocks = _gathered(ps, k, v, k_doc)
    else:
        kv = _KVRing(ps, k, v, k_doc)
    for step, origin in enumerate(ps.origins):
        kb, vb, db = blocks[origin] if ps.gather_group is not None else kv.step(step)
        for call in ps.calls(origin):
            o, l_ = _fwd_call(ps, call, q, kb, vb, q_doc, db)
            merge_into(out[:, :, call.q], lse[:, :, call.q], o, l_)
        if ps.gather_group is None:
            kv.wait()
    return out, lse


def ring_backward(ps: RingPass, dout, q, k, v, out, lse, q_doc=None, k_doc=None):
    """One pass backward with the MERGED out/lse. Returns dq, dk, dv in the accumulation dtype
    (the kernel's dtype when one local call makes the pass, as in ``ring_forward``).

    dK/dV of the K/V block held at step s are accumulated (fp32) in a buffer that then moves one
    hop, so it meets the K/V it belongs to at the next rank; after a full lap it is home. Two
    such buffers exist: one in flight, one receiving.
    """
    delta = _delta(ps, dout, out)
    call = _local_call(ps, q.shape[2], k.shape[2])
    if call is not None:  # one local call: its gradients are the pass's
        return _bwd_call(ps, call, dout, q, k, v, out, lse, delta, q_doc, k_doc)
    acc = accumulation_dtype(q.dtype)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    dkv_shape = (2, *k.shape)
    allgather = ps.gather_group is not None
    if allgather:
        blocks = _gathered(ps, k, v, k_doc)
        dkv_all = torch.zeros((len(blocks), *dkv_shape), dtype=acc, device=q.device)
    else:
        kv = _KVRing(ps, k, v, k_doc)
    recv = send = works = None
    for step, origin in enumerate(ps.origins):
        kb, vb, db = blocks[origin] if allgather else kv.step(step)
        partials = []
        for call in ps.calls(origin):
            dq_b, dk_b, dv_b = _bwd_call(ps, call, dout, q, kb, vb, out, lse, delta, q_doc, db)
            dq[:, :, call.q] += dq_b
            partials.append((call.k, dk_b, dv_b))
        if allgather:
            target = dkv_all[origin]
        elif step == 0:
            target = recv = torch.zeros(dkv_shape, dtype=acc, device=q.device)
        else:
            ps.ring.wait(works)  # this origin's partial sum has arrived in `recv`; `send` is free
            target = recv
        for ks, dk_b, dv_b in partials:
            target[0][:, :, ks] += dk_b
            target[1][:, :, ks] += dv_b
        del partials
        if not allgather and ps.ring is not None:
            recv, send = (send if send is not None else torch.empty_like(recv)), recv
            works = ps.ring.post([send], [recv], tag=8)
        if not allgather:
            kv.wait()
    if allgather:
        dkv = C.reduce_scatter_kv(dkv_all, ps.gather_group)
    elif ps.ring is not None:  # the last hop brings this rank's own dK/dV home
        ps.ring.wait(works)
        dkv = recv
    else:
        dkv = recv
    return dq, dkv[0], dkv[1]


class RingAttentionFunction(torch.autograd.Function):
    """Autograd wrapper of one ring pass: q (B, H, n, D), k/v (B, Hkv, n, D) -> out (B, H, n, D)."""

    @staticmethod
    def forward(ctx, q, k, v, doc, ps: RingPass):
        out, lse = ring_forward(ps, q, k, v, doc, doc)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse, doc)
        ctx.ps = ps
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, doc = ctx.saved_tensors
        dq, dk, dv = ring_backward(ctx.ps, dout, q, k, v, out, lse, doc, doc)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None


LAYOUTS = ("contiguous", "zigzag")
COMMS = ("ring", "allgather")


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group=None,
    *,
    causal: bool = True,
    layout: str = "contiguous",
    comm: str = "ring",
    scale: float | None = None,
    bucket_size: int | None = None,
    kernel: str = "auto",
    doc_ids: torch.Tensor | None = None,
    timeout_s: float = C.DEFAULT_TIMEOUT_S,
) -> torch.Tensor:
    """Exact softmax attention over the whole sequence, sharded across ``group``.

    q: (batch, seq_local, heads, head_dim); k, v: (batch, seq_local, kv_heads, head_dim) with
    heads % kv_heads == 0. Rank r of ``group`` holds the tokens ``layout.shard`` gives it
    ("contiguous": one block; "zigzag": chunks r and 2p-1-r, balanced under ``causal``).
    ``doc_ids`` (batch, seq_local) restricts attention to keys of the same document; negative
    ids are padding and never attended. Rows that see no key return 0.
    Returns (batch, seq_local, heads, head_dim) in q's dtype. ``group=None`` or a group of one
    rank computes locally with no communication.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is not one of {LAYOUTS}")
    if comm not in COMMS:
        raise ValueError(f"comm={comm!r} is not one of {COMMS}")
    p, me = C.group_size(group), C.group_rank(group)
    n = q.shape[1]
    if layout == "zigzag" and n % 2:
        raise ValueError(f"layout='zigzag' needs an even seq_local, got {n}: pad the sequence to a "
                         f"multiple of 2 * sp_size ({2 * p})")
    if doc_ids is not None and tuple(doc_ids.shape) != tuple(q.shape[:2]):
        raise ValueError(f"doc_ids must be (batch, seq_local) = {tuple(q.shape[:2])}, "
                         f"got {tuple(doc_ids.shape)}")
    check_inputs(q, k, v, group, what="ring_attention", extra=dict(
        causal=int(causal), layout=LAYOUTS.index(layout), comm=COMMS.index(comm),
        docs=int(doc_ids is not None)))
    kern = select_kernel(kernel, q, doc_ids=doc_ids is not None)
    seq = n * p
    ps = RingPass(
        ring=C.RingComm(group, timeout_s=timeout_s) if p > 1 and comm == "ring" else None,
        origins=[(me - s) % p for s in range(p)],
        chunks_of=lambda r: chunk_ranges(seq, p, r, layout),
        me=me, causal=causal, kernel=kern,
        scale=scale if scale is not None else 1.0 / math.sqrt(q.shape[-1]),
        bucket_size=bucket_size,
        gather_group=group if p > 1 and comm == "allgather" else None,
    )
    out = RingAttentionFunction.apply(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), doc_ids, ps
    )
    return out.transpose(1, 2)
