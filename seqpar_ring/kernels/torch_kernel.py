"""Pure-PyTorch block attention: the reference kernel, the CPU path and the fp64 path.

One call computes one Q block against one K/V block and returns (out, lse). Work is split into
buckets of ``bucket_size`` query and key rows, merged with the same log-sum-exp rule the ring
uses, so the score tile is at most (bucket, bucket) per head whatever the block length; the
backward recomputes scores bucket by bucket from q, k, v and the *merged* out/lse (the
FlashAttention-2 identity), so nothing quadratic is ever stored.

Layout: q (batch, heads, q_len, head_dim); k, v (batch, kv_heads, k_len, head_dim) with
heads % kv_heads == 0 — query head h reads kv head h // (heads // kv_heads). K/V are never
repeated: queries are viewed as (batch, kv_heads, group, q_len, head_dim) and broadcast.

Masks: ``causal=True`` means the two blocks cover the same token positions (a diagonal block of
the ring), so key j is visible to query i iff j <= i. ``q_doc``/``k_doc`` (batch, len) are
document ids of packed sequences: a key is visible only within the same document and never
when its id is negative (padding).

Bands (sliding windows): ``band=(left, right)`` keeps key j for query i iff
``c - left <= j - i <= c + right`` with ``c = k_len - q_len`` (the bottom-right alignment of
FlashAttention's ``window_size_left/right``, so one call means the same on every kernel);
``right=None`` is unbounded. A band replaces ``causal`` (a causal window is ``(W - 1, 0)`` on a
square block). Tiles wholly outside the band are skipped.
"""

from __future__ import annotations

import torch

from .merge import accumulation_dtype, empty_accumulators, merge_into


def _ranges(n: int, bucket: int | None) -> list[tuple[int, int]]:
    step = n if not bucket or bucket >= n else bucket
    return [(s, min(s + step, n)) for s in range(0, n, step)]


Band = tuple[int, "int | None"]


def _band_limits(band: Band | None, nq: int, nk: int) -> tuple[int, float]:
    """Lowest and highest visible j - i of a call (``band`` over nq queries, nk keys)."""
    if band is None:
        return -(nq + nk), float(nk + nq)
    c = nk - nq
    return c - band[0], (float("inf") if band[1] is None else c + band[1])


def _skip(qs: int, qe: int, ks: int, ke: int, causal: bool, lim) -> bool:
    """Is every (query, key) pair of the tile invisible (in the future, or outside the band)?"""
    return (causal and ks > qe - 1) or (ke - 1 - qs < lim[0]) or (ks - (qe - 1) > lim[1])


def _mask(
    qs: int, qe: int, ks: int, ke: int, causal: bool, q_doc, k_doc, device, lim=None
) -> torch.Tensor | None:
    """Boolean visibility mask broadcastable to (B, Hkv, G, q, k), or None when all visible.

    ``lim``: (lowest, highest) visible j - i of a band (`_band_limits`)."""
    mask = None
    cut = causal and ke - 1 > qs  # some key of this tile lies after some query
    banded = lim is not None and (ks - (qe - 1) < lim[0] or ke - 1 - qs > lim[1])
    if cut or banded:
        qi = torch.arange(qs, qe, device=device).unsqueeze(1)
        kj = torch.arange(ks, ke, device=device).unsqueeze(0)
    if cut:
        mask = (kj <= qi).view(1, 1, 1, qe - qs, ke - ks)
    if banded:
        d = kj - qi
        band = ((d >= lim[0]) & (d <= lim[1])).view(1, 1, 1, qe - qs, ke - ks)
        mask = band if mask is None else mask & band
    if q_doc is not None:
        qd = q_doc[:, qs:qe].unsqueeze(2)
        kd = k_doc[:, ks:ke].unsqueeze(1)
        doc = ((qd == kd) & (kd >= 0)).view(qd.shape[0], 1, 1, qe - qs, ke - ks)
        mask = doc if mask is None else mask & doc
    return mask


def _scores(qb, kb, scale, mask) -> torch.Tensor:
    s = torch.matmul(qb, kb.transpose(-1, -2)) * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return s


def _finite(lse: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)


