"""The windowed ring pass: K/V travel only to the peers a window reaches, and only the rows it
reaches (`window.plan_window`).

Instead of passing every shard around the whole ring, step ``d`` of the pass exchanges directly
with the ranks at distance d: send the rows of this rank's K/V that rank me + d needs, receive
the rows of rank me - d's K/V this rank needs. Every rank walks the steps in increasing d, so
each exchange only waits on peers that finished their earlier steps (no deadlock). The next
step's exchange is posted before the current step is computed (double buffer); the diagonal
block is computed while step 0's exchange is in flight.

Backward fetches the same rows again and returns each partial dK/dV (fp32) straight to the rank
that owns those K/V (one message per step, awaited one step later), which adds it into its own
accumulator. Kernels, block calls and the log-sum-exp merge are the ring's (`ring.py`).
"""

from __future__ import annotations

import torch

from . import calls as K
from . import comm as C
from .kernels.merge import accumulation_dtype, merge_into

_KV_TAG, _DKV_TAG = 64, 96


def _post(ps, sends, recvs, tag: int):
    """Post point-to-point messages: sends [(tensor, group rank)], recvs [(buffer, rank)] —
    through the transport, so a gloo group on CUDA tensors stages them through host memory."""
    return C.post_exchange(ps.ring_group, [(t, r, tag + i) for i, (t, r) in enumerate(sends)],
                           [(t, r, tag + i) for i, (t, r) in enumerate(recvs)])


def _wait(ps, works, step) -> None:
    what = (f"windowed ring exchange (distance {step.delta}: send to rank {step.send_to}, "
            f"receive from rank {step.recv_from}) — a peer that stopped before this step never "
            "sends")
    C.wait_exchange(works, ps.timeout_s, what, ps.ring_group)


class _PeerKV:
    """K/V rows arriving from the peers of each step; step i+1 is posted before step i is used."""

    def __init__(self, ps, k, v):
        self.ps, self.k, self.v = ps, k, v
        self.posted: dict[int, tuple] = {}

    def post(self, i: int) -> None:
        steps = self.ps.wplan.steps
        if i >= len(steps):
            return
        st = steps[i]
        sends, recvs, bufs = [], [], None
        if st.send_to is not None:
            rows = st.send_rows
            # (B, n', Hkv, D) memory: what the kernels read like the model's own layout
            sends = [(x[:, :, rows].transpose(1, 2).contiguous(), st.send_to)
                     for x in (self.k, self.v)]
        if st.recv_from is not None:
            b, h, _, d = self.k.shape
            n = st.recv_rows.stop - st.recv_rows.start
            bufs = [self.k.new_empty((b, n, h, d)) for _ in range(2)]
            recvs = [(t, st.recv_from) for t in bufs]
        self.posted[i] = (_post(self.ps, sends, recvs, _KV_TAG), sends, bufs)

    def take(self, i: int):
        """Wait for step i; return the received (k, v) as (B, Hkv, n', D) views, or None."""
        works, _, bufs = self.posted.pop(i)
        _wait(self.ps, works, self.ps.wplan.steps[i])
        return None if bufs is None else (bufs[0].transpose(1, 2), bufs[1].transpose(1, 2))


def peer_forward(ps, q, k, v):
    """Windowed pass forward: out (B, H, n, D) and lse (B, H, n) in the accumulation dtype."""
    from .ring import _like_model

    acc = accumulation_dtype(q.dtype)
    out = _like_model(q.shape, acc, q.device)
    lse = torch.full(q.shape[:-1], float("-inf"), dtype=acc, device=q.device)
    kw = dict(scale=ps.scale, bucket_size=ps.bucket_size)

    def run(origin, kb, vb):
        for call in ps.calls(origin):
            o, l_ = K.forward(ps.kernel, call, q, kb, vb, **kw)
            r = K.rows(call)
            merge_into(out[r, :, call.q], lse[r, :, call.q], o, l_)

    kv = _PeerKV(ps, k, v)
    kv.post(0)
    run(ps.me, k, v)
    for i, st in enumerate(ps.wplan.steps):
        kv.post(i + 1)
        got = kv.take(i)
        if got is not None:
            run(st.recv_from, *got)
    return out, lse


def peer_backward(ps, dout, q, k, v, out, lse, delta):
    """Windowed pass backward with the MERGED out/lse: dq, dk, dv in the accumulation dtype."""
    from .ring import _like_model

    acc = accumulation_dtype(q.dtype)
    dq = _like_model(q.shape, acc, q.device)
    dkv = torch.zeros((2, *k.shape), dtype=acc, device=q.device)
    kw = dict(scale=ps.scale, bucket_size=ps.bucket_size)

    def run(origin, kb, vb, target):
        for call in ps.calls(origin):
            dq_b, dk_b, dv_b = K.backward(ps.kernel, call, dout, q, kb, vb, out, lse, delta,
                                          **kw)
            r = K.rows(call)
            dq[r, :, call.q] += dq_b
            target[0][r, :, call.k] += dk_b
            target[1][r, :, call.k] += dv_b

    kv = _PeerKV(ps, k, v)
    kv.post(0)
    run(ps.me, k, v, dkv)
    back = None  # (works, received buffer, rows, step) of the previous dK/dV return

    def land(back):
        works, buf, rows, st, _ = back  # the sent partial stays alive until its send is done
        _wait(ps, works, st)
        if buf is not None:
            dkv[:, :, :, rows] += buf

    for i, st in enumerate(ps.wplan.steps):
        kv.post(i + 1)
        got = kv.take(i)
        sends, part = [], None
        if got is not None:
            part = torch.zeros((2, *got[0].shape), dtype=acc, device=q.device)
            run(st.recv_from, *got, part)
            sends = [(part, st.recv_from)]
        buf, recvs = None, []
        if st.send_to is not None:
            n = st.send_rows.stop - st.send_rows.start
            buf = torch.empty((2, *k.shape[:2], n, k.shape[3]), dtype=acc, device=q.device)
            recvs = [(buf, st.send_to)]
        works = _post(ps, sends, recvs, _DKV_TAG)
        if back is not None:
            land(back)
        back = (works, buf, st.send_rows, st, part)
    if back is not None:
        land(back)
    return dq, dkv[0], dkv[1]
