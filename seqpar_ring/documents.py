"""Packed documents and padding on the ring: the kernel calls each block pair needs.

A row of a batch holds one or more documents (ids 0, 1, ...) and padding (id -1); a token sees
only keys of its own document. That structure is the same for every layer and every ring step
of a batch, so it is planned once per batch on the host (`plan_documents`) and reused — the
kernels then run plain dense calls on row slices, or one varlen call, with nothing masked
element-wise and nothing sent or computed for pairs that share no document.

Rules (S tokens per row, every id one contiguous run):

- Under causal attention a **trailing padding run joins the document before it**: no real token
  sees it (it lies in their future) and padding carries no loss. A right-padded row is therefore
  one document, and a batch of such rows runs on the plain path (`DocPlan.trivial`). Padding's
  own outputs are unspecified then (finite); every real token's output and every gradient that
  flows from real tokens is exact.
- Other padding (left, middle, or any under non-causal attention) belongs to no document: its
  rows get out 0 and lse -inf, its keys are never seen.
- **Diagonal pair** (a chunk with itself): block-diagonal attention over the runs in the chunk.
  Runs of at least ``min_dense`` tokens get dense calls (a view of the rows; consecutive runs of
  equal length are batched as one segmented call); shorter runs between them share one varlen
  call whose padding gaps are empty sequences. A run shorter than ``FUSED_MIN_ROWS`` never gets
  a dense call of its own (see below).
- **Off-diagonal pair**: two disjoint contiguous ranges share at most one document — it must
  cover everything between them — so the pair is one dense, non-causal rectangle, or nothing.
- **Tiny calls** (fused kernels): a call with fewer than ``FUSED_MIN_ROWS`` Q or K/V rows is a
  varlen call of one sequence (segmented ones: one sequence per segment), so documents of any
  length — 1-token ones included, anywhere in a row — run on kernels that accept them.

The calls of one pair touch disjoint query rows and disjoint key rows (`DocPlan.disjoint`), so a
pass that stays on one rank assembles its result by copying, with no log-sum-exp merge.
"""

from __future__ import annotations

import bisect
import weakref
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from .layout import gather
from .schedule import BlockCall, Chunks, VarlenSpec

__all__ = ["DocPlan", "document_runs", "plan_documents", "documents_for", "single_document",
           "DENSE_MIN_TOKENS", "FUSED_MIN_ROWS"]

# Runs at least this long get their own dense fused call; shorter ones share a varlen call.
# Dense calls run on cuDNN (~1.6x the flash varlen kernel on an H200); a call's fixed cost only
# pays for itself on runs of a few hundred tokens and more.
DENSE_MIN_TOKENS = 1024
# A dense or segmented call needs at least this many rows on each side; a smaller one (a short
# document alone between long ones, a document's sliver on a chunk edge) becomes a one-sequence
# varlen call. cuDNN rejects s_q = s_kv = 1 ("cuDNN Frontend error") and crashed on other tiny
# shapes; FlashAttention-2 varlen takes any length, and such calls cost next to nothing.
FUSED_MIN_ROWS = 64

Run = tuple[int, int]  # [start, end) global positions of one document in one row


def document_runs(doc_ids: torch.Tensor, causal: bool) -> list[list[Run]]:
    """Runs of each row of ``doc_ids`` (batch, S) (CPU), padding removed or absorbed (see module).

    Raises ValueError when an id occurs in two separate runs of a row: documents are contiguous.
    """
    ids = doc_ids.to("cpu", torch.int64)
    b, s = ids.shape
    out: list[list[Run]] = []
    for r in range(b):
        row = ids[r]
        cut = (torch.nonzero(row[1:] != row[:-1]).flatten() + 1).tolist()
        starts, ends = [0, *cut], [*cut, s]
        vals = row[starts].tolist()
        runs = [(a, e) for a, e, v in zip(starts, ends, vals) if v >= 0]
        real = [v for v in vals if v >= 0]
        if len(set(real)) != len(real):
            dup = next(v for v in real if real.count(v) > 1)
            raise ValueError(
                f"doc_ids row {r}: document {dup} occurs in two separate runs; every document "
                "must be one contiguous run of tokens (packed rows put documents one after "
                "another; use distinct ids, or position_ids that restart at 0 per document)"
            )
        if causal and runs and vals[-1] < 0:
            runs[-1] = (runs[-1][0], s)  # trailing padding lies in every real token's future
        out.append(runs)
    return out


