"""Sliding windows in the ring's block schedule: which rows of which block pairs a window reaches.

Semantics are transformers' ``sliding_window`` (``masking_utils.sliding_window_overlay`` on a
causal mask): a query at global position i sees the key at j iff ``i - W < j <= i`` — W keys,
itself included. Packed documents intersect with it (a token sees keys of its own document
inside its window).

Geometry, in global positions, of one (Q range, K range) pair of a causal pass:

- a *diagonal* pair (both ranges cover the same positions) keeps its causal call when W covers
  it, else becomes a band ``(W - 1, 0)``;
- a *past* rectangle (every key before every query) is trimmed to the queries some key reaches
  and the keys some query reaches; what remains is either fully visible (a plain call) or a band
  ``(left, None)`` in FlashAttention's bottom-right convention (`kernels.torch_kernel` doc).
  Trimming leaves no query row without a key, so no kernel ever returns an empty row.
- anything else is not computed.

`plan_window` turns this into a rank's calls against every origin it needs, and — for the peer
exchange of `window_pass` — the rows of its own shard each peer needs: with W <= S/p a rank
sends about W tokens of K/V to the one rank (contiguous) or two ranks (zigzag, whose far chunk
is reached from the other side) its windows span, instead of (p - 1)/p of the sequence.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Callable

import torch

from .documents import DocPlan
from .schedule import BlockCall, Chunks, VarlenSpec

__all__ = ["check_window", "window_rect", "plan_pair", "plan_window", "WindowPlan", "PeerStep"]

Rect = tuple[int, int, int, int, bool, "tuple[int, int | None] | None"]


def check_window(window, causal: bool) -> None:
    """Reject a window that is not a positive integer, or one on non-causal attention."""
    if window is None:
        return
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window={window!r} must be an integer >= 1 (or None: no window)")
    if not causal:
        raise ValueError(f"window={window} needs causal=True: a sliding window is defined on "
                         "causal attention (transformers' sliding_window)")


def window_rect(q0: int, q1: int, k0: int, k1: int, diag: bool, window: int) -> Rect | None:
    """The part of the pair [q0, q1) x [k0, k1) (global positions) a window reaches.

    ``diag``: both ranges are the same positions (causal within). Otherwise every key precedes
    every query (k1 <= q0). Returns (q0, q1, k0, k1, causal, band) or None when nothing is seen.
    """
    w = window
    if diag:
        return (q0, q1, k0, k1, True, None) if w >= q1 - q0 else (q0, q1, k0, k1, False,
                                                                   (w - 1, 0))
    if k1 > q0:
        raise AssertionError(f"window_rect: keys [{k0}, {k1}) do not precede queries at {q0}")
    q1 = min(q1, k1 + w - 1)  # later queries' windows start after the last key
    k0 = max(k0, q0 - w + 1)  # earlier keys lie before the first query's window
    if q1 <= q0 or k0 >= k1:
        return None
    if k0 > q1 - 1 - w:  # even the last query sees the first key: plain call
        return (q0, q1, k0, k1, False, None)
    c = (k1 - k0) - (q1 - q0)  # bottom-right alignment offset of the trimmed block
    return (q0, q1, k0, k1, False, (c - (q0 - k0) + w - 1, None))


def _locate(start: int, chunks: Chunks) -> tuple[int, int]:
    """(chunk index, global position) of local row ``start`` (every chunk has one length)."""
    n = chunks[0][1]
    a = start // n
    return a, chunks[a][0] + start - a * n


def _to_local(rect: Rect, a: int, b: int, qc: Chunks, kc: Chunks, base: BlockCall
              ) -> BlockCall:
    q0, q1, k0, k1, causal, band = rect
    n = qc[0][1]
    qa, ka = a * n + q0 - qc[a][0], b * n + k0 - kc[b][0]
    return replace(base, q=slice(qa, qa + q1 - q0), k=slice(ka, ka + k1 - k0), causal=causal,
                   band=band)


def plan_pair(q_chunks: Chunks, k_chunks: Chunks, window: int) -> list[BlockCall]:
    """Calls of a causal windowed pass for one Q shard against one K/V shard (no documents)."""
    n = q_chunks[0][1]
    calls = []
    for a, (qs, _) in enumerate(q_chunks):
        for b, (ks, _) in enumerate(k_chunks):
            if ks > qs:
                continue
            rect = window_rect(qs, qs + n, ks, ks + n, ks == qs, window)
            if rect is not None:
                calls.append(_to_local(rect, a, b, q_chunks, k_chunks,
                                       BlockCall(slice(0), slice(0), False)))
    return calls


def windowed_call(call: BlockCall, q_chunks: Chunks, k_chunks: Chunks, window: int
                  ) -> BlockCall | None:
    """A document plan's call (`documents.DocPlan`) cut to what the window reaches."""
    if call.causal and (call.varlen is not None or call.window is not None):
        # documents on one diagonal (batched, or one short run as varlen): each sequence is
        # square and causal
        longest = call.varlen.max_q if call.varlen is not None else call.window
        return call if window >= longest else replace(call, causal=False, band=(window - 1, 0))
    if call.varlen is not None:
        # a short past rectangle sent as a one-sequence varlen call (fused kernels,
        # `documents._small_to_varlen`): cut it as the rectangle it is, then keep it varlen
        cut = windowed_call(replace(call, varlen=None), q_chunks, k_chunks, window)
        if cut is None:
            return None
        shape = ((cut.q.stop - cut.q.start, cut.k.stop - cut.k.start),)
        return replace(cut, varlen=VarlenSpec.of(shape))
    a, q0 = _locate(call.q.start, q_chunks)
    b, k0 = _locate(call.k.start, k_chunks)
    q1, k1 = q0 + call.q.stop - call.q.start, k0 + call.k.stop - call.k.start
    rect = window_rect(q0, q1, k0, k1, call.causal, window)
    return None if rect is None else _to_local(rect, a, b, q_chunks, k_chunks, call)


