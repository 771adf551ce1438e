"""Answers a user can act on: the best layouts for a run, and what a billion tokens needs.

`best_layouts` tries every SP size (the rest of the GPUs are data-parallel replicas, each on
its own sample), every Ulysses factor u the heads allow inside a node, activation offload
and the tiled MLP off or on, and (under checkpointing) attention recomputed or kept
(``recompute_attention=false``); keeps what fits GPU and host memory (`plan_memory`), ranks it by
predicted tokens/s over all GPUs (`plan_time`) and says for each other (SP, u) why it loses:
memory, a transfer-bound hop, the all-to-all, or the head count.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, replace

from .plan_calib import Calibration
from .plan_memory import Plan, estimate
from .plan_model import GIB, ModelSpec, PlanOptions, seq_divisor
from .plan_time import Links, StepTime, step_time


@dataclass
class Candidate:
    options: PlanOptions
    plan: Plan
    time: StepTime
    fits: bool
    why: str = ""

    @property
    def label(self) -> str:
        o = self.options
        extra = [x for x, on in (("offload", o.activation_offload), ("tiled MLP", o.tiled_mlp),
                                 ("kept attention", o.keep_attention)) if on]
        dp = o.gpus // o.sp_size
        return (f"sp {o.sp_size} (ring {o.sp_size // o.ulysses_size} x ulysses "
                f"{o.ulysses_size}), dp {dp}" + (", " + " + ".join(extra) if extra else ""))


def _memory_reason(pl: Plan, gpu_mem_gib: float, host_mem_gib: float, o: PlanOptions) -> str:
    if pl.peak_bytes > (gpu_mem_gib - o.reserve_gib) * GIB:
        return f"does not fit: {pl.peak_gib:.1f} GiB per GPU ({pl.phase}) > {gpu_mem_gib:g}"
    if pl.host_bytes > host_mem_gib * GIB:
        return f"does not fit: {pl.host_gib:.1f} GiB host per GPU > {host_mem_gib:g}"
    return ""


def layout_candidates(m: ModelSpec, seq_len: int, base: PlanOptions, c: Calibration,
                      links: Links, gpu_mem_gib: float, host_mem_gib: float
                      ) -> tuple[list[Candidate], list[str]]:
    """Every layout of ``base.gpus`` GPUs at ``seq_len`` (and why some u were not tried)."""
    out, skipped = [], []
    need = math.lcm(*base.dilation_rates) if base.attention == "dilated" and \
        base.dilation_rates else 1
    for sp in (s for s in range(1, base.gpus + 1) if base.gpus % s == 0):
        for u in (x for x in range(1, sp + 1) if sp % x == 0):
            if u > 1 and (m.heads % u or (m.heads // u) % need):
                skipped.append(f"sp {sp}, ulysses {u}: the head count ({m.heads}) "
                               + ("is not a multiple of u" if m.heads % u else
                                  f"/ u is not a multiple of lcm(rates) = {need}"))
                continue
            if u > links.gpus_per_node:
                continue  # an all-to-all across nodes: the pure ring beats it (not listed)
            # offload moves and keeping skips what checkpointing recomputes: both need it
            both = (False, True) if base.checkpointing else (False,)
            for off, tiled, keep in itertools.product(both, (False, True), both):
                o = replace(base, sp=sp, ulysses_size=u, activation_offload=off,
                            tiled_mlp=tiled, keep_attention=keep)
                if seq_len % seq_divisor(o):
                    continue
                pl = estimate(m, seq_len, o)
                why = _memory_reason(pl, gpu_mem_gib, host_mem_gib, o)
                out.append(Candidate(o, pl, step_time(m, seq_len, o, c, links), not why, why))
    return out, sorted(set(skipped))


def _loses(c: Candidate, best: Candidate) -> str:
    if not c.fits:
        return c.why + (" (even with offload + tiled MLP)" if c.options.activation_offload
                        and c.options.tiled_mlp else "")
    # GPU-seconds per million tokens trained: comparable across data-parallel degrees
    def per_m(x: Candidate, name: str) -> float:
        return x.time.of(name) * x.options.gpus / (x.time.tokens_per_s * x.time.seconds) * 1e6

    gap = {n: per_m(c, n) - per_m(best, n) for n, _, _ in c.time.terms}
    name, extra = max(gap.items(), key=lambda kv: kv[1])
    why = (f"{c.time.tokens_per_s:,.0f} tokens/s: {name} +{extra:,.1f} GPU-s per million "
           "tokens")
    if name in ("attention", "all-to-all"):
        why += " (" + next(w for n, _, w in c.time.terms if n == name) + ")"
    notes = [n for n in c.time.notes if "transfer-bound" in n]
    return why + (f"; {notes[0]}" if notes else "")


def _rank(x: Candidate) -> tuple:
    """Fitting first, fastest first (fewer options on a tie); then the least memory."""
    o = x.options
    if x.fits:
        return (0, -round(x.time.tokens_per_s, 6),
                o.activation_offload + o.tiled_mlp + o.keep_attention)
    return (1, x.plan.peak_bytes + x.plan.host_bytes, 0)


def best_layouts(m: ModelSpec, seq_len: int, base: PlanOptions, c: Calibration, links: Links,
                 gpu_mem_gib: float, host_mem_gib: float, top: int = 3
                 ) -> tuple[list[Candidate], list[tuple[Candidate, str]], list[str]]:
    """(the ``top`` fastest fitting SP x Ulysses splits, each with its best reach options;
    every other split's best variant and why it loses; the head-count exclusions)."""
    cands, skipped = layout_candidates(m, seq_len, base, c, links, gpu_mem_gib, host_mem_gib)
    per_split: dict[tuple[int, int], Candidate] = {}
    for x in sorted(cands, key=_rank):
        per_split.setdefault((x.options.sp_size, x.options.ulysses_size), x)
    ranked = sorted(per_split.values(), key=_rank)
    best = [x for x in ranked if x.fits][:top]
    losers = [(x, _loses(x, best[0]) if best else x.why) for x in ranked if x not in best]
    return best, losers, skipped


def format_best(best, losers, skipped, seq_len: int, gpus: int, nodes: int) -> str:
    rows = [f"best layouts for {seq_len:,} tokens per sample on {gpus} GPUs ({nodes} node"
            f"{'s' if nodes > 1 else ''}), by predicted tokens/s:"]
    if not best:
        rows.append("  none fits: more GPUs, --offload/--tiled-mlp limits below, or a shorter "
                    "sequence")
    for i, x in enumerate(best, 1):
        rows.append(f"  {i}. {x.label}: {x.time.tokens_per_s:,.0f} tokens/s, "
                    f"{x.time.seconds:,.2f} s per step, {x.plan.peak_gib:.1f} GiB per GPU, "
                    f"host {x.plan.host_gib:.1f} GiB")
    if best:
        close = [i for i, x in enumerate(best[1:], 2)
                 if x.time.tokens_per_s >= 0.85 * best[0].time.tokens_per_s]
        if close:
            rows.append(f"  (#{', #'.join(map(str, close))} within 15% of #1: equal within the "
                        "model's error against measurements; choose by memory or simplicity)")
    if losers:
        rows.append("  why the others lose (best variant of each SP x Ulysses split):")
        rows += [f"    {x.label}: {why}" for x, why in losers]
    rows += [f"    not tried: {s}" for s in skipped]
    return "\n".join(rows)


def fewest_gpus(m: ModelSpec, seq_len: int, base: PlanOptions, c: Calibration, links: Links,
                gpu_mem_gib: float, host_mem_gib: float, limit: int = 2**17
                ) -> Candidate | None:
    """The fastest fitting layout at the smallest power-of-two GPU count that fits any."""
    gpus = 1
    while gpus <= limit:
        o = replace(base, gpus=gpus, sp=gpus)
        for u in (1,):  # the pure ring over all GPUs: the least memory per GPU
            for off, tiled in ((False, False), (False, True), (True, True)):
                x = replace(o, ulysses_size=u, activation_offload=off, tiled_mlp=tiled)
                if seq_len % seq_divisor(x):
                    continue
                pl = estimate(m, seq_len, x)
                if not _memory_reason(pl, gpu_mem_gib, host_mem_gib, x):
                    return Candidate(x, pl, step_time(m, seq_len, x, c, links), True)
        gpus *= 2
    return None


def format_reach(x: Candidate | None, seq_len: int, mode: str, gpus_per_node: int) -> str:
    if x is None:
        return f"  {mode}: no power-of-two GPU count up to 2^17 fits {seq_len:,} tokens"
    g = x.options.gpus
    nodes = math.ceil(g / gpus_per_node)
    st = x.time
    days = st.seconds / 86400
    when = f"{st.seconds:,.0f} s" + (f" ({days:,.1f} days)" if days >= 1 else
                                     f" ({st.seconds / 3600:.1f} h)" if st.seconds >= 3600 else "")
    return (f"  {mode}: {g:,} GPUs ({nodes:,} nodes of {gpus_per_node}), {x.label}: "
            f"{x.plan.peak_gib:.0f} GiB per GPU, host {x.plan.host_gib:.0f} GiB; one step "
            f"{when}, {st.tokens_per_s:,.0f} tokens/s")
