"""Ulysses x ring attention: all-to-all over a fast group of u ranks, ring over r ranks.

The SP group of p = u x r ranks is a grid (`seqpar_ring.groups`): ``sp_rank = i·u + j`` with
ring rank i and Ulysses rank j. Each rank holds S/p tokens with all heads, placed by
`seqpar_ring.layout` with ``ulysses_size=u`` (piece j of ring rank i's shard). Attention:

1. all-to-all q, k, v over the Ulysses group: (S/p tokens, H heads) -> (S/r tokens, H/u heads).
   The u pieces arrive in order j = 0..u-1, which is ring rank i's shard of the ring layout
   (zigzag or contiguous over r ranks) — no reordering. Document ids are all-gathered over
   the same group (they are per token, not per head).
2. exact ring attention (`seqpar_ring.ring.ring_attention`: zigzag/contiguous, GQA, packed
   documents, ring or all-gather comm) — or dilated attention — over the ring group of r ranks
   on those H/u heads.
3. all-to-all the output back: (S/r, H/u) -> (S/p, H).

Backward is exact: each all-to-all is an autograd op whose backward is the opposite
all-to-all, and the ring keeps its own custom backward.

GQA: rank j receives query heads [j·H/u, (j+1)·H/u) and must receive the K/V heads they read.
With u | Hkv the K/V heads split evenly. Otherwise K/V are replicated to Hkv' = lcm(Hkv, u)
heads first (each head repeated Hkv'/Hkv times; Hkv' divides H, so query head h still reads
copy h // (H/Hkv') of its own K/V head). The copies are counted in
``seqpar_ring.comm_a2a.a2a_stats.replicated_bytes`` and logged once per shape; their gradients
are folded back by summing the copies (in fp32 for half precision).

Dilated attention (LongNet: head h keeps positions ≡ h mod r_i) needs every rate to divide
H/u, so local head a of rank j has the offset of global head j·H/u + a; other combinations
raise before any collective.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist

from . import comm as C
from .checks import check_inputs
from .comm_a2a import a2a_stats, all_gather, all_to_all
from .dilated import dilated_attention
from .ring import ring_attention
from .window import check_window

__all__ = [
    "HybridGroups",
    "ulysses_ring_attention",
    "ulysses_dilated_attention",
    "seq_to_heads",
    "heads_to_seq",
    "kv_heads_after_replication",
]

log = logging.getLogger(__name__)
_LOGGED: set[tuple[int, int]] = set()


@dataclass(frozen=True)
class HybridGroups:
    """Explicit process groups of one rank (what `seqpar_ring.groups.SPGroups` also carries).

    ``sp_group``: all p ranks of the SP group (checks agree over it). ``ulysses_group``: the u
    ranks of this rank's all-to-all, in Ulysses-rank order. ``ring_group``: the r ranks of its
    ring, in ring order. None stands for a group of this rank alone.
    """

    sp_group: Any
    ulysses_group: Any
    ring_group: Any


def _resolve(groups) -> tuple[Any, Any, Any, int, int]:
    for name in ("sp_group", "ulysses_group", "ring_group"):
        if not hasattr(groups, name):
            raise ValueError(
                f"groups must be a seqpar_ring.groups.SPGroups (initialize(sp_size, "
                f"ulysses_size=u)) or a seqpar_ring.ulysses.HybridGroups; {type(groups).__name__} "
                f"has no {name!r}"
            )
    sp, ug, rg = groups.sp_group, groups.ulysses_group, groups.ring_group
    u, r = C.group_size(ug), C.group_size(rg)
    if sp is not None and u * r != C.group_size(sp):
        raise ValueError(f"ulysses group ({u} ranks) x ring group ({r} ranks) != SP group "
                         f"({C.group_size(sp)} ranks): build the groups with "
                         "seqpar_ring.groups.initialize(sp_size, ulysses_size=u)")
    return sp, ug if u > 1 else None, rg if r > 1 else None, u, r


def kv_heads_after_replication(kv_heads: int, ulysses_size: int) -> int:
    """Hkv' = lcm(Hkv, u): K/V heads after replication (= Hkv when u divides it)."""
    return math.lcm(kv_heads, ulysses_size)


# --- the all-to-all re-layouts (plain functions, then autograd ops) ----------------------------