@dataclass(frozen=True)
class PeerStep:
    """One exchange of the windowed pass, with the peers at distance ``delta`` on the ring.

    Send the rows ``send_rows`` of this rank's K/V to ``send_to`` (None: that rank's windows do
    not reach this shard); receive rows ``recv_rows`` of ``recv_from``'s K/V (None: not needed).
    In backward the dK/dV of those rows travel the other way.
    """

    delta: int
    send_to: int | None
    send_rows: slice | None
    recv_from: int | None
    recv_rows: slice | None


@dataclass(eq=False)
class WindowPlan:
    """A rank's windowed pass: calls per origin it needs (K/V rows in the coordinates of what
    arrives from that origin: the rows ``recv_rows`` when ``steps`` exchange them), and the
    exchanges. ``steps`` is empty when nothing travels peer to peer (one rank, all-gather)."""

    window: int
    by_origin: dict[int, list[BlockCall]]
    steps: list[PeerStep]

    @property
    def origins(self) -> list[int]:
        return list(self.by_origin)


@lru_cache(maxsize=256)
def _geometry(window: int, shards: tuple[tuple[tuple[int, int], ...], ...]
              ) -> dict[tuple[int, int], tuple[int, int]]:
    """(rank, origin) -> [lo, hi) rows of origin's shard that rank's windows reach."""
    p = len(shards)
    need = {}
    for r in range(p):
        for o in range(p):
            calls = plan_pair(shards[r], shards[o], window)
            if calls:
                need[(r, o)] = (min(c.k.start for c in calls), max(c.k.stop for c in calls))
    return need


_DOC_PLANS: weakref.WeakKeyDictionary[DocPlan, dict] = weakref.WeakKeyDictionary()


@torch.compiler.disable  # host work, cached per batch: outside any compiled graph
def plan_window(window: int, p: int, me: int, chunks_of: Callable[[int], Chunks],
                docs: DocPlan | None, peer: bool) -> WindowPlan:
    """Rank ``me``'s windowed pass over ``p`` ranks; ``peer``: K/V travel by `PeerStep`s
    (else every origin's whole shard is at hand, as with the all-gather)."""
    shards = tuple(tuple(chunks_of(r)) for r in range(p))
    key = (window, me, peer, shards)
    cache = None
    if docs is not None:
        cache = _DOC_PLANS.setdefault(docs, {})
        if key in cache:
            return cache[key]
    elif key in _PLANS:
        return _PLANS[key]
    need = _geometry(window, shards)
    by_origin: dict[int, list[BlockCall]] = {}
    for s in range(p):
        o = (me - s) % p
        if (me, o) not in need:
            continue
        if docs is None:
            calls = plan_pair(shards[me], shards[o], window)
        else:
            calls = [c for c in (windowed_call(c, shards[me], shards[o], window)
                                 for c in docs.calls(o)) if c is not None]
        lo, hi = need[(me, o)]
        if peer and o != me:  # only rows [lo, hi) of the origin's shard arrive
            if any(c.k.start < lo or c.k.stop > hi for c in calls):
                raise AssertionError("plan_window: a document call reaches rows the window "
                                     "geometry does not send")
            calls = [replace(c, k=slice(c.k.start - lo, c.k.stop - lo)) for c in calls]
        by_origin[o] = calls
    steps = []
    if peer:
        for d in range(1, p):
            to, frm = (me + d) % p, (me - d) % p
            out, inc = need.get((to, me)), need.get((me, frm))
            if out or inc:
                steps.append(PeerStep(d, to if out else None, slice(*out) if out else None,
                                      frm if inc else None, slice(*inc) if inc else None))
    plan = WindowPlan(window, by_origin, steps)
    if cache is not None:
        cache[key] = plan
    else:
        if len(_PLANS) > 256:
            _PLANS.clear()
        _PLANS[key] = plan
    return plan


_PLANS: dict[tuple, WindowPlan] = {}
