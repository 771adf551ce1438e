"""Shared pieces of the benchmarks: process group from the launcher, timing, FLOPs, tables, JSON."""

from __future__ import annotations

import json
import os
import statistics
import time
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist


# Set by init_from_env when ranks share GPUs: {"ranks": per host, "gpus": per host}.
SHARED: dict[str, int] = {}


def shared_note() -> str:
    """The table header's warning when ranks share GPUs ('' otherwise)."""
    if not SHARED:
        return ""
    return (f"{SHARED['ranks']} ranks share {SHARED['gpus']} GPU(s) (gloo, host-staged "
            "exchange): not multi-GPU figures; '/rank' columns = time / ranks per GPU; "
            "kernel_ms = the largest rank's own GPU kernel time (its compute)")


def init_from_env(*, single_process_group: bool = False) -> tuple[int, int, torch.device]:
    """Join the process group torchrun/deepspeed set up in the environment (or run alone).

    ``single_process_group``: alone, still start a process group of one rank (DeepSpeed and
    the SP groups need one), on a free local port unless the launcher's variables are set.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 and single_process_group and not dist.is_initialized():
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        for key, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(port)),
                           ("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"),
                           ("LOCAL_WORLD_SIZE", "1")):
            os.environ.setdefault(key, value)
    if (world > 1 or single_process_group) and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            local = int(os.environ.get("LOCAL_RANK", "0"))
            per_host = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
            if per_host > torch.cuda.device_count():
                # more ranks than GPUs: NCCL refuses two ranks on one GPU; gloo runs them, the
                # transport stages CUDA tensors through host memory (seqpar_ring.stage)
                backend = "gloo"
                SHARED.update(ranks=per_host, gpus=torch.cuda.device_count())
            torch.cuda.set_device(local % torch.cuda.device_count())
        dist.init_process_group(backend, timeout=timedelta(minutes=10))
    rank = dist.get_rank() if dist.is_initialized() else 0
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    return rank, world, dev


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timeit(fn: Callable[[], Any], device: torch.device, *, warmup: int = 1, iters: int = 3,
           group=None, aligned: bool = True) -> float:
    """Median seconds of ``fn`` over ``iters`` runs, the ranks of ``group`` (default: the world,
    when a process group exists) aligned by a barrier before each run.

    ``aligned=False``: this rank times alone while its peers wait elsewhere (rank 0's one-GPU
    reference rows); a barrier there would pair with a peer's unrelated collective and hang.
    """
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        sync(device)
        if aligned and (group is not None or dist.is_initialized()):
            dist.barrier(group=group)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def device_activities(fn: Callable[[], Any], device: torch.device
                      ) -> list[tuple[str, int]] | None:
    """(name, ns) of every GPU activity of this process (kernels, copies) in one run of ``fn``,
    from the CUDA profiler's raw records (no operator tree, so nothing counts twice); None off
    CUDA."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        sync(device)
    return [(e.name(), e.duration_ns()) for e in prof.profiler.kineto_results.events()
            if e.device_type() == torch.autograd.DeviceType.CUDA]


def _is_copy(name: str) -> bool:
    return name.lower().startswith(("memcpy", "memset"))


def kernel_ms(fn: Callable[[], Any], device: torch.device, group=None) -> float | None:
    """GPU time of this process's kernels in one run of ``fn``, in ms (the largest over the
    ranks of ``group``), or None off CUDA or when the profiler gives nothing.

    With ranks sharing a GPU a step's wall time also holds the other ranks' kernels and the
    host-staged exchange; the sum of a rank's own kernel durations (copies and memsets left
    out) is that rank's compute time — what `print_table` reports as kernel_ms.
    """
    acts = device_activities(fn, device)
    if acts is None:
        return None
    ns = sum(d for name, d in acts if not _is_copy(name))
    ms = torch.tensor([ns / 1e6 if ns > 0 else float("nan")])
    if dist.is_initialized():
        dist.all_reduce(ms, op=dist.ReduceOp.MAX, group=group)  # a CPU tensor: gloo carries it
    return None if ms.isnan().item() else ms.item()


def kernel_breakdown(acts: list[tuple[str, int]], top: int = 12, width: int = 60
                     ) -> list[dict]:
    """Where the GPU time of a run went: rows (kernel, calls, ms, share), grouped by name,
    largest first; the rest summed in one row. Names cut to ``width`` characters."""
    total = sum(d for _, d in acts) or 1
    groups: dict[str, list[int]] = {}
    for name, d in acts:
        g = groups.setdefault(name, [0, 0])
        g[0] += 1
        g[1] += d
    ranked = sorted(groups.items(), key=lambda kv: -kv[1][1])
    rows = [dict(kernel=name[:width], calls=n, ms=ns / 1e6, share=ns / total)
            for name, (n, ns) in ranked[:top]]
    rest = ranked[top:]
    if rest:
        rows.append(dict(kernel=f"({len(rest)} others)", calls=sum(n for _, (n, _) in rest),
                         ms=sum(ns for _, (_, ns) in rest) / 1e6,
                         share=sum(ns for _, (_, ns) in rest) / total))
    return rows


def attention_flops(seq: int, heads: int, head_dim: int, *, causal: bool, backward: bool,
                    batch: int = 1) -> float:
    """4·S²·H·D per forward (half when causal); forward+backward = 3.5 x forward."""
    f = 4.0 * seq * seq * heads * head_dim * batch * (0.5 if causal else 1.0)
    return f * (3.5 if backward else 1.0)


def peak_gib(device: torch.device) -> float:
    if device.type != "cuda":
        return float("nan")
    return torch.cuda.max_memory_allocated(device) / 2**30


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def print_table(rows: list[dict], columns: list[str], title: str = "", *,
                alone: tuple[str, ...] = ()) -> str:
    """Render rows as a fixed-width table (missing values as '-'); returns the text.

    With ranks sharing GPUs, time columns get a '/rank' twin (time / ranks per GPU), except the
    ``alone`` ones: timed by one rank while its peers waited (rank 0's one-GPU references)."""
    def fmt(v):
        if isinstance(v, float):
            return f"{v:,.1f}" if abs(v) >= 10 else f"{v:.3f}"
        return "-" if v is None else str(v)

    if SHARED:  # time columns also per rank: one GPU runs every rank's kernels in turn
        share = SHARED["ranks"] / SHARED["gpus"]
        timed = [c for c in columns if c in ("ms", "step_s") or
                 c.endswith("_ms") and not c.endswith("kernel_ms")]  # one rank's already
        timed = [c for c in timed if c not in alone]
        rows = [dict(r, **{f"{c}/rank": r[c] / share for c in timed
                           if isinstance(r.get(c), (int, float))}) for r in rows]
        columns = [x for c in columns for x in ((c, f"{c}/rank") if c in timed else (c,))]
        title = shared_note() + ("\n" + title if title else "")
    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c)
              for i, c in enumerate(columns)]
    lines = [title] if title else []
    lines.append("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def write_json(path: str, payload: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    meta = {"torch": torch.__version__,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "world_size": dist.get_world_size() if dist.is_initialized() else 1,
            "shared_gpu": shared_note() or None,
            "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    with open(path, "w") as f:
        json.dump({"meta": meta, **payload}, f, indent=1)
    print(f"wrote {path}", flush=True)
