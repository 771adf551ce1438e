"""Which local kernel calls one (Q shard, K/V shard) pair needs — pure geometry, no tensors.

A shard is a list of equal-length chunks ``(global_start, length)`` in local order (one chunk
for the contiguous layout, chunks r and 2p-1-r for zigzag). Chunk pairs are compared by their
GLOBAL positions, never by ring step:

- causal, key chunk after the query chunk: skipped;
- causal, same chunk: a diagonal call (``causal=True``: key j visible iff j <= i);
- otherwise: a full call. Adjacent chunk pairs with the same verdict are coalesced into one
  larger call (fewer, bigger kernels are what fused attention runs fast on).

With a ``window`` (dilated segments, in the same coordinates as the chunks) a pair is visible only
inside one window. When windows and chunks are aligned (one length divides the other) this stays
a block decision: a window at least a chunk long skips chunks in other windows; a shorter one
makes only a chunk with itself visible, and the call is *segmented* (the kernel runs over the
chunk cut into windows, batched). Unaligned windows straddle chunk boundaries: such calls are
*masked* — the kernel gets each row's window index as a document id (torch kernel only).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

Chunks = Sequence[tuple[int, int]]


@dataclass(frozen=True, eq=False)
class VarlenSpec:
    """Sequences of one varlen call: ``seqs[i] = (q_len, k_len)``, laid end to end in the call's
    Q rows and K/V rows. An empty side means those rows see no key / serve no query (padding)."""

    seqs: tuple[tuple[int, int], ...]
    max_q: int
    max_k: int
    has_empty: bool
    _cu: dict = field(default_factory=dict, repr=False)  # device -> (cu_q, cu_k) int32

    @classmethod
    def of(cls, seqs: tuple[tuple[int, int], ...]) -> VarlenSpec:
        return cls(seqs, max(q for q, _ in seqs), max(k for _, k in seqs),
                   any(q == 0 or k == 0 for q, k in seqs))

    def cu_seqlens(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Cumulative offsets (len(seqs) + 1,) int32 of the Q and K/V sequences on ``device``;
        copied there once per batch (the spec lives as long as its batch's plan)."""
        key = str(device)
        if key not in self._cu:
            cu = torch.zeros(2, len(self.seqs) + 1, dtype=torch.int32)
            cu[:, 1:] = torch.tensor(self.seqs, dtype=torch.int32).T.cumsum(1)
            cu = cu.to(device, non_blocking=True)
            self._cu[key] = (cu[0], cu[1])
        return self._cu[key]


@dataclass(frozen=True)
class BlockCall:
    """One kernel call: local row slices of Q and K/V, diagonal mask, optional segment window.

    ``row`` restricts the call to one row of the batch (packed rows differ per row); ``varlen``
    makes it a call over several sequences laid end to end (packed documents).
    """

    q: slice
    k: slice
    causal: bool
    window: int | None = None
    masked: bool = False     # window straddles chunks: mask by window index of each position
    q0: int = 0              # global position of the first row of q / k (masked calls)
    k0: int = 0
    row: int | None = None
    varlen: VarlenSpec | None = field(default=None, compare=False)
    # sliding window (left, right) in FlashAttention's bottom-right convention (`window.py`)
    band: tuple[int, int | None] | None = None


def _runs(indices: Sequence[int]) -> list[tuple[int, int]]:
    """Consecutive runs of sorted integers as inclusive (first, last) pairs."""
    runs: list[tuple[int, int]] = []
    for i in indices:
        if runs and runs[-1][1] == i - 1:
            runs[-1] = (runs[-1][0], i)
        else:
            runs.append((i, i))
    return runs


def plan_blocks(
    q_chunks: Chunks, k_chunks: Chunks, causal: bool, window: int | None = None
) -> list[BlockCall]:
    """Kernel calls for the Q shard ``q_chunks`` against the K/V shard ``k_chunks``."""
    length = q_chunks[0][1]
    if any(n != length for _, n in (*q_chunks, *k_chunks)):
        raise ValueError("all chunks of a ring must have the same length")
    calls: list[BlockCall] = []
    full_sets: list[tuple[int, ...]] = []
    aligned = window is None or window % length == 0 or length % window == 0
    for a, (qs, _) in enumerate(q_chunks):
        full: list[int] = []
        for b, (ks, _) in enumerate(k_chunks):
            if not aligned:
                if _windows_meet(qs, ks, length, window) and not (causal and ks > qs):
                    base = _call(a, b, length, causal and ks == qs)
                    calls.append(BlockCall(base.q, base.k, base.causal, window, True, qs, ks))
                continue
            if window is not None and window < length:
                if qs == ks:  # only a chunk sees itself; segments are inside it
                    calls.append(_call(a, b, length, causal, window))
                continue
            if window is not None and qs // window != ks // window:
                continue
            if causal and ks > qs:
                continue
            if causal and ks == qs:
                calls.append(_call(a, b, length, True))
            else:
                full.append(b)
        full_sets.append(tuple(full))
    # Coalesce: consecutive query chunks that see the same key chunks share one call per key run.
    a = 0
    while a < len(full_sets):
        end = a
        while end + 1 < len(full_sets) and full_sets[end + 1] == full_sets[a]:
            end += 1
        for k0, k1 in _runs(full_sets[a]):
            calls.append(
                BlockCall(slice(a * length, (end + 1) * length),
                          slice(k0 * length, (k1 + 1) * length), False)
            )
        a = end + 1
    return calls


def _windows_meet(qs: int, ks: int, length: int, window: int) -> bool:
    """Do [qs, qs+length) and [ks, ks+length) share a window of size ``window``?"""
    q_first, q_last = qs // window, (qs + length - 1) // window
    k_first, k_last = ks // window, (ks + length - 1) // window
    return q_first <= k_last and k_first <= q_last


def _call(a: int, b: int, length: int, causal: bool, window: int | None = None) -> BlockCall:
    return BlockCall(
        slice(a * length, (a + 1) * length), slice(b * length, (b + 1) * length), causal, window
    )