def _grouped(q: torch.Tensor, kv_heads: int) -> torch.Tensor:
    b, h, n, d = q.shape
    return q.reshape(b, kv_heads, h // kv_heads, n, d)


def block_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    scale: float,
    q_doc: torch.Tensor | None = None,
    k_doc: torch.Tensor | None = None,
    bucket_size: int | None = None,
    band: Band | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of one Q block over one K/V block (``band``: module doc).

    Returns out (batch, heads, q_len, head_dim) and lse (batch, heads, q_len), both in the
    accumulation dtype (fp32, or fp64 for fp64 inputs). Rows with no visible key: out 0, lse -inf.
    """
    acc = accumulation_dtype(q.dtype)
    hkv = k.shape[1]
    qg = _grouped(q, hkv)
    out, lse = empty_accumulators(qg, acc)
    kc, vc = k.unsqueeze(2), v.unsqueeze(2)
    nk = k.shape[2]
    lim = None if band is None else _band_limits(band, q.shape[2], nk)
    for qs, qe in _ranges(q.shape[2], bucket_size):
        qb = qg[..., qs:qe, :].to(acc)
        o_acc, l_acc = out[..., qs:qe, :], lse[..., qs:qe]
        for ks, ke in _ranges(nk, bucket_size):
            if lim is not None and _skip(qs, qe, ks, ke, causal, lim):
                continue
            if causal and ks > qe - 1:
                break  # every key of the tile lies in the future of every query
            mask = _mask(qs, qe, ks, ke, causal, q_doc, k_doc, q.device, lim)
            s = _scores(qb, kc[..., ks:ke, :].to(acc), scale, mask)
            blk_lse = torch.logsumexp(s, dim=-1)
            p = torch.exp(s - _finite(blk_lse).unsqueeze(-1))
            blk_out = torch.matmul(p, vc[..., ks:ke, :].to(acc))
            merge_into(o_acc, l_acc, blk_out, blk_lse)
    return out.flatten(1, 2), lse.flatten(1, 2)


def block_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    *,
    causal: bool,
    scale: float,
    q_doc: torch.Tensor | None = None,
    k_doc: torch.Tensor | None = None,
    bucket_size: int | None = None,
    delta: torch.Tensor | None = None,
    band: Band | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of one block given the MERGED out and lse of the whole attention.

    dout, out: (batch, heads, q_len, head_dim); lse: (batch, heads, q_len). ``delta`` =
    rowsum(dout * out) may be passed in when the caller runs many blocks against one Q.
    Returns dq (batch, heads, q_len, head_dim) and dk, dv (batch, kv_heads, k_len, head_dim)
    in the accumulation dtype.
    """
    acc = accumulation_dtype(q.dtype)
    hkv = k.shape[1]
    qg, dog = _grouped(q, hkv), _grouped(dout, hkv)
    if delta is None:
        delta = (dout.to(acc) * out.to(acc)).sum(-1)
    deltag = delta.reshape(qg.shape[:-1])
    lseg = _finite(lse.to(acc)).reshape(qg.shape[:-1])
    dq = torch.zeros(qg.shape, dtype=acc, device=q.device)
    dk = torch.zeros(k.shape, dtype=acc, device=q.device)
    dv = torch.zeros(v.shape, dtype=acc, device=q.device)
    kc, vc = k.unsqueeze(2), v.unsqueeze(2)
    lim = None if band is None else _band_limits(band, q.shape[2], k.shape[2])
    for qs, qe in _ranges(q.shape[2], bucket_size):
        qb, dob = qg[..., qs:qe, :].to(acc), dog[..., qs:qe, :].to(acc)
        for ks, ke in _ranges(k.shape[2], bucket_size):
            if lim is not None and _skip(qs, qe, ks, ke, causal, lim):
                continue
            if causal and ks > qe - 1:
                break
            mask = _mask(qs, qe, ks, ke, causal, q_doc, k_doc, q.device, lim)
            kb, vb = kc[..., ks:ke, :].to(acc), vc[..., ks:ke, :].to(acc)
            p = torch.exp(_scores(qb, kb, scale, mask) - lseg[..., qs:qe].unsqueeze(-1))
            dv[..., ks:ke, :] += torch.matmul(p.transpose(-1, -2), dob).sum(2)
            ds = p * (torch.matmul(dob, vb.transpose(-1, -2)) - deltag[..., qs:qe].unsqueeze(-1))
            dq[..., qs:qe, :] += torch.matmul(ds, kb) * scale
            dk[..., ks:ke, :] += (torch.matmul(ds.transpose(-1, -2), qb) * scale).sum(2)
    return dq.flatten(1, 2), dk, dv


def _spans(spec):
    """(q_start, q_end, k_start, k_end) of each sequence of a varlen spec."""
    qa = ka = 0
    for ql, kl in spec.seqs:
        yield qa, qa + ql, ka, ka + kl
        qa, ka = qa + ql, ka + kl


def varlen_forward(q, k, v, spec, *, causal: bool, scale: float, bucket_size: int | None = None,
                   band: Band | None = None):
    """Attention of sequences laid end to end (``spec``: a `schedule.VarlenSpec`).

    q: (1, heads, q_total, head_dim); k, v: (1, kv_heads, k_total, head_dim). Sequence i pairs
    its Q rows with its K/V rows; ``causal`` sequences have equal lengths. Rows of a sequence
    with no keys: out 0, lse -inf. Returns (out, lse) in the accumulation dtype.
    """
    out, lse = empty_accumulators(q, accumulation_dtype(q.dtype))
    for qa, qb, ka, kb in _spans(spec):
        if qa < qb and ka < kb:
            o, l_ = block_forward(q[:, :, qa:qb], k[:, :, ka:kb], v[:, :, ka:kb], causal=causal,
                                  scale=scale, bucket_size=bucket_size, band=band)
            out[:, :, qa:qb], lse[:, :, qa:qb] = o, l_
    return out, lse


def varlen_backward(dout, q, k, v, out, lse, spec, *, causal: bool, scale: float,
                    bucket_size: int | None = None, delta=None, band: Band | None = None):
    """Gradients of `varlen_forward` given the MERGED out/lse (rows as in the forward)."""
    acc = accumulation_dtype(q.dtype)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    dk = torch.zeros(k.shape, dtype=acc, device=q.device)
    dv = torch.zeros(v.shape, dtype=acc, device=q.device)
    for qa, qb, ka, kb in _spans(spec):
        if qa < qb and ka < kb:
            rows = (slice(None), slice(None), slice(qa, qb))
            dq[rows], dk[:, :, ka:kb], dv[:, :, ka:kb] = block_backward(
                dout[rows], q[rows], k[:, :, ka:kb], v[:, :, ka:kb], out[rows], lse[rows],
                causal=causal, scale=scale, bucket_size=bucket_size, band=band,
                delta=None if delta is None else delta[rows])
    return dq, dk, dv
