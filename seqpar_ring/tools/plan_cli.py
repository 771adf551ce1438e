"""Planner: memory and step time of a training step, the best layouts, and the longest sequence.

Memory (per GPU, term by term; host memory per rank with --offload) and, with --seq-len, the
step time (seconds, tokens/s, term by term) of OUR code path: HF Llama-architecture decoder,
ring / dilated / windowed attention (optionally Ulysses x ring), DeepSpeed ZeRO, gradient
checkpointing, tiled loss. The step-time model reads a calibration (--calib FILE, written by
--calibrate; default: the shipped H200 figures, each naming its measurement) and the links
(--intra-gbps, --inter-gbps per GPU across nodes, --host-gbps; --gpus-per-node).

    python -m seqpar_ring.plan --model llama-1.1b --seq-len 1048576 --gpus 2 --gpu-mem-gib 141
    python -m seqpar_ring.plan --model llama-8b --seq-len 1048576 --gpus 16 --gpus-per-node 8 --best
    python -m seqpar_ring.plan --model llama-8b --billion          # 2^30 tokens: GPUs, nodes, s
    python -m seqpar_ring.plan --validate      # predicted vs every measured point, with errors
    python -m seqpar_ring.plan --calibrate --calib-out h200.json   # measure this machine once

--best ranks every split of the GPUs (SP size, Ulysses factor u, data-parallel replicas,
offload, tiled MLP and kept attention off/on) that fits memory by predicted tokens/s and says
why the others lose. --billion answers what 1,073,741,824 tokens (2^30) need for --model: the
fewest GPUs (powers of two) that fit, dense and dilated, and the seconds per step.

``--model`` takes a preset name or a path to an HF ``config.json``. Without ``--gpu-mem-gib``
the memory of CUDA device 0 is used when there is one, else 80 GiB; the output says which.
``ulysses_size="auto"`` is chosen by the cost model of `seqpar_ring.tools.plan_ulysses`; with
``--seq-len`` the CLI prints that choice and its table. Without ``--seq-len`` it prints the
longest sequence, dense and dilated, for every combination of --offload and --tiled-mlp.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import replace

from .plan_calib import load_calibration, save_calibration
from .plan_memory import Plan, estimate, max_seq_len, reach
from .plan_model import (DTYPE_BYTES, FALLBACK_GPU_MEM_GIB, GIB, PRESETS, ModelSpec, PlanOptions,
                         dilated_schedule, gpu_memory_gib, load_spec)
from .plan_search import best_layouts, fewest_gpus, format_best, format_reach
from .plan_time import Links, StepTime, step_time
from .plan_ulysses import Hardware, choose_ulysses_size, format_choice

BILLION = 2**30


def options_from_args(a: argparse.Namespace) -> PlanOptions:
    dilated = a.attention == "dilated"
    return PlanOptions(gpus=a.gpus, sp=a.sp, zero=a.zero, dtype=a.dtype,
                       checkpointing=a.checkpointing, tiled_loss=a.tiled_loss,
                       loss_tile=a.loss_tile, micro_batch=a.micro_batch,
                       layout="contiguous" if dilated else a.layout,
                       attention=a.attention,
                       dilation_rates=tuple(a.dilation_rates) if dilated else (),
                       segment_lengths=tuple(a.segments) if dilated and a.segments else (),
                       window=a.window, doc_len=a.doc_len,
                       offload_optimizer=a.offload_optimizer, reserve_gib=a.reserve_gib,
                       ulysses_size=a.ulysses_size or 1,
                       activation_offload=a.offload, tiled_mlp=a.tiled_mlp,
                       keep_attention=a.keep_attention,
                       mlp_tile=a.mlp_tile, host_reserve_gib=a.host_reserve_gib)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m seqpar_ring.plan", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-1.1b", help=f"preset {sorted(PRESETS)} or path")
    p.add_argument("--seq-len", type=int, default=None, help="total tokens per sample")
    p.add_argument("--gpus", type=int, default=None,
                   help="GPUs in all (default: --nodes x --gpus-per-node, else 1)")
    p.add_argument("--nodes", type=int, default=None, help="nodes of --gpus-per-node GPUs")
    p.add_argument("--sp", type=int, default=None, help="SP group size (default: --gpus)")
    p.add_argument("--zero", type=int, default=3, choices=(0, 1, 2, 3))
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPE_BYTES))
    p.add_argument("--gpu-mem-gib", type=float, default=None,
                   help="memory per GPU in GiB (default: CUDA device 0's when present, else "
                        f"{FALLBACK_GPU_MEM_GIB:g})")
    p.add_argument("--host-mem-gib", type=float, default=128.0,
                   help="host memory per rank (GPU) that the step may use")
    p.add_argument("--host-reserve-gib", type=float, default=PlanOptions.host_reserve_gib,
                   help="host memory the process needs besides offloaded tensors")
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--layout", default="zigzag", choices=("contiguous", "zigzag"))
    p.add_argument("--attention", default="ring", choices=("ring", "dilated"),
                   help="of the detailed plan (the summary shows both)")
    p.add_argument("--dilation-rates", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--segments", type=int, nargs="+", default=None,
                   help="dilated segment lengths (default 2048·4^i, the last the sequence)")
    p.add_argument("--window", type=int, default=None,
                   help="sliding-window attention: each query sees min(i + 1, W) keys (time)")
    p.add_argument("--doc-len", type=int, default=None,
                   help="packed rows of documents of this many tokens (time)")
    p.add_argument("--loss-tile", type=int, default=None)
    p.add_argument("--mlp-tile", type=int, default=None, help="tokens per tiled-MLP tile")
    p.add_argument("--reserve-gib", type=float, default=1.0)
    p.add_argument("--offload", "--activation-offload", dest="offload", action="store_true",
                   help="activation-checkpoint offload: layer inputs in pinned host memory")
    p.add_argument("--tiled-mlp", action="store_true", help="decoder MLPs over sequence tiles")
    p.add_argument("--keep-attention", action="store_true",
                   help="recompute_attention=false: attention outputs kept across the "
                   "checkpoint's recomputation (memory for time)")
    p.add_argument("--offload-optimizer", action="store_true")
    p.add_argument("--ulysses-size", type=int, default=None,
                   help="Ulysses factor of the SP group (default 1); with --seq-len the "
                   "modelled 'auto' choice is printed either way")
    p.add_argument("--gpus-per-node", type=int, default=8,
                   help="GPUs per node: rings and all-to-alls beyond it use --inter-gbps")
    for flag, default in (("checkpointing", True), ("tiled-loss", True)):
        p.add_argument(f"--{flag}", action=argparse.BooleanOptionalAction, default=default)
    t = p.add_argument_group("step time")
    t.add_argument("--calib", default=None,
                   help="calibration JSON (from --calibrate); default: shipped H200 figures")
    t.add_argument("--intra-gbps", type=float, default=None,
                   help="GB/s per GPU per direction inside a node (default: calibration's)")
    t.add_argument("--inter-gbps", type=float, default=Links.inter_gbps,
                   help="GB/s per GPU per direction across nodes (default 50 = 400 Gb/s)")
    t.add_argument("--host-gbps", type=float, default=None,
                   help="host link GB/s per GPU (default: calibration's)")
    t.add_argument("--best", action="store_true",
                   help="with --seq-len: rank every layout of the GPUs that fits")
    t.add_argument("--top", type=int, default=3, help="layouts --best shows")
    t.add_argument("--billion", action="store_true",
                   help="what 2^30 tokens need for --model: GPUs, nodes, s per step")
    t.add_argument("--validate", action="store_true",
                   help="the model against every measured point: predicted, measured, error")
    t.add_argument("--calibrate", action="store_true",
                   help="measure this machine (matmul, attention, copy, host link, peers) "
                        "and write --calib-out")
    t.add_argument("--calib-out", default="seqpar_calib.json", help="file --calibrate writes")
    t.add_argument("--quick", action="store_true", help="--calibrate with tiny sizes (a check)")
    return p


def format_plan(pl: Plan, gpu_mem_gib: float | None = None,
                host_mem_gib: float | None = None) -> str:
    rows = [f"seq_len {pl.seq_len:,}  tokens/GPU {pl.tokens_per_gpu:,}  peak phase: {pl.phase}",
            f"{'component':<22} {'GiB':>9}  why"]
    rows += [f"{n:<22} {v / GIB:>9.2f}  {why}" for n, v, why in pl.components]
    rows.append(f"{'peak (per GPU)':<22} {pl.peak_gib:>9.2f}" +
                (f"  of {gpu_mem_gib:.4g} GiB" if gpu_mem_gib else ""))
    rows += [f"{'host: ' + n:<22} {v / GIB:>9.2f}  {why}" for n, v, why in pl.host_components]
    rows.append(f"{'host (per rank)':<22} {pl.host_gib:>9.2f}" +
                (f"  of {host_mem_gib:g} GiB" if host_mem_gib else ""))
    return "\n".join(rows)


def reach_table(m: ModelSpec, o: PlanOptions, gpu_mem_gib: float, host_mem_gib: float,
                rates: tuple[int, ...]) -> str:
    """Longest sequence, dense and dilated, for each combination of the reach options."""
    dense = replace(o, attention="ring", dilation_rates=(),
                    layout="zigzag" if o.attention == "dilated" else o.layout)
    dil = replace(o, attention="dilated", dilation_rates=rates, layout="contiguous")
    rows = [f"longest sequence (limit), {gpu_mem_gib:g} GiB per GPU, {host_mem_gib:g} GiB host "
            f"per rank, {o.gpus} GPUs:",
            f"  {'options':<28} {'dense (ring, ' + dense.layout + ')':<30} "
            f"dilated (r = {','.join(map(str, rates))})"]
    for name, off, tiled in (("checkpointing", False, False), ("+ tiled MLP", False, True),
                             ("+ activation offload", True, False),
                             ("+ offload + tiled MLP", True, True)):
        cells = []
        for base in (dense, dil):
            seq, lim = reach(m, replace(base, activation_offload=off, tiled_mlp=tiled),
                             gpu_mem_gib, host_mem_gib)
            cells.append(f"{seq:>13,} ({lim})")
        rows.append(f"  {name:<28} {cells[0]:<30} {cells[1]}")
    return "\n".join(rows)


def format_time(st: StepTime) -> str:
    rows = [f"step time (modelled): {st.seconds:,.2f} s per step, {st.tokens_per_s:,.0f} "
            f"tokens/s over {st.gpus} GPUs (sp {st.sp}, ulysses {st.ulysses}, dp "
            f"{st.gpus // st.sp})", f"{'term':<22} {'s':>10}  why"]
    rows += [f"{n:<22} {s:>10.3f}  {why}" for n, s, why in st.terms]
    rows += [f"note: {n}" for n in dict.fromkeys(st.notes)]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    a = build_parser().parse_args(argv)
    if a.calibrate:
        from .plan_calibrate import calibrate

        c = calibrate(quick=a.quick)
        save_calibration(c, a.calib_out)
        print(f"wrote {a.calib_out}; use it with --calib {a.calib_out}")
        return
    calib = load_calibration(a.calib)
    links = Links(a.gpus_per_node, a.intra_gbps, a.inter_gbps, a.host_gbps)
    if a.validate:
        from .plan_validate import format_checks, validate

        print(f"calibration: {calib.device}")
        print(format_checks(validate(calib)))
        return
    if a.gpus is None:
        a.gpus = a.nodes * a.gpus_per_node if a.nodes else 1
    nodes = a.nodes or math.ceil(a.gpus / a.gpus_per_node)
    m, o = load_spec(a.model), options_from_args(a)
    mem, why = gpu_memory_gib(a.gpu_mem_gib)
    if a.billion:
        print(f"{BILLION:,} tokens, {a.model}, {mem:.4g} GiB per GPU, {a.host_mem_gib:g} GiB "
              f"host per GPU, {a.inter_gbps:g} GB/s per GPU across nodes; fewest GPUs:")
        base = replace(o, attention="ring", dilation_rates=(), layout="zigzag")
        rates = tuple(a.dilation_rates)
        dil = replace(o, attention="dilated", dilation_rates=rates, layout="contiguous",
                      segment_lengths=tuple(a.segments or ()))
        ws, rs = dilated_schedule(dil, BILLION)
        sched = (f"dilated (w = {', '.join(f'{w:,}' for w in ws)}; r = "
                 f"{', '.join(map(str, rs))})")
        for mode, x in (("dense", base), (sched, dil)):
            best = fewest_gpus(m, BILLION, x, calib, links, mem, a.host_mem_gib)
            print(format_reach(best, BILLION, mode, a.gpus_per_node))
        return
    if a.gpus % o.sp_size:
        raise SystemExit(f"--gpus {a.gpus} must be a multiple of --sp {o.sp_size}")
    if o.activation_offload and not o.checkpointing:
        raise SystemExit("--offload moves the checkpointed layer inputs: drop --no-checkpointing")
    if o.sp_size % o.ulysses_size:
        raise SystemExit(f"--ulysses-size {o.ulysses_size} must divide the SP size {o.sp_size}")
    print(f"model {a.model}: {m.params() / 1e9:.3f}B params, {m}")
    print(f"options: {o}")
    print(f"GPU memory: {mem:.4g} GiB per GPU ({why})")
    if a.seq_len:
        pl = estimate(m, a.seq_len, o)
        print(format_plan(pl, mem, a.host_mem_gib))
        gpu_ok = pl.peak_bytes <= (mem - o.reserve_gib) * GIB
        host_ok = pl.host_bytes <= a.host_mem_gib * GIB
        print(f"{a.seq_len:,} tokens: GPU {'fits' if gpu_ok else 'DOES NOT FIT'}, host "
              f"{'fits' if host_ok else 'DOES NOT FIT'}")
        print(format_time(step_time(m, a.seq_len, o, calib, links)))
        u, costs = choose_ulysses_size(m.heads, m.kv_heads, m.d, a.seq_len, o.sp_size,
                                       layout=o.layout, dtype_bytes=DTYPE_BYTES[o.dtype],
                                       hw=Hardware(gpus_per_node=a.gpus_per_node))
        print(format_choice(u, costs))
        if a.best:
            print(format_best(*best_layouts(m, a.seq_len, o, calib, links, mem,
                                            a.host_mem_gib, a.top),
                              a.seq_len, a.gpus, nodes))
            return
    best, limit = reach(m, o, mem, a.host_mem_gib)
    print(f"longest sequence that fits {mem:.4g} GiB/GPU (minus {o.reserve_gib:g} GiB "
          f"reserve) and {a.host_mem_gib:g} GiB host/rank: {best:,} tokens, limited by {limit}")
    if best:
        print(format_plan(estimate(m, best, o), mem, a.host_mem_gib))
    if not o.tiled_loss or not o.checkpointing:
        alt = replace(o, tiled_loss=True, checkpointing=True)
        print(f"with checkpointing + tiled loss: {max_seq_len(m, alt, mem):,} tokens")
    if o.checkpointing:
        print(reach_table(m, o, mem, a.host_mem_gib, tuple(a.dilation_rates)))