@dataclass(eq=False)
class DocPlan:
    """The kernel calls of every ring step of one rank for one batch's documents.

    ``calls(origin)``: the calls of this rank's Q shard against ``origin``'s K/V shard, in local
    row coordinates (``BlockCall.row`` set when rows of the batch differ). ``trivial``: every row
    is one document covering it (after padding rules) — the plain path applies, no plan needed.
    ``disjoint``: the calls of each pair touch disjoint Q and disjoint K/V rows.
    """

    trivial: bool
    by_origin: dict[int, list[BlockCall]] = field(default_factory=dict)
    disjoint: bool = True

    def calls(self, origin: int) -> list[BlockCall]:
        return self.by_origin[origin]


def plan_documents(
    runs: Sequence[Sequence[Run]],
    seq_len: int,
    origins: Sequence[int],
    me: int,
    chunks_of: Callable[[int], Chunks],
    causal: bool,
    min_dense: int = DENSE_MIN_TOKENS,
    min_rows: int | None = None,
) -> DocPlan:
    """Plan rank ``me``'s calls against every origin's shard from the rows' document runs.

    ``min_dense``: runs this long get dense calls; ``min_rows`` (default ``FUSED_MIN_ROWS``):
    no dense call has fewer rows.
    """
    min_rows = FUSED_MIN_ROWS if min_rows is None else min_rows
    if all(len(rr) == 1 and rr[0] == (0, seq_len) for rr in runs):
        return DocPlan(trivial=True)
    plan = DocPlan(trivial=False)
    for origin in origins:
        per_row = [[_small_to_varlen(c, min_rows) for c in
                    _pair_calls(rr, chunks_of(me), chunks_of(origin), causal, min_dense)]
                   for rr in runs]
        plan.disjoint &= all(_disjoint(cs) for cs in per_row)
        if all(c == per_row[0] for c in per_row[1:]):
            plan.by_origin[origin] = [_to_call(c, None) for c in per_row[0]]
        else:
            plan.by_origin[origin] = [_to_call(c, r) for r, cs in enumerate(per_row) for c in cs]
    return plan


# id(doc_ids) -> (weak reference, version, global ids on the host, {plan key: plan}). An entry
# lives as long as the batch's tensor (keyed by identity: tensors compare elementwise, so a
# WeakKeyDictionary cannot hold them); every layer and ring step of the batch reuses its plan.
_CACHE: dict[int, tuple] = {}


def _entry(doc_ids: torch.Tensor, group, layout: str):
    key = id(doc_ids)
    entry = _CACHE.get(key)
    if entry is None or entry[0]() is not doc_ids or entry[1] != doc_ids._version:
        full = gather(doc_ids, group, layout, dim=1).to("cpu")
        ref = weakref.ref(doc_ids, lambda _, key=key, cache=_CACHE: cache.pop(key, None))
        entry = (ref, doc_ids._version, full, {})
        _CACHE[key] = entry
    return entry


@torch.compiler.disable  # host work once per batch: outside any compiled graph
def single_document(doc_ids: torch.Tensor, group, layout: str, causal: bool) -> bool:
    """Is every row one document covering it (after the padding rules)? E.g. right-padded
    rows under causal attention. Cached like `documents_for`."""
    _, _, full, plans = _entry(doc_ids, group, layout)
    key = ("single", layout, causal)
    if key not in plans:
        plans[key] = all(rr == [(0, full.shape[1])] for rr in document_runs(full, causal))
    return plans[key]


@torch.compiler.disable  # host work once per batch: outside any compiled graph
def documents_for(doc_ids: torch.Tensor, group, layout: str, causal: bool,
                  origins: Sequence[int], me: int, chunks_of: Callable[[int], Chunks],
                  min_dense: int | None = None, min_rows: int | None = None) -> DocPlan:
    """The `DocPlan` of this rank for ``doc_ids`` (batch, seq_local), this rank's shard.

    ``min_rows``: see `plan_documents` (1 for the torch kernel, which takes any shape).
    The first call for a tensor all-gathers the ids over ``group`` (every rank of the group
    makes the same calls with the same tensors, so all of them gather together) and plans on
    the host; later calls with the same, unmodified tensor return the cached plan.
    """
    _, _, full, plans = _entry(doc_ids, group, layout)
    min_dense = DENSE_MIN_TOKENS if min_dense is None else min_dense
    min_rows = FUSED_MIN_ROWS if min_rows is None else min_rows
    key = (layout, causal, tuple(origins), me, min_dense, min_rows)
    if key not in plans:
        plans[key] = plan_documents(document_runs(full, causal), full.shape[1], origins, me,
                                    chunks_of, causal, min_dense, min_rows)
    return plans[key]


# One call of one row, before it becomes a BlockCall: plain tuples compare cheaply across rows.
# (q_start, q_end, k_start, k_end, causal, window, seqs) in local row coordinates.
_RowCall = tuple[int, int, int, int, bool, "int | None", "tuple[tuple[int, int], ...] | None"]