def seq_to_heads(xs: list[torch.Tensor], group, timeout_s: float) -> list[torch.Tensor]:
    """[(B, n, H_x, D)] -> [(B, u·n, H_x/u, D)], one all-to-all for all tensors.

    Rank j of ``group`` receives heads [j·H_x/u, (j+1)·H_x/u) of every member's n tokens,
    placed in member order along the sequence.
    """
    u = C.group_size(group)
    b, n, _, d = xs[0].shape
    hs = [x.shape[2] // u for x in xs]
    send = xs[0].new_empty((u, b, n, sum(hs), d))
    off = 0
    for x, h in zip(xs, hs):
        send[:, :, :, off:off + h].copy_(x.unflatten(2, (u, h)).permute(2, 0, 1, 3, 4))
        off += h
    recv = all_to_all(send, group, timeout_s)
    outs, off = [], 0
    for h in hs:
        outs.append(recv[:, :, :, off:off + h].permute(1, 0, 2, 3, 4).reshape(b, u * n, h, d))
        off += h
    return outs


def heads_to_seq(ys: list[torch.Tensor], group, timeout_s: float) -> list[torch.Tensor]:
    """Inverse of `seq_to_heads`: [(B, u·n, h_y, D)] -> [(B, n, u·h_y, D)]."""
    u = C.group_size(group)
    b, un, _, d = ys[0].shape
    n = un // u
    hs = [y.shape[2] for y in ys]
    send = ys[0].new_empty((u, b, n, sum(hs), d))
    off = 0
    for y, h in zip(ys, hs):
        send[:, :, :, off:off + h].copy_(y.unflatten(1, (u, n)).permute(1, 0, 2, 3, 4))
        off += h
    recv = all_to_all(send, group, timeout_s)
    outs, off = [], 0
    for h in hs:
        outs.append(recv[:, :, :, off:off + h].permute(1, 2, 0, 3, 4).reshape(b, n, u * h, d))
        off += h
    return outs


class _SeqToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, group, timeout_s, *xs):
        ctx.group, ctx.timeout_s = group, timeout_s
        return tuple(seq_to_heads(list(xs), group, timeout_s))

    @staticmethod
    def backward(ctx, *grads):  # undefined grads arrive as zeros (materialize_grads)
        return (None, None, *heads_to_seq(list(grads), ctx.group, ctx.timeout_s))


class _HeadsToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, group, timeout_s, y):
        ctx.group, ctx.timeout_s = group, timeout_s
        return heads_to_seq([y], group, timeout_s)[0]

    @staticmethod
    def backward(ctx, grad):
        return None, None, seq_to_heads([grad], ctx.group, ctx.timeout_s)[0]


