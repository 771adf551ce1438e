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

from . import calls as K
from . import comm as C
from .checks import check_inputs
from .documents import DocPlan, documents_for
from .kernels import select_kernel
from .kernels.merge import accumulation_dtype, merge_into
from .layout import chunk_ranges
from .recompute import kept
from .schedule import BlockCall, Chunks, plan_blocks
from .window import WindowPlan, check_window, plan_window


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
    docs: DocPlan | None = None      # packed documents / padding of this batch
    timeout_s: float = C.DEFAULT_TIMEOUT_S
    wplan: WindowPlan | None = None  # sliding window: calls per origin, peer exchanges
    ring_group: Any = None           # the group peer exchanges (wplan.steps) run in

    def calls(self, origin: int) -> list[BlockCall]:
        if self.wplan is not None:
            return self.wplan.by_origin[origin]
        if self.docs is not None:
            return self.docs.calls(origin)
        mine, theirs = self.chunks_of(self.me), self.chunks_of(origin)
        return plan_blocks(mine, theirs, self.causal, self.window)


def _wire(x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """The contiguous tensor that travels for a (B, H, n, D) view, without a copy when possible.

    Model code usually hands us (B, n, H, D) memory viewed as (B, H, n, D): that memory is sent
    as it is and viewed back on arrival.
    """
    t = x.transpose(1, 2)
    return (t, True) if t.is_contiguous() else (x.contiguous(), False)


def _like_model(shape, dtype, device, fill: float = 0.0) -> torch.Tensor:
    """A (B, H, n, D) tensor whose memory is (B, n, H, D), like the model's q/k/v: slices of
    its rows are then what the fused and varlen kernels read without copies."""
    b, h, n, d = shape
    return torch.full((b, n, h, d), fill, dtype=dtype, device=device).transpose(1, 2)


class _KVRing:
    """K/V moving around the ring: own tensors first, then two receive buffers.

    The tensors of step s are sent while step s is computed and step s+1's arrive in a buffer
    that is neither the one being sent nor the caller's own K/V.
    """

    def __init__(self, ps: RingPass, k, v):
        (kw, self.tk), (vw, self.tv) = _wire(k), _wire(v)
        self.ps, self.bufs = ps, [[kw, vw], None, None]
        self.works = None

    def step(self, s: int):
        """Post step s+1's exchange (if any); return step s's (k, v) views."""
        cur = self.bufs[0] if s == 0 else self.bufs[1 + (s - 1) % 2]
        if s + 1 < len(self.ps.origins):
            slot = 1 + s % 2
            if self.bufs[slot] is None:
                self.bufs[slot] = [torch.empty_like(t) for t in cur]
            self.works = self.ps.ring.post(cur, self.bufs[slot])
        k = cur[0].transpose(1, 2) if self.tk else cur[0]
        v = cur[1].transpose(1, 2) if self.tv else cur[1]
        return k, v

    def wait(self):
        if self.works is not None:
            self.ps.ring.wait(self.works)
            self.works = None


def _gathered(ps: RingPass, k, v):
    """All-gather mode: every origin's (k, v) at once, in (B, H, n, D) views."""
    kw, tk = _wire(k)
    vw, tv = _wire(v)
    ks = C.all_gather_kv(kw, ps.gather_group, ps.timeout_s)
    vs = C.all_gather_kv(vw, ps.gather_group, ps.timeout_s)
    return [(ks[j].transpose(1, 2) if tk else ks[j], vs[j].transpose(1, 2) if tv else vs[j])
            for j in range(ks.shape[0])]


def _local_calls(ps: RingPass, n_q: int, n_k: int) -> list[BlockCall] | None:
    """The calls of a pass that stays on this rank and writes every row at most once, if so.

    Such a pass needs no accumulator and no merge: one call covering every row returns the
    kernel's own result, several calls (packed documents) are copied into place.
    """
    if ps.ring is not None or ps.gather_group is not None or len(ps.origins) != 1:
        return None
    calls = ps.calls(ps.origins[0])
    if ps.docs is not None:
        return calls if ps.docs.disjoint else None
    return calls if len(calls) == 1 and _whole(calls[0], n_q, n_k) else None


def _delta(ps: RingPass, dout, out):
    """rowsum(dout * out) for kernels that take it precomputed (the fused ones compute it)."""
    if not ps.kernel.needs_delta:
        return None
    acc = accumulation_dtype(dout.dtype)
    return (dout.to(acc) * out.to(acc)).sum(-1)


def _whole(call: BlockCall, n_q: int, n_k: int) -> bool:
    """Does ``call`` cover every row of Q and K/V with one dense or segmented kernel call?"""
    return call.row is None and call.varlen is None and all(
        s.start in (0, None) and s.stop == n for s, n in ((call.q, n_q), (call.k, n_k)))


def _forward_local(ps: RingPass, calls: list[BlockCall], q, k, v):
    kw = dict(scale=ps.scale, bucket_size=ps.bucket_size)
    if len(calls) == 1 and _whole(calls[0], q.shape[2], k.shape[2]):
        return K.forward(ps.kernel, calls[0], q, k, v, **kw)
    out = _like_model(q.shape, q.dtype, q.device)  # rows no call covers: padding, out 0
    lse = torch.full(q.shape[:-1], float("-inf"), dtype=accumulation_dtype(q.dtype),
                     device=q.device)
    for call in calls:
        o, l_ = K.forward(ps.kernel, call, q, k, v, **kw)
        r = K.rows(call)
        out[r, :, call.q] = o
        lse[r, :, call.q] = l_
    return out, lse


def _backward_local(ps: RingPass, calls: list[BlockCall], dout, q, k, v, out, lse, delta):
    kw = dict(scale=ps.scale, bucket_size=ps.bucket_size)
    if len(calls) == 1 and _whole(calls[0], q.shape[2], k.shape[2]):
        return K.backward(ps.kernel, calls[0], dout, q, k, v, out, lse, delta, **kw)
    dq = _like_model(q.shape, q.dtype, q.device)
    dk = _like_model(k.shape, k.dtype, k.device)
    dv = _like_model(v.shape, v.dtype, v.device)
    for call in calls:
        dq_b, dk_b, dv_b = K.backward(ps.kernel, call, dout, q, k, v, out, lse, delta, **kw)
        r = K.rows(call)
        dq[r, :, call.q], dk[r, :, call.k], dv[r, :, call.k] = dq_b, dk_b, dv_b
    return dq, dk, dv


def ring_forward(ps: RingPass, q, k, v):
    """One pass forward. q (B, H, n, D); k, v (B, Hkv, n, D).

    Returns out (B, H, n, D) and lse (B, H, n): out in the accumulation dtype (fp32; fp64 for
    fp64 inputs), except when the pass stays on this rank and writes each row once (world size
    1, local dilated segments) — then the kernels' own results, with no accumulator or merge.
    """
    if ps.wplan is not None and ps.ring_group is not None:
        from .window_pass import peer_forward
        return peer_forward(ps, q, k, v)
    local = _local_calls(ps, q.shape[2], k.shape[2])
    if local is not None:
        return _forward_local(ps, local, q, k, v)
    acc = accumulation_dtype(q.dtype)
    out = _like_model(q.shape, acc, q.device)
    lse = torch.full(q.shape[:-1], float("-inf"), dtype=acc, device=q.device)
    allgather = ps.gather_group is not None
    if allgather:
        blocks = _gathered(ps, k, v)
    else:
        kv = _KVRing(ps, k, v)
    for step, origin in enumerate(ps.origins):
        kb, vb = blocks[origin] if allgather else kv.step(step)
        for call in ps.calls(origin):
            o, l_ = K.forward(ps.kernel, call, q, kb, vb, scale=ps.scale,
                              bucket_size=ps.bucket_size)
            r = K.rows(call)
            merge_into(out[r, :, call.q], lse[r, :, call.q], o, l_)
        if not allgather:
            kv.wait()
    return out, lse


def ring_backward(ps: RingPass, dout, q, k, v, out, lse):
    """One pass backward with the MERGED out/lse. Returns dq, dk, dv in the accumulation dtype
    (the kernels' dtype when the pass is local, as in ``ring_forward``).

    dK/dV of the K/V block held at step s are accumulated (fp32) in a buffer that then moves one
    hop, so it meets the K/V it belongs to at the next rank; after a full lap it is home. Two
    such buffers exist: one in flight, one receiving.
    """
    delta = _delta(ps, dout, out)
    if ps.wplan is not None and ps.ring_group is not None:
        from .window_pass import peer_backward
        return peer_backward(ps, dout, q, k, v, out, lse, delta)
    local = _local_calls(ps, q.shape[2], k.shape[2])
    if local is not None:
        return _backward_local(ps, local, dout, q, k, v, out, lse, delta)
    acc = accumulation_dtype(q.dtype)
    dq = _like_model(q.shape, acc, q.device)
    dkv_shape = (2, *k.shape)
    allgather = ps.gather_group is not None
    if allgather:
        blocks = _gathered(ps, k, v)
        dkv_all = torch.zeros((len(blocks), *dkv_shape), dtype=acc, device=q.device)
    else:
        kv = _KVRing(ps, k, v)
    recv = send = works = None
    for step, origin in enumerate(ps.origins):
        kb, vb = blocks[origin] if allgather else kv.step(step)
        partials = []
        for call in ps.calls(origin):
            dq_b, dk_b, dv_b = K.backward(ps.kernel, call, dout, q, kb, vb, out, lse, delta,
                                          scale=ps.scale, bucket_size=ps.bucket_size)
            r = K.rows(call)
            dq[r, :, call.q] += dq_b
            partials.append((r, call.k, dk_b, dv_b))
        if allgather:
            target = dkv_all[origin]
        elif step == 0:
            target = recv = torch.zeros(dkv_shape, dtype=acc, device=q.device)
        else:
            ps.ring.wait(works)  # this origin's partial sum has arrived in `recv`; `send` is free
            target = recv
        for r, ks, dk_b, dv_b in partials:
            target[0][r, :, ks] += dk_b
            target[1][r, :, ks] += dv_b
        del partials
        if not allgather and ps.ring is not None:
            recv, send = (send if send is not None else torch.empty_like(recv)), recv
            works = ps.ring.post([send], [recv], tag=8)
        if not allgather:
            kv.wait()
    if allgather:
        dkv = C.reduce_scatter_kv(dkv_all, ps.gather_group, ps.timeout_s)
    else:
        if ps.ring is not None:  # the last hop brings this rank's own dK/dV home
            ps.ring.wait(works)
        dkv = recv
    return dq, dkv[0], dkv[1]


def merge_sinks(out, lse, sinks):
    """Join a per-head sink logit (H,) to the softmax denominator of a finished pass.

    L' = logaddexp(lse, sink); out' = out * exp(lse - L'). Rows with no key (lse -inf) stay 0.
    Returns (out' in the accumulation dtype, L')."""
    acc = lse.dtype
    new = torch.logaddexp(lse, sinks.to(acc).view(1, -1, 1))
    return out.to(acc) * torch.exp(lse - new).unsqueeze(-1), new


def sinks_grad(dout, out, lse, sinks):
    """d loss / d sinks (H,) given the final out and lse (sink included): the sink's probability
    exp(sink - L) times -rowsum(dout * out), summed over batch and rows (a rank's share)."""
    acc = lse.dtype
    delta = (dout.to(acc) * out.to(acc)).sum(-1)
    return -(torch.exp(sinks.to(acc).view(1, -1, 1) - lse) * delta).sum((0, 2))


class RingAttentionFunction(torch.autograd.Function):
    """Autograd wrapper of one ring pass: q (B, H, n, D), k/v (B, Hkv, n, D) -> out (B, H, n, D).

    ``sinks`` (H,) or None: learned sink logits (gpt-oss) that join every row's softmax
    denominator once; backward with the final out/lse is then exact for q, k, v as it stands.
    """

    @staticmethod
    def forward(ctx, q, k, v, sinks, ps: RingPass):
        def compute():
            out, lse = ring_forward(ps, q, k, v)
            if sinks is not None:
                out, lse = merge_sinks(out, lse, sinks)
            return out.to(q.dtype), lse

        # under gradient checkpointing with recompute_attention=False: computed once (recompute.py)
        out, lse = kept(compute, q)
        ctx.save_for_backward(q, k, v, out, lse, sinks)
        ctx.ps = ps
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, sinks = ctx.saved_tensors
        dq, dk, dv = ring_backward(ctx.ps, dout, q, k, v, out, lse)
        ds = None
        if sinks is not None and ctx.needs_input_grad[3]:
            ds = sinks_grad(dout, out, lse, sinks).to(sinks.dtype)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), ds, None


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
    window: int | None = None,
    sinks: torch.Tensor | None = None,
    timeout_s: float = C.DEFAULT_TIMEOUT_S,
    agreed: bool = False,
) -> torch.Tensor:
    """Exact softmax attention over the whole sequence, sharded across ``group``.

    q: (batch, seq_local, heads, head_dim); k, v: (batch, seq_local, kv_heads, head_dim) with
    heads % kv_heads == 0. Rank r of ``group`` (a ``torch.distributed`` process group, e.g.
    ``SPGroups.sp_group``) holds the tokens ``layout.shard`` gives it ("contiguous": one block;
    "zigzag": chunks r and 2p-1-r, balanced under ``causal``).

    ``doc_ids`` (batch, seq_local), this rank's shard of the rows' document ids: a token sees
    only keys of its own document; negative ids are padding. Every document is one contiguous
    run of its row. Under ``causal`` a row's trailing padding is treated as part of its last
    document (invisible to every real token), so right-padded rows run at full speed; padding
    rows' outputs are then unspecified, every other row is exact. Other padding rows return 0.
    The documents are planned once per ``doc_ids`` tensor (one all-gather of the ids), so pass
    the same tensor to every layer of a forward.

    ``window`` W (causal only): transformers' ``sliding_window`` — the query at global position
    i sees keys j with i - W < j <= i (and of its own document). Block pairs no window reaches
    are neither sent nor computed; K/V travel only to the ranks the windows reach, and only the
    rows they reach (`seqpar_ring.window`). ``sinks`` (heads,): gpt-oss's learned per-head
    sink logits, joined once to every row's softmax denominator; they receive a gradient.

    Before any traffic the ranks agree on shapes, dtype and settings (one small all-gather; a
    bad input on any rank raises `AgreementError` on every rank). ``agreed=True`` skips that
    exchange when the caller agreed for this step already (the HF adapter does, once per model
    forward). Every wait is bounded by ``timeout_s``.

    Returns (batch, seq_local, heads, head_dim) in q's dtype. ``group=None`` or a group of one
    rank computes locally with no communication.
    """
    p, me = C.group_size(group), C.group_rank(group)
    chosen = []

    def local():
        if layout not in LAYOUTS:
            raise ValueError(f"layout={layout!r} is not one of {LAYOUTS}")
        if comm not in COMMS:
            raise ValueError(f"comm={comm!r} is not one of {COMMS}")
        n = q.shape[1]
        if layout == "zigzag" and p > 1 and n % 2:
            raise ValueError(f"layout='zigzag' needs an even seq_local, got {n}: pad the "
                             f"sequence to a multiple of 2 * sp_size ({2 * p})")
        if doc_ids is not None and tuple(doc_ids.shape) != tuple(q.shape[:2]):
            raise ValueError(f"doc_ids must be (batch, seq_local) = {tuple(q.shape[:2])}, "
                             f"got {tuple(doc_ids.shape)}")
        if bucket_size is not None and bucket_size < 1:
            raise ValueError(f"bucket_size={bucket_size} must be >= 1 (or None)")
        check_window(window, causal)
        if sinks is not None and tuple(sinks.shape) != (q.shape[2],):
            raise ValueError(f"sinks must be (heads,) = ({q.shape[2]},), got "
                             f"{tuple(sinks.shape)}")
        chosen.append(select_kernel(kernel, q))

    check_inputs(q, k, v, group, what="ring_attention", local=local, agreed=agreed,
                 timeout_s=timeout_s, settings=dict(
                     causal=causal, layout=layout, comm=comm, scale=scale, kernel=kernel,
                     bucket_size=bucket_size, docs=doc_ids is not None, window=window,
                     sinks=sinks is not None))
    if p == 1:
        layout = "contiguous"  # one rank holds the whole row in order under either layout
    seq = q.shape[1] * p

    def chunks_of(r: int) -> Chunks:
        return chunk_ranges(seq, p, r, layout)

    origins = [(me - s) % p for s in range(p)]
    docs = None
    if doc_ids is not None:
        docs = documents_for(doc_ids, group, layout, causal, origins, me, chunks_of,
                             min_rows=getattr(chosen[0], "min_rows", None))
    docs = None if docs is None or docs.trivial else docs
    wplan = None
    if window is not None:
        wplan = plan_window(window, p, me, chunks_of, docs, peer=p > 1 and comm == "ring")
        origins = wplan.origins
    ps = RingPass(
        ring=C.RingComm(group, timeout_s=timeout_s) if p > 1 and comm == "ring" and wplan is None
        else None,
        origins=origins, chunks_of=chunks_of, me=me, causal=causal, kernel=chosen[0],
        scale=scale if scale is not None else 1.0 / math.sqrt(q.shape[-1]),
        bucket_size=bucket_size,
        gather_group=group if p > 1 and comm == "allgather" else None,
        docs=docs, timeout_s=timeout_s, wplan=wplan,
        ring_group=group if wplan is not None and wplan.steps else None,
    )
    out = RingAttentionFunction.apply(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                      sinks, ps)
    return out.transpose(1, 2)
