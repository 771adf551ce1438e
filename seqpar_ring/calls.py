"""One kernel call of a ring pass: slice the rows a `schedule.BlockCall` names and run it.

A call is dense (rows of Q against rows of K/V, diagonal-causal or full), *segmented* (the rows
cut into windows that become batch entries: dilated segments, or packed documents of one
length), *masked* (windows that straddle chunks: each row's window index acts as a document id;
torch kernel only) or *varlen* (several packed documents laid end to end); any of them may carry
a sliding-window ``band`` (`seqpar_ring.window`), which every kernel takes. ``call.row``
restricts it to one row of the batch. Tensors are (batch, heads, rows, head_dim) views; lse and
delta (batch, heads, rows).
"""

from __future__ import annotations

import torch

from .schedule import BlockCall


def segmented(x: torch.Tensor, w: int) -> torch.Tensor:
    """(B, H, L, D) -> (B * L/w, H, w, D): windows become batch entries.

    A view when x's memory is (B, L, H, D) — the model's layout, which the ring keeps — so the
    fused kernels read the windows in place.
    """
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b * (n // w), w, h, d).transpose(1, 2)


def unsegmented(x: torch.Tensor, b: int) -> torch.Tensor:
    """Inverse of `segmented` for (B*L/w, H, w, ...) -> (B, H, L, ...)."""
    nseg, h, w = x.shape[0] // b, x.shape[1], x.shape[2]
    return x.transpose(1, 2).reshape(b, nseg * w, h, *x.shape[3:]).transpose(1, 2)


def rows(call: BlockCall) -> slice:
    """The batch rows a call covers."""
    return slice(None) if call.row is None else slice(call.row, call.row + 1)


def _window_ids(call: BlockCall, b: int, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Window index of every row of a masked call, as (batch, rows) document ids."""
    q = (torch.arange(n, device=device) + call.q0) // call.window
    k = (torch.arange(n, device=device) + call.k0) // call.window
    return q.expand(b, n), k.expand(b, n)


def forward(kernel, call: BlockCall, q, k, v, *, scale: float, bucket_size: int | None):
    """(out, lse) of one call over the rows it names: out (b, H, q_rows, D), lse (b, H, q_rows)."""
    r = rows(call)
    qb, kb, vb = q[r, :, call.q], k[r, :, call.k], v[r, :, call.k]
    kw = dict(causal=call.causal, scale=scale, bucket_size=bucket_size)
    if call.band is not None:
        kw["band"] = call.band
    if call.varlen is not None:
        return kernel.varlen_forward(qb, kb, vb, call.varlen, **kw)
    if call.masked:
        qd, kd = _window_ids(call, qb.shape[0], qb.shape[2], q.device)
        return kernel.forward(qb, kb, vb, q_doc=qd, k_doc=kd, **kw)
    if call.window is None:
        return kernel.forward(qb, kb, vb, **kw)
    w, b = call.window, qb.shape[0]
    o, lse = kernel.forward(segmented(qb, w), segmented(kb, w), segmented(vb, w), **kw)
    return unsegmented(o, b), unsegmented(lse.unsqueeze(-1), b).squeeze(-1)


def backward(kernel, call: BlockCall, dout, q, k, v, out, lse, delta, *, scale: float,
             bucket_size: int | None):
    """(dq, dk, dv) of one call given the MERGED out/lse (and rowsum(dout*out) when the kernel
    takes it precomputed), over the rows the call names."""
    r = rows(call)
    sl = (r, slice(None), call.q)
    kb, vb = k[r, :, call.k], v[r, :, call.k]
    kw = dict(causal=call.causal, scale=scale, bucket_size=bucket_size)
    if call.band is not None:
        kw["band"] = call.band
    delta_b = None if delta is None else delta[sl]
    if call.varlen is not None:
        return kernel.varlen_backward(dout[sl], q[sl], kb, vb, out[sl], lse[sl], call.varlen,
                                      delta=delta_b, **kw)
    if call.window is None or call.masked:
        qd = kd = None
        if call.masked:
            qd, kd = _window_ids(call, q[sl].shape[0], q[sl].shape[2], q.device)
        return kernel.backward(dout[sl], q[sl], kb, vb, out[sl], lse[sl], q_doc=qd, k_doc=kd,
                               delta=delta_b, **kw)
    w, b = call.window, q[sl].shape[0]

    def seg(x):
        return segmented(x, w)

    def seg_rows(x):  # (B, H, L) per-row values
        return None if x is None else seg(x.unsqueeze(-1)).squeeze(-1)

    dq, dk, dv = kernel.backward(seg(dout[sl]), seg(q[sl]), seg(kb), seg(vb), seg(out[sl]),
                                 seg_rows(lse[sl]), delta=seg_rows(delta_b), **kw)
    return unsegmented(dq, b), unsegmented(dk, b), unsegmented(dv, b)