class _RepeatHeads(torch.autograd.Function):
    """(B, n, H, D) -> (B, n, H·rep, D), each head repeated; backward sums the copies (fp32)."""

    @staticmethod
    def forward(ctx, x, rep: int):
        ctx.rep = rep
        return x.repeat_interleave(rep, dim=2)

    @staticmethod
    def backward(ctx, grad):
        acc = torch.float32 if grad.dtype in (torch.float16, torch.bfloat16) else grad.dtype
        folded = grad.unflatten(2, (grad.shape[2] // ctx.rep, ctx.rep)).sum(3, dtype=acc)
        return folded.to(grad.dtype), None


def _replicate_kv(k, v, u: int):
    hkv = k.shape[2]
    rep = kv_heads_after_replication(hkv, u) // hkv
    if rep == 1:
        return k, v
    extra = 2 * k[:, :, :1].numel() * (hkv * rep - hkv) * k.element_size()
    a2a_stats.replicated_bytes += extra * (u - 1) // u
    if (hkv, u) not in _LOGGED:
        _LOGGED.add((hkv, u))
        say = log.warning if _rank() == 0 else log.debug  # once per process, loud on rank 0
        say("Ulysses x ring: %d K/V heads is not a multiple of ulysses_size %d: K/V are "
            "replicated to %d heads before the all-to-all (counted in "
            "seqpar_ring.comm_a2a.a2a_stats.replicated_bytes)", hkv, u, hkv * rep)
    return _RepeatHeads.apply(k, rep), _RepeatHeads.apply(v, rep)


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


# --- the hybrid -------------------------------------------------------------------------------

def _local_checks(q, k, u: int, p: int, what: str, rates) -> None:
    """Rules that need no collective (so they raise on every rank, before any traffic)."""
    if q.dim() != 4 or k.dim() != 4:
        return  # check_inputs names the shape error
    heads = q.shape[2]
    if heads % u:
        ok = [d for d in range(1, p + 1) if p % d == 0 and heads % d == 0]
        raise ValueError(
            f"{what}: ulysses_size({u}) does not divide the number of query heads ({heads}): "
            "each Ulysses rank takes heads/ulysses_size heads; with sp_size "
            f"{p} and {heads} heads choose ulysses_size from {ok} (1 = pure ring)"
        )
    if rates:
        need = math.lcm(*rates)
        if (heads // u) % need:
            ok = [1] + [d for d in range(2, p + 1)  # u = 1: no per-rank head offset
                        if p % d == 0 and heads % d == 0 and (heads // d) % need == 0]
            raise ValueError(
                f"{what}: dilated attention with ulysses_size={u} and {heads} heads leaves "
                f"{heads // u} heads per rank, not a multiple of lcm(dilation_rates)={need}: "
                "head h keeps positions ≡ h (mod r), so each rank's heads must start at a "
                f"multiple of every rate. Working ulysses_size values for {heads} heads, "
                f"dilation_rates {list(rates)} and sp_size {p}: {ok} (1 always works)"
            )


def _hybrid(q, k, v, groups, inner: Callable, *, doc_ids, timeout_s: float, what: str,
            settings: dict, agreed: bool, rates=(), extra: Callable | None = None
            ) -> torch.Tensor:
    sp, ug, rg, u, r = _resolve(groups)

    def local():
        _local_checks(q, k, u, u * r, what, rates)
        if extra is not None:
            extra()
        if doc_ids is not None and tuple(doc_ids.shape) != tuple(q.shape[:2]):
            raise ValueError(f"doc_ids must be (batch, seq_local) = {tuple(q.shape[:2])}, "
                             f"got {tuple(doc_ids.shape)}")

    # One agreement over all p ranks covers the inner ring too (its shapes follow from these).
    check_inputs(q, k, v, sp, what=what, local=local, agreed=agreed, timeout_s=timeout_s,
                 settings=dict(settings, ulysses=u, ring=r, docs=doc_ids is not None))
    if u == 1:
        return inner(q, k, v, rg, doc_ids)
    k, v = _replicate_kv(k, v, u)
    qh, kh, vh = _SeqToHeads.apply(ug, timeout_s, q, k, v)
    doc = None
    if doc_ids is not None:  # (u, B, n) -> (B, u·n): the ring rank's shard, like the tokens
        doc = all_gather(doc_ids, ug, timeout_s).permute(1, 0, 2).reshape(q.shape[0], -1)
    out = inner(qh, kh, vh, rg, doc)
    return _HeadsToSeq.apply(ug, timeout_s, out)


def ulysses_ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    groups,
    *,
    causal: bool = True,
    layout: str = "zigzag",
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
    """Exact softmax attention over the SP group as Ulysses (all-to-all) x ring.

    q: (batch, seq_local, heads, head_dim); k, v: (batch, seq_local, kv_heads, head_dim),
    seq_local = S/p, tokens placed by ``layout.shard(..., ulysses_size=u)``. ``groups``: an
    `SPGroups` built with ``ulysses_size=u`` or a `HybridGroups`. heads must be a multiple of
    u (kv_heads need not be: K/V are then replicated, module doc). ``doc_ids`` (batch,
    seq_local) as in `ring_attention`. Other arguments are `ring_attention`'s, applied to the
    ring of r = p/u ranks (``window`` and ``sinks`` too: the sink logits of the heads a rank
    holds after the all-to-all go with them). Returns (batch, seq_local, heads, head_dim) in q's
    dtype.
    """
    ug = _resolve(groups)[1]

    def inner(qh, kh, vh, rg, doc):
        # r = 1 (pure Ulysses): both layouts hold the whole sequence in order, and
        # "contiguous" makes it ONE full-length kernel call (zigzag would cut it in 3 calls)
        lay = layout if rg is not None else "contiguous"
        s = sinks
        if s is not None and ug is not None:  # Ulysses rank j holds heads [j·h, (j+1)·h)
            h = qh.shape[2]
            s = s[C.group_rank(ug) * h:(C.group_rank(ug) + 1) * h]
        return ring_attention(qh, kh, vh, rg, causal=causal, layout=lay, comm=comm,
                              scale=scale, bucket_size=bucket_size, kernel=kernel, doc_ids=doc,
                              window=window, sinks=s, timeout_s=timeout_s, agreed=True)

    def local_sinks():
        if sinks is not None and tuple(sinks.shape) != (q.shape[2],):
            raise ValueError(f"sinks must be (heads,) = ({q.shape[2]},), got "
                             f"{tuple(sinks.shape)}")
        check_window(window, causal)

    return _hybrid(q, k, v, groups, inner, doc_ids=doc_ids, timeout_s=timeout_s,
                   what="ulysses_ring_attention", agreed=agreed, extra=local_sinks,
                   settings=dict(causal=causal, layout=layout, comm=comm, scale=scale,
                                 bucket_size=bucket_size, kernel=kernel, window=window,
                                 sinks=sinks is not None))


def ulysses_dilated_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    groups,
    *,
    segment_lengths,
    dilation_rates,
    causal: bool = True,
    layout: str = "contiguous",
    scale: float | None = None,
    bucket_size: int | None = None,
    kernel: str = "auto",
    timeout_s: float = C.DEFAULT_TIMEOUT_S,
    agreed: bool = False,
) -> torch.Tensor:
    """LongNet dilated attention (`dilated_attention`) as Ulysses x ring.

    Shapes and ``groups`` as in `ulysses_ring_attention`; layout contiguous over the ring.
    Needs (heads / u) % lcm(dilation_rates) == 0 (module doc); raises otherwise.
    """
    rates = tuple(dilation_rates or ())

    def inner(qh, kh, vh, rg, doc):
        return dilated_attention(qh, kh, vh, rg, segment_lengths=segment_lengths,
                                 dilation_rates=dilation_rates, causal=causal, layout=layout,
                                 scale=scale, bucket_size=bucket_size, kernel=kernel,
                                 timeout_s=timeout_s, agreed=True)

    return _hybrid(q, k, v, groups, inner, doc_ids=None, timeout_s=timeout_s,
                   what="ulysses_dilated_attention", agreed=agreed, rates=rates, settings=dict(
                       causal=causal, layout=layout, scale=scale, bucket_size=bucket_size,
                       kernel=kernel, segment_lengths=tuple(segment_lengths or ()),
                       dilation_rates=rates))
