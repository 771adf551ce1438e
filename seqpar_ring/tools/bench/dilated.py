"""Dilated (LongNet) attention benchmark: time vs dense ring (zigzag) and vs the FLOP ratio.

    torchrun --nproc_per_node 2 -m seqpar_ring.bench dilated --seq 1048576 --out dilated.json

FLOPs of a branch (w' = min(w, S), rate r), per head: S/w' segments of w'/r selected rows, so
S·w'/r² score pairs (half when causal); the dense FLOPs divided by the sum over branches is the
FLOP ratio the speed-up is compared with. Also: peak memory of the torch kernel against
bucket size (CPU or GPU), the working-memory claim of the bucketed kernel.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist

from seqpar_ring.dilated import dilated_attention
from seqpar_ring.groups import shutdown
from seqpar_ring.ring import ring_attention
from .common import (attention_flops, init_from_env, peak_gib, print_table, reset_peak, timeit,
                     write_json)


def flop_ratio(seq: int, segment_lengths, dilation_rates) -> float:
    dilated = sum(min(w, seq) / r**2 for w, r in zip(segment_lengths, dilation_rates))
    return seq / dilated


def _local(seq, world, heads, kvh, dim, dev, dtype):
    n = seq // world
    return [torch.randn(1, n, h, dim, device=dev, dtype=dtype).requires_grad_()
            for h in (heads, kvh, kvh)]


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m seqpar_ring.bench dilated", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq", type=int, nargs="+", default=[1048576])
    ap.add_argument("--segment-lengths", type=int, nargs="+",
                    default=[2048, 8192, 32768, 131072, 1048576])
    ap.add_argument("--dilation-rates", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=32)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--kernel", default="auto")
    ap.add_argument("--iters", type=int, default=3, help="timed runs of dilated (median)")
    ap.add_argument("--dense-iters", type=int, default=1,
                    help="timed runs of the dense reference (each ~30 s at 1M on 2 H200)")
    ap.add_argument("--dense-max-seq", type=int, default=1048576,
                    help="skip dense ring above this length (it may not fit)")
    ap.add_argument("--bucket-seq", type=int, default=8192,
                    help="length for the torch-kernel memory-vs-bucket-size sweep (0: skip)")
    ap.add_argument("--buckets", type=int, nargs="+", default=[256, 1024, 4096, 0])
    ap.add_argument("--profile", action="store_true",
                    help="print the top GPU kernels of one dilated fwd+bwd (torch.profiler)")
    ap.add_argument("--out", default="bench_dilated.json")
    args = ap.parse_args(argv)
    rank, world, dev = init_from_env()
    group = dist.group.WORLD if world > 1 else None
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    result = {"args": vars(args)}
    result["check"] = check(group, dev, world, rank, args.kernel)
    if rank == 0:
        print_table(result["check"], ["kernel", "schedule", "out_err", "dq_err", "dk_err",
                                      "dv_err"], "dilated on this device vs the fp32 torch kernel")
    rows = []
    for seq in args.seq:
        ratio = flop_ratio(seq, args.segment_lengths, args.dilation_rates)
        dense_flops = attention_flops(seq, args.heads, args.head_dim, causal=True, backward=True)
        times = {}
        for mode in ("dilated", "dense"):
            if mode == "dense" and seq > args.dense_max_seq:
                continue
            reset_peak(dev)
            q, k, v = _local(seq, world, args.heads, args.kv_heads, args.head_dim, dev, dtype)
            dout = torch.randn_like(q)
            if mode == "dense":
                fn = lambda: ring_attention(q, k, v, group, causal=True,  # noqa: E731
                                            layout="zigzag", kernel=args.kernel)
            else:
                fn = lambda: dilated_attention(  # noqa: E731
                    q, k, v, group, causal=True, kernel=args.kernel,
                    segment_lengths=args.segment_lengths, dilation_rates=args.dilation_rates)
            iters = args.dense_iters if mode == "dense" else args.iters
            t = timeit(lambda: fn().backward(dout), dev, warmup=1, iters=iters)
            times[mode] = t
            if args.profile and mode == "dilated":  # every rank steps; rank 0 prints
                _profile(lambda: fn().backward(dout), rank == 0)
            flops = dense_flops / (ratio if mode == "dilated" else 1.0)
            rows.append(dict(seq=seq, mode=mode, ms=t * 1e3, peak_gib=peak_gib(dev),
                             tflops_per_gpu=flops / world / t / 1e12))
            if rank == 0:
                print(f"{seq:>9} {mode:<8} {t * 1e3:10.1f} ms peak {peak_gib(dev):.1f} GiB",
                      flush=True)
            q = k = v = dout = None
        if "dense" in times:
            speedup = times["dense"] / times["dilated"]
            rows.append(dict(seq=seq, mode="speed-up", ms=speedup, flop_ratio=ratio,
                             of_flop_ratio=speedup / ratio))
    result["rows"] = rows
    if args.bucket_seq:  # every rank runs it (timing barriers), rank 0 reports
        result["buckets"] = bucket_memory(args, dev)
    if rank == 0:
        print_table(rows, ["seq", "mode", "ms", "peak_gib", "tflops_per_gpu", "flop_ratio",
                           "of_flop_ratio"], "dilated vs dense ring, causal fwd+bwd "
                                             "(speed-up row: ms column = dense/dilated)")
        if "buckets" in result:
            print_table(result["buckets"], ["seq", "bucket_size", "peak_mib", "ms"],
                        "torch kernel: peak memory vs bucket size (one GPU/CPU, fwd+bwd)")
        write_json(args.out, result)
    shutdown()  # every rank arrives before any tears the groups down


def check(group, dev, world, rank, kernel) -> list[dict]:
    """Max error of the benchmarked kernel's dilated attention vs the torch kernel in fp32, on
    the same sharded inputs — segmented, sub-ring and whole-ring branches at S = 8192."""
    rows = []
    seq, n = 8192, 8192 // world
    schedule = ([512, 2048, 8192], [1, 2, 4])
    g = torch.Generator(device=dev).manual_seed(world)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    q, k, v, dout = [torch.randn(1, n, h, 64, device=dev, dtype=dtype, generator=g)
                     for h in (8, 2, 2, 8)]
    outs = {}
    for name, kern, dt in (("run", kernel, dtype), ("ref", "torch", torch.float32)):
        leaves = [t.detach().to(dt).requires_grad_() for t in (q, k, v)]
        out = dilated_attention(*leaves, group, causal=True, kernel=kern,
                                segment_lengths=schedule[0], dilation_rates=schedule[1])
        out.backward(dout.to(dt))
        outs[name] = [out.float()] + [t.grad.float() for t in leaves]
    errs = [(a - b).abs().max().item() for a, b in zip(outs["run"], outs["ref"])]
    rows.append(dict(kernel=kernel, schedule=f"{schedule[0]}/{schedule[1]} S={seq}",
                     out_err=errs[0], dq_err=errs[1], dk_err=errs[2], dv_err=errs[3]))
    return rows


def _profile(step, show: bool) -> None:
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=acts) as prof:
        step()
    if not show:
        return
    table = prof.key_averages()
    for key in ("self_device_time_total", "self_cuda_time_total", "self_cpu_time_total"):
        try:
            print(table.table(sort_by=key, row_limit=20, max_name_column_width=60))
            return
        except (AttributeError, KeyError, ValueError):
            continue


def bucket_memory(args, dev) -> list[dict]:
    rows = []
    seq, dim = args.bucket_seq, args.head_dim
    for bucket in args.buckets:
        reset_peak(dev)
        base = torch.cuda.memory_allocated(dev) if dev.type == "cuda" else 0
        q, k, v = _local(seq, 1, 8, 8, dim, dev, torch.float32)
        fn = lambda: dilated_attention(  # noqa: E731
            q, k, v, None, causal=True, kernel="torch", bucket_size=bucket or None,
            segment_lengths=[seq], dilation_rates=[1])
        t = timeit(lambda: fn().backward(torch.ones_like(q)), dev, warmup=0, iters=1)
        peak = (torch.cuda.max_memory_allocated(dev) - base) / 2**20 if dev.type == "cuda" else None
        rows.append(dict(seq=seq, bucket_size=bucket or "whole", peak_mib=peak, ms=t * 1e3))
        q = k = v = None
    return rows


if __name__ == "__main__":
    main()
