"""Typed, validated configuration of sequence parallelism.

`SeqParConfig` is what the DeepSpeed JSON's ``"sequence_parallel"`` section and the launcher
flags turn into. Every rule that can be checked without the sequence length is checked in
``__post_init__``, so a bad setting fails at start-up on every rank with a message that names
the key, the bad value and the fix, instead of hanging or diverging later inside a collective.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

__all__ = ["SeqParConfig", "ATTENTIONS", "LAYOUTS", "COMMS", "KERNELS", "AUTO"]

ATTENTIONS = ("ring", "dilated")
LAYOUTS = ("contiguous", "zigzag")
COMMS = ("ring", "allgather")
KERNELS = ("auto", "torch", "cudnn", "flash")
AUTO = "auto"  # ulysses_size chosen by the planner (seqpar_ring.tools.plan.resolve_ulysses_size)

MIN_TIMEOUT_S = 1.0  # below this a healthy exchange on a busy machine already times out
_SECTION = "sequence_parallel"  # prefix of every error message: the key as a user writes it


def _is_int(x: Any) -> bool:
    # bool is an int subclass; `sp_size: true` in a JSON file is a mistake, not 1.
    return isinstance(x, int) and not isinstance(x, bool)


def _as_int_tuple(key: str, value: Any) -> tuple[int, ...] | None:
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise ValueError(
            f"{_SECTION}.{key}={value!r} must be a list of positive integers, e.g. [2048, 4096]"
        )
    out = tuple(value)
    bad = [v for v in out if not _is_int(v) or v < 1]
    if bad:
        raise ValueError(
            f"{_SECTION}.{key}={list(out)!r} holds {bad!r}: every value must be an integer >= 1"
        )
    return out


@dataclass(frozen=True)
class SeqParConfig:
    """Settings of sequence parallelism (one SP group of ``sp_size`` ranks per replica).

    Attributes:
        sp_size: ranks that share the tokens of one sample (p). 1 disables sharding.
        attention: ``"ring"`` (exact softmax attention) or ``"dilated"`` (LongNet, docs/dilated.md).
        layout: how tokens are placed on ranks: ``"contiguous"`` (rank r holds chunk r of p) or
            ``"zigzag"`` (2p chunks, rank r holds chunks r and 2p-1-r; balances causal work).
            Default: zigzag for ring attention, contiguous for dilated (its only layout).
        comm: ``"ring"`` (K/V blocks pass around the ring) or ``"allgather"`` (K/V gathered once).
        segment_lengths, dilation_rates: dilated only (required there); w_i % r_i == 0.
        bucket_size: tile of the pure-torch kernel in tokens; None = whole block.
        kernel: local block kernel: ``"auto"``, ``"torch"``, ``"cudnn"``, ``"flash"`` (packed
            documents run on the fused kernels too: see `seqpar_ring.documents`).
        comm_timeout_s: how long a ring exchange may wait before raising instead of hanging.
        ulysses_size: u, the Ulysses (all-to-all) factor of the SP group: p = u x r. Each rank's
            heads are exchanged over u adjacent ranks (seq/p, heads) -> (seq/r, heads/u), then
            the ring runs over r ranks (`seqpar_ring.ulysses`). 1 (default) is the pure ring,
            ``sp_size`` pure Ulysses. ``"auto"``: chosen from the model's head counts and the
            sequence length by `seqpar_ring.tools.plan.resolve_ulysses_size` (must be resolved
            before the groups are built).
        activation_offload: keep each checkpointed decoder layer's input in pinned host memory
            between its forward and its recompute (`seqpar_ring.offload`; needs gradient
            checkpointing). Frees layers x tokens x hidden of GPU memory for host memory and
            PCIe copies that overlap compute.
        tiled_mlp: compute each decoder MLP over tiles of tokens with recompute in backward
            (`seqpar_ring.tiled_mlp`): one tile's intermediate activations at a time.
        recompute_attention: under gradient checkpointing, compute attention again in backward
            (default). False keeps each layer's attention output and lse from the forward
            instead (`seqpar_ring.recompute`): one attention forward less per layer and step,
            for tokens x hidden (model dtype) + heads x tokens (fp32) per layer of memory.
    """

    sp_size: int = 1
    attention: str = "ring"
    layout: str | None = None
    comm: str = "ring"
    segment_lengths: tuple[int, ...] | None = None
    dilation_rates: tuple[int, ...] | None = None
    bucket_size: int | None = None
    kernel: str = "auto"
    comm_timeout_s: float = 600.0
    ulysses_size: int | str = 1
    activation_offload: bool = False
    tiled_mlp: bool = False
    recompute_attention: bool = True

    def __post_init__(self) -> None:
        if self.layout is None:  # frozen: resolve the default through object.__setattr__
            object.__setattr__(self, "layout",
                               "contiguous" if self.attention == "dilated" else "zigzag")
        if not _is_int(self.sp_size) or self.sp_size < 1:
            raise ValueError(
                f"{_SECTION}.sp_size={self.sp_size!r} must be an integer >= 1 "
                "(the number of ranks that share one sample's tokens)"
            )
        for key, allowed in (
            ("attention", ATTENTIONS),
            ("layout", LAYOUTS),
            ("comm", COMMS),
            ("kernel", KERNELS),
        ):
            value = getattr(self, key)
            if value not in allowed:
                raise ValueError(f"{_SECTION}.{key}={value!r} is not one of {allowed}")
        if self.bucket_size is not None and (not _is_int(self.bucket_size) or self.bucket_size < 1):
            raise ValueError(
                f"{_SECTION}.bucket_size={self.bucket_size!r} must be an integer >= 1, "
                "or null to use the whole block"
            )
        t = self.comm_timeout_s
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not t >= MIN_TIMEOUT_S or (
                math.isinf(t)):
            raise ValueError(
                f"{_SECTION}.comm_timeout_s={t!r} must be a finite number of seconds >= "
                f"{MIN_TIMEOUT_S:g} (shorter waits fail healthy exchanges; default 600)"
            )
        self._check_ulysses()
        for key in ("activation_offload", "tiled_mlp", "recompute_attention"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(
                    f"{_SECTION}.{key}={getattr(self, key)!r} must be true or false"
                )
        # frozen dataclass: normalise lists (from JSON) to tuples through object.__setattr__
        seg = _as_int_tuple("segment_lengths", self.segment_lengths)
        dil = _as_int_tuple("dilation_rates", self.dilation_rates)
        object.__setattr__(self, "segment_lengths", seg)
        object.__setattr__(self, "dilation_rates", dil)
        object.__setattr__(self, "comm_timeout_s", float(t))
        if self.attention == "dilated":
            self._check_dilated(seg, dil)
            if self.layout != "contiguous":
                raise ValueError(
                    f"{_SECTION}.layout={self.layout!r}: dilated attention runs on the "
                    "contiguous layout only (its segments balance the work by construction); "
                    "set layout='contiguous' or leave it out"
                )
        elif seg is not None or dil is not None:
            key = "segment_lengths" if seg is not None else "dilation_rates"
            raise ValueError(
                f"{_SECTION}.{key} is set but attention={self.attention!r}: "
                "set attention='dilated' or remove segment_lengths/dilation_rates"
            )

    def _check_ulysses(self) -> None:
        u = self.ulysses_size
        if u == AUTO:
            if self.sp_size == 1:  # nothing to choose
                object.__setattr__(self, "ulysses_size", 1)
            return
        if not _is_int(u) or u < 1:
            raise ValueError(
                f"{_SECTION}.ulysses_size={u!r} must be an integer >= 1 dividing sp_size, "
                f"or {AUTO!r}"
            )
        if self.sp_size % u:
            ok = [d for d in range(1, self.sp_size + 1) if self.sp_size % d == 0]
            raise ValueError(
                f"{_SECTION}.ulysses_size({u}) does not divide sp_size({self.sp_size}): "
                f"sp_size = ulysses_size x ring size, so choose ulysses_size from {ok}"
            )

    @property
    def ring_size(self) -> int:
        """r = sp_size / ulysses_size: ranks of the ring (1 = pure Ulysses)."""
        if self.ulysses_size == AUTO:
            raise ValueError(
                f"{_SECTION}.ulysses_size='auto' is not resolved yet: call "
                "seqpar_ring.tools.plan.resolve_ulysses_size(config, model, seq_len) first"
            )
        return self.sp_size // int(self.ulysses_size)

    @staticmethod
    def _check_dilated(seg: tuple[int, ...] | None, dil: tuple[int, ...] | None) -> None:
        for key, value in (("segment_lengths", seg), ("dilation_rates", dil)):
            if not value:
                raise ValueError(
                    f"{_SECTION}.{key}={value!r}: attention='dilated' needs non-empty "
                    "segment_lengths and dilation_rates of the same length, "
                    "e.g. segment_lengths=[2048, 4096], dilation_rates=[1, 2]"
                )
        assert seg is not None and dil is not None
        if len(seg) != len(dil):
            raise ValueError(
                f"{_SECTION}.segment_lengths={list(seg)!r} and "
                f"{_SECTION}.dilation_rates={list(dil)!r} "
                f"differ in length ({len(seg)} != {len(dil)}): give one rate per segment length"
            )
        for i, (w, r) in enumerate(zip(seg, dil)):
            if w % r != 0:
                raise ValueError(
                    f"{_SECTION}.segment_lengths[{i}]={w} is not a multiple of "
                    f"dilation_rates[{i}]={r}: choose w % r == 0, e.g. w={w - w % r or r}"
                )

    @property
    def seq_len_divisor(self) -> int:
        """The multiple every total sequence length must be (pad to it).

        p for contiguous, 2p for zigzag (1 at sp_size 1: one rank holds the row in order),
        times lcm(dilation_rates) for dilated attention.
        """
        zigzag = self.layout == "zigzag" and self.sp_size > 1
        base = self.sp_size * (2 if zigzag else 1)
        if self.attention == "dilated" and self.dilation_rates:
            base *= math.lcm(*self.dilation_rates)
        return base

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SeqParConfig:
        """Build from a JSON-style mapping (lists accepted); unknown keys raise ValueError."""
        if not isinstance(d, Mapping):
            raise ValueError(f"{_SECTION} must be a mapping of settings, got {type(d).__name__}")
        valid = [f.name for f in fields(cls)]
        unknown = sorted(k for k in d if k not in valid)
        if unknown:
            raise ValueError(
                f"{_SECTION} has unknown key(s) {unknown}; valid keys are {valid}"
            )
        return cls(**dict(d))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists); ``from_dict(to_dict())`` gives an equal config."""
        out = asdict(self)
        for key in ("segment_lengths", "dilation_rates"):
            if out[key] is not None:
                out[key] = list(out[key])
        return out