def _to_call(c: _RowCall, row: int | None) -> BlockCall:
    qa, qb, ka, kb, causal, window, seqs = c
    return BlockCall(slice(qa, qb), slice(ka, kb), causal, window, row=row,
                     varlen=None if seqs is None else VarlenSpec.of(seqs))


def _pair_calls(runs: Sequence[Run], q_chunks: Chunks, k_chunks: Chunks, causal: bool,
                min_dense: int) -> list[_RowCall]:
    starts = [a for a, _ in runs]
    calls: list[_RowCall] = []
    for ai, (qs, n) in enumerate(q_chunks):
        for bi, (ks, _) in enumerate(k_chunks):
            if causal and ks > qs:
                continue
            q_off, k_off = ai * n - qs, bi * n - ks  # global position -> local row
            if qs == ks:
                inside = _clip(runs, starts, qs, qs + n)
                calls += [(a + q_off, b + q_off, a + k_off, b + k_off, cz, w, sq)
                          for a, b, cz, w, sq in _diagonal(inside, causal, min_dense)]
                continue
            lo, hi = min(qs, ks) + n - 1, max(qs, ks)  # last of the earlier, first of the later
            run = _run_at(runs, starts, lo)
            if run is None or run[1] <= hi:
                continue  # no document covers the gap between the two ranges
            qa, qb = max(run[0], qs), min(run[1], qs + n)
            ka, kb = max(run[0], ks), min(run[1], ks + n)
            calls.append((qa + q_off, qb + q_off, ka + k_off, kb + k_off, False, None, None))
    return calls


def _small_to_varlen(c: _RowCall, min_rows: int) -> _RowCall:
    """A dense call with fewer than ``min_rows`` Q or K/V rows (or a segmented one with shorter
    segments) as the equivalent varlen call: same rows, same visible pairs."""
    qa, qb, ka, kb, causal, window, seqs = c
    if seqs is not None:
        return c
    if window is not None:
        if window >= min_rows:
            return c
        return (qa, qb, ka, kb, causal, None, ((window, window),) * ((qb - qa) // window))
    if min(qb - qa, kb - ka) >= min_rows:
        return c
    return (qa, qb, ka, kb, causal, None, ((qb - qa, kb - ka),))


def _disjoint(calls: list[_RowCall]) -> bool:
    """Do the calls read disjoint Q rows and disjoint K/V rows (so results need no merge)?"""
    for lo, hi in ((0, 1), (2, 3)):
        spans = sorted((c[lo], c[hi]) for c in calls)
        if any(a[1] > b[0] for a, b in zip(spans, spans[1:])):
            return False
    return True


def _run_at(runs: Sequence[Run], starts: list[int], pos: int) -> Run | None:
    i = bisect.bisect_right(starts, pos) - 1
    return runs[i] if i >= 0 and runs[i][1] > pos else None


def _clip(runs: Sequence[Run], starts: list[int], lo: int, hi: int) -> list[Run]:
    """The parts of ``runs`` inside [lo, hi), in order."""
    i = max(bisect.bisect_right(starts, lo) - 1, 0)
    out = []
    while i < len(runs) and runs[i][0] < hi:
        a, b = max(runs[i][0], lo), min(runs[i][1], hi)
        if a < b:
            out.append((a, b))
        i += 1
    return out


def _diagonal(runs: list[Run], causal: bool, min_dense: int):
    """Calls (a, b, causal, window, seqs) in global positions for the runs of one chunk."""
    out = []
    i = 0
    while i < len(runs):
        a, b = runs[i]
        if b - a >= min_dense:  # dense: batch the following runs of the same length that abut
            j = i + 1
            while j < len(runs) and runs[j][0] == runs[j - 1][1] and \
                    runs[j][1] - runs[j][0] == b - a:
                j += 1
            end = runs[j - 1][1]
            out.append((a, end, causal, None if j == i + 1 else b - a, None))
            i = j
            continue
        j = i + 1  # a group of short runs, up to the next long one
        while j < len(runs) and runs[j][1] - runs[j][0] < min_dense:
            j += 1
        group = runs[i:j]
        if len(group) == 1:
            out.append((a, b, causal, None, None))
        else:
            out.append((group[0][0], group[-1][1], causal, None, _sequences(group)))
        i = j
    return out


def _sequences(group: list[Run]) -> tuple[tuple[int, int], ...]:
    """(q_len, k_len) of each varlen sequence: the runs, and each padding gap as two empty ones
    (its rows see no key; its keys serve no query)."""
    seqs: list[tuple[int, int]] = []
    for (a, b), nxt in zip(group, [*group[1:], None]):
        seqs.append((b - a, b - a))
        if nxt is not None and nxt[0] > b:
            gap = nxt[0] - b
            seqs += [(gap, 0), (0, gap)]
    return tuple(seqs)
