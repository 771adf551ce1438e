"""Reach demonstration for ``bench e2e --find-max`` with dilated attention, and host memory.

A dense training step at millions of tokens takes far longer than a device may run, but a
dilated step has the same memory terms except the attention's working set (the planner models
both). So at the longest dense length the planner allows (``--find-limit`` caps it):

1. one dilated training step (forward, backward, ZeRO step) at that length: peak GPU and host
   memory, measured, next to the planner's figures for that step;
2. one dense attention layer forward+backward at that length (the model's head shapes, ring
   attention over the SP group, zigzag): its working set, measured, next to the planner's;
3. the planner's dense step at that length, and the same figure re-based on the measured
   dilated peak (measured + planner's dense - planner's dilated), against the GPU's memory.

If the dilated step fails, the length is halved until one passes (or ``--find-start``).

Host memory is the process's resident-set peak (``VmHWM``, reset per point through
``/proc/self/clear_refs``) plus, when pinned blocks turn out not to be counted in the
resident set (probed once), the pinned allocator's peak.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import replace

import torch
import torch.distributed as dist

from seqpar_ring.tools import plan as planner

from .common import sync

GIB = 2**30


# --- host memory ------------------------------------------------------------------------
def host_mem_per_rank_gib(local_world: int) -> float:
    """This machine's memory (or its cgroup limit, if lower) divided among its local ranks."""
    total = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    total = int(line.split()[1]) * 1024
    except OSError:
        pass
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                raw = f.read().strip()
            if raw.isdigit() and (total is None or int(raw) < total):
                total = int(raw)
        except OSError:
            continue
    return (total or 0) / GIB / max(1, local_world)


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


class HostPeak:
    """Peak host memory of this process between `reset` and `read` (GiB)."""

    def __init__(self, dev: torch.device):
        self.cuda = dev.type == "cuda"
        self.pinned_in_rss = self._probe() if self.cuda else True
        self.resettable = True

    @staticmethod
    def _probe() -> bool:
        """Whether pinned host blocks count in this process's resident set."""
        before = _status_kib("VmRSS")
        block = torch.empty(2**28, dtype=torch.uint8, pin_memory=True)
        block.fill_(1)
        grew = _status_kib("VmRSS") - before > 2**17  # more than half of the 256 MiB
        del block
        return grew

    def reset(self) -> None:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current resident set
        except OSError:
            self.resettable = False  # then VmHWM is the peak since the process started
        if self.cuda:
            torch.cuda.reset_peak_host_memory_stats()

    def read(self) -> dict:
        rss = _status_kib("VmHWM") / 2**20
        pinned = (torch.cuda.host_memory_stats().get("allocated_bytes.peak", 0) / GIB
                  if self.cuda else 0.0)
        host = rss if self.pinned_in_rss else rss + pinned
        return {"host_gib": host, "rss_gib": rss, "pinned_gib": pinned,
                "host_since_start": not self.resettable}


# --- planner options for a point ------------------------------------------------------------
def plan_options(impl, a, *, attention: str | None = None,
                 offload: bool | None = None) -> planner.PlanOptions:
    """The planner's model of what ``impl`` runs (reserve 0: it compares with max_allocated)."""
    attention = attention or a.attention
    seqpar = a.impl_name == "seqpar"
    dilated = seqpar and attention == "dilated"
    if offload is None:
        offload = seqpar and a.activation_offload != "off"
    layout = getattr(impl, "layout", "zigzag")  # what the engine runs
    if dilated:
        layout = "contiguous"
    elif seqpar and a.attention == "dilated":
        layout = "zigzag"  # the dense counterpart of a dilated run, as attention_check runs it
    return planner.PlanOptions(
        gpus=impl.world, zero=a.zero, dtype=a.dtype, loss_tile=a.loss_tile, layout=layout,
        attention="dilated" if dilated else "ring",
        dilation_rates=tuple(a.rates) if dilated else (), reserve_gib=0.0,
        reduce_bucket=a.bucket, prefetch_bucket=a.bucket,
        ulysses_size=getattr(impl, "ulysses", 1) if seqpar else 1,
        activation_offload=bool(offload and seqpar), tiled_mlp=bool(a.tiled_mlp and seqpar),
        host_reserve_gib=a.host_reserve_gib)


