"""The rows a dilated branch keeps: which heads and offsets, gathered out and added back.

Dense tensors are (batch, seq_local, heads, *rest), the model's own layout. Branch (w, r) keeps,
for head h, the rows o_h + t·r (t = 0, 1, ...) with o_h = h mod r. Its sparse tensors are
(batch, seq_local/r, U, *rest): sparse head u is dense head ``heads[u]`` at offset
``offsets[u]``. Every segment starts at a multiple of r, so a segment of w/r sparse rows is a
contiguous run and the kernels see plain attention on it.

Splitting the sequence dimension into (seq_local/r, r) is a view for any strides. The sparse
heads of one offset are usually a regular pattern of dense heads (a progression, or runs of
a progression: always for MHA, for the K/V of GQA, and for a branch's rows inside another's),
so a gather is one strided copy per offset (moved 8 bytes at a time) and an accumulation one
strided in-place add — bandwidth-bound kernels, no index tensors read per element. Other head
plans use one advanced-indexing copy. Either way: no Python loop over tokens, and plans are
cached per (heads, kv_heads, r, device). Nothing is copied when r = 1 and heads stay in order.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from functools import lru_cache

import torch

# Heads (start, A, outer step, C, inner step): start + a*outer + b*inner, a < A, b < C.
Pattern = tuple[int, int, int, int, int]


def _heads_view(x: torch.Tensor, pat: Pattern) -> torch.Tensor:
    """(B, m, X, *rest) -> (B, m, A, C, *rest): the heads of ``pat``, as a view."""
    start, a, outer, c, inner = pat
    st = x.stride()
    return x.as_strided((*x.shape[:2], a, c, *x.shape[3:]),
                        (st[0], st[1], outer * st[2], inner * st[2], *st[3:]),
                        x.storage_offset() + start * st[2])


def _widens(x: torch.Tensor, k: int) -> bool:
    return (x.dim() > 0 and x.stride(-1) == 1 and x.shape[-1] % k == 0
            and x.storage_offset() % k == 0 and all(s % k == 0 for s in x.stride()[:-1]))


def _copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    """dst.copy_(src), moving 8-byte words when both layouts allow (4x fewer bf16 elements)."""
    k = 8 // dst.element_size()
    if dst.dtype == src.dtype and k > 1 and _widens(dst, k) and _widens(src, k):
        dst, src = dst.view(torch.int64), src.view(torch.int64)
    dst.copy_(src)


@dataclass(frozen=True)
class Rows:
    """One side of a branch (queries, or keys/values): its heads, offsets and rate."""

    heads: torch.Tensor    # (U,) dense head of each sparse head
    offsets: torch.Tensor  # (U,) row offset of each sparse head, in [0, r)
    r: int
    identity: bool         # r = 1 and heads = 0..H-1: the sparse tensor is the dense one
    unique: bool           # no (offset, head) pair repeats: writes need no accumulation
    # (offset, sparse-head pattern, dense-head pattern) per offset, when all are regular
    strided: tuple[tuple[int, Pattern, Pattern], ...] | None = None

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(1, (x.shape[1] // self.r, self.r))

    def _pairs(self, dense: torch.Tensor, sparse: torch.Tensor, weight=None):
        """Per offset: (dense view, sparse view, weight view or None), all (B, m, A, C, ...)."""
        ds = self._split(dense)
        return [(_heads_view(ds[:, :, o], hp), _heads_view(sparse, up),
                 None if weight is None else _heads_view(weight, up))
                for o, up, hp in self.strided]

    def take(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """(B, n, H, *rest) -> (B, n/r, U, *rest): the rows this side keeps (a view if identity
        and no weight). ``weight`` (B, n/r, U) multiplies each row, in the promoted dtype."""
        if weight is not None:
            weight = weight.unsqueeze(-1)
        if self.identity:
            return x if weight is None else x * weight
        if self.strided is None:
            rows = self._split(x)[:, :, self.offsets, self.heads]
            return rows if weight is None else rows * weight
        dtype = x.dtype if weight is None else torch.promote_types(x.dtype, weight.dtype)
        out = x.new_empty((x.shape[0], x.shape[1] // self.r, len(self.heads), *x.shape[3:]),
                          dtype=dtype)
        for d, s, w in self._pairs(x, out, weight):
            if w is None:
                _copy(s, d)
            else:
                torch.mul(d, w, out=s)
        return out

    def put(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """dst[rows] = src (``take``'s inverse, casting to dst's dtype); pairs must be unique."""
        if self.identity:
            dst.copy_(src)
        elif self.strided is not None:
            for d, s, _ in self._pairs(dst, src):
                _copy(d, s)
        else:
            self._split(dst)[:, :, self.offsets, self.heads] = src.to(dst.dtype)

    def add_to(self, dst: torch.Tensor, src: torch.Tensor,
               weight: torch.Tensor | None = None) -> None:
        """dst[rows] += src (times ``weight`` (B, n/r, U), per row, when given), in dst's dtype
        with one rounding; repeated (offset, head) pairs add up."""
        if self.identity or self.strided is not None:
            w = None if weight is None else weight.unsqueeze(-1)
            parts = [(dst, src, w)] if self.identity else self._pairs(dst, src, w)
            for d, s, w_ in parts:
                if w_ is None:
                    d.add_(s)
                else:
                    d.addcmul_(s, w_)
            return
        if weight is not None:
            src = src * weight.unsqueeze(-1)
        if self.unique:
            self._split(dst)[:, :, self.offsets, self.heads] += src
        else:
            b, m = src.shape[:2]
            idx = (torch.arange(b, device=dst.device).view(b, 1, 1),
                   torch.arange(m, device=dst.device).view(1, m, 1),
                   self.offsets.view(1, 1, -1), self.heads.view(1, 1, -1))
            self._split(dst).index_put_(idx, src.to(dst.dtype), accumulate=True)


@dataclass(frozen=True)
class BranchHeads:
    """Query and key/value rows of one branch.

    Query heads are reordered so that the sparse query heads of one sparse K/V head are
    adjacent (the kernels' GQA grouping): sparse query head i reads sparse K/V head
    i // (heads / U). With GQA, K/V travel once per (kv head, offset) pair some query head
    needs — unless the pairs are used unevenly, then once per query head.
    """

    q: Rows
    kv: Rows


@lru_cache(maxsize=64)
def nested_heads(heads: int, kv_heads: int, outer_r: int, inner_r: int,
                 device: str) -> BranchHeads:
    """The rows of branch ``inner_r`` in the sparse coordinates of branch ``outer_r``.

    With outer_r dividing inner_r, every row the inner branch keeps is kept by the outer one
    (same head, offset ≡ mod outer_r): row o + t·r of the dense sequence is sparse row
    o // c + t·(r/c) of the outer branch (c = outer_r). Accumulating several branches in the
    coordinates of their common divisor touches 1/c of the dense tensor.
    """
    if inner_r % outer_r:
        raise ValueError(f"rate {outer_r} does not divide rate {inner_r}")
    outer = branch_heads(heads, kv_heads, outer_r, device)
    inner = branch_heads(heads, kv_heads, inner_r, device)
    return BranchHeads(_compose(outer.q, inner.q, device), _compose(outer.kv, inner.kv, device))


def _compose(outer: Rows, inner: Rows, device: str) -> Rows:
    first: dict[tuple[int, int], int] = {}  # (dense head, offset) -> first outer sparse head
    for u, key in enumerate(zip(outer.heads.tolist(), outer.offsets.tolist())):
        first.setdefault(key, u)
    c = outer.r
    pairs = list(zip(inner.heads.tolist(), inner.offsets.tolist()))
    return _rows([first[(h, o % c)] for h, o in pairs], [o // c for _, o in pairs],
                 inner.r // c, len(outer.heads), device)


@lru_cache(maxsize=64)
def branch_heads(heads: int, kv_heads: int, r: int, device: str) -> BranchHeads:
    g = heads // kv_heads
    pairs = [(h // g, h % r) for h in range(heads)]  # (kv head, offset) each query head needs
    counts = Counter(pairs)
    if len(set(counts.values())) == 1:  # even use: each pair once, its query heads adjacent
        q_order = sorted(range(heads), key=lambda h: (pairs[h], h))
        kv_pairs = sorted(counts)
    else:  # uneven use: one sparse kv head per query head (pairs may repeat)
        q_order = list(range(heads))
        kv_pairs = pairs
    q = _rows(q_order, [pairs[h][1] for h in q_order], r, heads, device)
    kv = _rows([j for j, _ in kv_pairs], [o for _, o in kv_pairs], r, kv_heads, device)
    return BranchHeads(q, kv)


def _pattern(xs: list[int], c: int) -> Pattern | None:
    """``xs`` as runs of ``c`` with a constant inner and outer step (no index repeats)."""
    if len(xs) % c:
        return None
    inner = xs[1] - xs[0] if c > 1 else 1
    outer = xs[c] - xs[0] if len(xs) > c else c * inner
    if inner < 1 or outer < (c - 1) * inner + 1:
        return None
    want = [xs[0] + a * outer + b * inner for a in range(len(xs) // c) for b in range(c)]
    return (xs[0], len(xs) // c, outer, c, inner) if want == xs else None


def _strided(heads: list[int], offsets: list[int]):
    """Per offset, a pattern shared by its sparse heads and their dense heads, or None."""
    groups = []
    for o in sorted(set(offsets)):
        us = [u for u, off in enumerate(offsets) if off == o]
        hs = [heads[u] for u in us]
        for c in [n for n in range(len(us), 0, -1) if len(us) % n == 0]:  # fewest runs first
            up, hp = _pattern(us, c), _pattern(hs, c)
            if up is not None and hp is not None:
                groups.append((o, up, hp))
                break
        else:
            return None
    return tuple(groups)


def _rows(heads: list[int], offsets: list[int], r: int, dense_heads: int, device: str) -> Rows:
    dev = torch.device(device)
    return Rows(
        heads=torch.tensor(heads, dtype=torch.long, device=dev),
        offsets=torch.tensor(offsets, dtype=torch.long, device=dev),
        r=r,
        identity=r == 1 and heads == list(range(dense_heads)),
        unique=len(set(zip(heads, offsets))) == len(heads),
        strided=_strided(heads, offsets),
    )