# --- dense attention layer ------------------------------------------------------------------
def attention_check(impl, seq: int, a) -> dict:
    """One dense attention forward+backward at ``seq`` tokens over the SP group (all ranks).

    Over the engine's groups (`integrations.deepspeed.initialize` built them): ring attention,
    or Ulysses x ring when the run's ``ulysses_size`` > 1, as the training step runs it.
    """
    from seqpar_ring.ring import ring_attention
    from seqpar_ring.ulysses import ulysses_ring_attention

    spec, dev, world = impl.spec, impl.dev, impl.world
    n = seq // world
    torch.manual_seed(1000 + getattr(impl, "rank", 0))
    shape_q, shape_kv = (1, n, spec.heads, spec.d), (1, n, spec.kv_heads, spec.d)
    row = {"seq_len": seq, "status": "ok"}
    try:
        q, k, v = (torch.randn(s, device=dev, dtype=a.torch_dtype).requires_grad_()
                   for s in (shape_q, shape_kv, shape_kv))
        dout = torch.randn(shape_q, device=dev, dtype=a.torch_dtype)
        sync(dev)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(dev)
            base = torch.cuda.memory_allocated(dev)
        t0 = time.perf_counter()
        groups = impl.engine.seqpar_groups
        if groups is not None and groups.ulysses_size > 1:
            out = ulysses_ring_attention(q, k, v, groups, causal=True, layout="zigzag",
                                         kernel=a.kernel)
        else:
            out = ring_attention(q, k, v, groups.sp_group if groups is not None else None,
                                 causal=True, layout="zigzag", kernel=a.kernel)
        out.backward(dout)
        sync(dev)
        row["seconds"] = time.perf_counter() - t0
        if dev.type == "cuda":
            row["peak_gib"] = (torch.cuda.max_memory_allocated(dev) - base) / GIB
        del q, k, v, dout, out
    except Exception as e:  # noqa: BLE001 - reported, the run goes on
        row["status"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
    row["plan_gib"] = planner.attention_check_bytes(
        impl.spec, seq, plan_options(impl, a, attention="ring")) / GIB
    return row


def round_for_schedule(seq: int, divisor: int, segments: list[int]) -> int:
    """Largest length <= seq that is a multiple of ``divisor`` and of every segment <= it."""
    while seq > 0:
        m = math.lcm(divisor, *[w for w in segments if w <= seq])
        r = seq // m * m
        if r == seq:
            return seq
        seq = r
    return 0


def budgets(impl, a) -> tuple[float, float]:
    """(GPU GiB, host GiB per rank) the planner plans against."""
    gpu = a.gpu_mem_gib
    if gpu is None:
        gpu = (torch.cuda.get_device_properties(impl.dev).total_memory / GIB
               if impl.dev.type == "cuda" else 0.0)
    host = a.host_mem_gib
    if host is None:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", impl.world))
        host = host_mem_per_rank_gib(local)
    return gpu, host


def find_max(impl, a, run_point) -> tuple[int, list[dict], dict]:
    """The demonstration of the module doc; returns (length shown, rows, summary)."""
    gpu, host = budgets(impl, a)
    spec = impl.spec
    dense_o = plan_options(impl, a, attention="ring")
    dil_o = plan_options(impl, a, attention="dilated")
    reserve = planner.PlanOptions.reserve_gib  # what fits leaves the planner's usual reserve
    dense_max, dense_limit = planner.reach(spec, replace(dense_o, reserve_gib=reserve), gpu, host)
    dil_max, dil_limit = planner.reach(spec, replace(dil_o, reserve_gib=reserve), gpu, host)
    div = math.lcm(impl.divisor, 2 * impl.world)
    seq = round_for_schedule(min(dense_max, a.find_limit), div, a.segments)
    rows: list[dict] = []
    summary = {"gpu_mem_gib": gpu, "host_mem_gib": host, "reserve_gib": reserve,
               "planner_dense_max": dense_max,
               "planner_dense_limit": dense_limit, "planner_dilated_max": dil_max,
               "planner_dilated_limit": dil_limit}
    shown = 0
    while seq >= max(1, a.find_start):
        r = run_point(impl, seq, a, steps=a.steps)
        rows.append(r)
        if r["status"] == "ok":
            shown = seq
            break
        seq = round_for_schedule(seq // 2, div, a.segments)
    if not shown:
        return 0, rows, summary
    step = rows[-1]
    check = attention_check(impl, shown, a)
    dense_plan = planner.estimate(spec, shown, dense_o)
    dil_plan = planner.estimate(spec, shown, dil_o)
    rebased = (step["peak_gib"] + dense_plan.peak_gib - dil_plan.peak_gib
               if step.get("peak_gib") == step.get("peak_gib") else None)  # NaN on CPU
    summary.update(seq_len=shown, step=step, attention_check=check,
                   planner_dense_gib=dense_plan.peak_gib,
                   planner_dense_host_gib=dense_plan.host_gib,
                   planner_dilated_gib=dil_plan.peak_gib, dense_from_measured_gib=rebased)
    return shown, rows, summary


def _ratio(x, y) -> str:
    return f"{x / y:.2f}" if isinstance(x, float) and y and x == x else "-"


def format_summary(s: dict, a) -> str:
    """The closing lines of a reach demonstration (rank 0 prints them)."""
    if "seq_len" not in s:
        return (f"reach: no dilated step passed between {a.find_start:,} and the planner's "
                f"{s['planner_dense_max']:,} tokens")
    st, ck, host = s["step"], s["attention_check"], s["host_mem_gib"]
    gpu = s["gpu_mem_gib"] - s["reserve_gib"]  # what the planner lets a step use
    opts = ", ".join(n for n, on in (("activation offload", a.activation_offload != "off"),
                                     ("tiled MLP", a.tiled_mlp)) if on) or "no reach options"

    def f(x) -> str:
        return f"{x:.1f}" if isinstance(x, float) and x == x else "-"

    def vs(measured, planned) -> str:
        ratio = _ratio(measured, planned)
        return f"measured {f(measured)} GiB, planner {f(planned)} GiB (ratio {ratio})"

    dense_fits = s["planner_dense_gib"] <= gpu and s["planner_dense_host_gib"] <= host
    verdict = "fits" if dense_fits else "DOES NOT FIT"
    lines = [
        f"reach at {s['seq_len']:,} tokens ({a.model}, SP={st['world']}, {opts}; "
        f"{s['gpu_mem_gib']:.1f} GiB GPU less {s['reserve_gib']:g} reserve, {host:.0f} GiB host "
        "per rank):",
        f"  dilated training step: {f(st['step_s'])} s/step, {st['tokens_per_s']:,.0f} tokens/s",
        f"    GPU peak:  {vs(st['peak_gib'], st['plan_gib'])}",
        f"    host peak: {vs(st['host_gib'], st['plan_host_gib'])}; resident set "
        f"{f(st['rss_gib'])}, pinned {f(st['pinned_gib'])}, offloaded inputs "
        f"{f(st.get('offload_host_gib', 0.0))} GiB",
        f"  dense attention layer fwd+bwd: {ck['status']}"
        + (f", {f(ck['seconds'])} s" if "seconds" in ck else ""),
        f"    GPU above its inputs: {vs(ck.get('peak_gib'), ck['plan_gib'])}",
        f"  dense training step, planner: GPU {f(s['planner_dense_gib'])} GiB, host "
        f"{f(s['planner_dense_host_gib'])} GiB per rank: {verdict}",
    ]
    if s.get("dense_from_measured_gib") is not None:
        d = s["dense_from_measured_gib"]
        lines.append(f"  dense step = measured dilated peak + planner (dense - dilated): "
                     f"{f(d)} GiB: {'fits' if d <= gpu else 'DOES NOT FIT'}")
    lines.append(f"  planner, longest: dense {s['planner_dense_max']:,} "
                 f"({s['planner_dense_limit']}), dilated {s['planner_dilated_max']:,} "
                 f"({s['planner_dilated_limit']})")
    return "\n".join(lines)


def all_ranks_max(values: list[float], dev: torch.device) -> list[float]:
    """Element-wise max over ranks (NaN-free values), for per-GPU / per-rank peaks."""
    if not dist.is_initialized():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=dev)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()
