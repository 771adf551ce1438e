"""Ring attention kernel benchmark: per-GPU TFLOP/s against one-GPU SDPA and torch context_parallel.

    torchrun --nproc_per_node 2 -m seqpar_ring.bench ring --seq 65536 262144 --out ring.json

Every figure is measured in the same run: SDPA on one GPU with the full sequence (cuDNN and
flash backends), our ring on all GPUs (ring and all-gather comm, each fused kernel, MHA and GQA),
and torch's ``context_parallel`` with each SDPA backend it accepts. A correctness check against
SDPA at a small length runs first, so a fast wrong kernel cannot make the table. Ulysses
(u = world) and Ulysses x ring rows (``--ulysses-sizes``; default every divisor of the world
that divides the heads) come from `seqpar_ring.bench.ring_hybrid`.
"""

from __future__ import annotations

import argparse
import contextlib
import traceback

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from seqpar_ring.groups import shutdown
from seqpar_ring.layout import shard
from seqpar_ring.ring import ring_attention

from . import ring_hybrid
from .common import (SHARED, attention_flops, init_from_env, kernel_ms, peak_gib, print_table,
                     reset_peak, timeit, write_json)

BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}


def _qkv(seq, heads, kv_heads, dim, dev, dtype, grad=True):
    g = torch.Generator(device=dev).manual_seed(0)
    mk = lambda h: torch.randn(1, seq, h, dim, device=dev, dtype=dtype, generator=g)  # noqa: E731
    q, k, v = mk(heads), mk(kv_heads), mk(kv_heads)
    return [t.requires_grad_(grad) for t in (q, k, v)]


def _sdpa_bhsd(q, k, v, causal):
    gqa = q.shape[2] != k.shape[2]
    kw = {"enable_gqa": True} if gqa else {}
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                          v.transpose(1, 2), is_causal=causal, **kw).transpose(1, 2)


def check(group, dev, world, rank, kernels, layout) -> list[dict]:
    """Max error of each fused kernel's ring vs fp32 SDPA on the gathered sequence."""
    rows = []
    for heads, kvh in ((8, 8), (8, 2)):
        q, k, v = _qkv(4096, heads, kvh, 64, dev, torch.bfloat16)
        # dout from a seeded generator: every rank must hold the same full dout, or the K/V
        # gradients (which sum every rank's queries) cannot match the reference
        g = torch.Generator(device=dev).manual_seed(1)
        dout = torch.randn(q.shape, device=dev, dtype=q.dtype, generator=g)
        qf, kf, vf = [t.detach().float().requires_grad_() for t in (q, k, v)]
        ref = _sdpa_bhsd(qf, kf, vf, True)
        ref.backward(dout.float())
        for kern in kernels:
            ql, kl, vl = [shard(t.detach(), world, rank, layout).requires_grad_()
                          for t in (q, k, v)]
            try:
                out = ring_attention(ql, kl, vl, group, causal=True, layout=layout, kernel=kern)
                out.backward(shard(dout, world, rank, layout))
                errs = [(out.float() - shard(ref, world, rank, layout)).abs().max().item()]
                errs += [(a.grad.float() - shard(b.grad, world, rank, layout)).abs().max().item()
                         for a, b in ((ql, qf), (kl, kf), (vl, vf))]
                rows.append(dict(kernel=kern, heads=f"{heads}:{kvh}", out_err=errs[0],
                                 dq_err=errs[1], dk_err=errs[2], dv_err=errs[3]))
            except Exception as e:  # noqa: BLE001 - reported in the table, not hidden
                rows.append(dict(kernel=kern, heads=f"{heads}:{kvh}", error=repr(e)[:200]))
                if rank == 0:
                    traceback.print_exc()
    return rows


def _step(fn_out, dout, backward):
    def run():
        out = fn_out()
        if backward:
            out.backward(dout)
    return run


def bench_seq(args, seq, group, dev, world, rank) -> list[dict]:
    rows = []
    heads, dim, dtype = args.heads, args.head_dim, torch.bfloat16

    def record(what, kind, t, flops, per_gpu_div, **extra):
        tf = flops / per_gpu_div / t / 1e12 if t else None
        rows.append(dict(seq=seq, what=what, kind=kind, ms=t * 1e3, tflops_per_gpu=tf,
                         peak_gib=peak_gib(dev), **extra))
        if rank == 0:
            print(f"  {seq:>8} {what:<28} {kind:<8} {t * 1e3:10.1f} ms  {tf or 0:7.1f} TFLOP/s/GPU "
                  f"peak {peak_gib(dev):6.1f} GiB", flush=True)

    for bwd in (True, False):
        kind = "fwd+bwd" if bwd else "fwd"
        flops = attention_flops(seq, heads, dim, causal=True, backward=bwd)
        # 1) one GPU, whole sequence, each SDPA backend (every rank runs it on its own GPU)
        # (not with ranks sharing a GPU: each would run the whole row on the same GPU at once)
        for kvh in (heads, args.gqa_kv_heads) if not SHARED else ():
            for name, backend in BACKENDS.items():
                reset_peak(dev)
                try:
                    q, k, v = _qkv(seq, heads, kvh, dim, dev, dtype, grad=bwd)
                    dout = torch.randn_like(q)
                    with sdpa_kernel([backend]):
                        t = timeit(_step(lambda: _sdpa_bhsd(q, k, v, True), dout, bwd), dev,
                                   warmup=1, iters=args.iters)
                    record(f"sdpa-1gpu {name} H{heads}:{kvh}", kind, t, flops, 1)
                except Exception as e:  # noqa: BLE001
                    rows.append(dict(seq=seq, what=f"sdpa-1gpu {name} H{heads}:{kvh}", kind=kind,
                                     error=repr(e)[:200]))
                q = k = v = dout = None  # free before the next case
        # 2) our ring on all GPUs
        for kvh in (heads, args.gqa_kv_heads):
            for comm in args.comms:
                for kern in args.kernels:
                    if not bwd and comm != "ring":
                        continue
                    reset_peak(dev)
                    # values do not change the timing: make the local shard directly
                    q, k, v = _qkv(seq // world, heads, kvh, dim, dev, dtype, grad=bwd)
                    dout = torch.randn_like(q)
                    name = f"ring {comm} {kern} H{heads}:{kvh}"
                    try:
                        fn = lambda: ring_attention(q, k, v, group, causal=True,  # noqa: E731
                                                    layout=args.layout, comm=comm, kernel=kern)
                        t = timeit(_step(fn, dout, bwd), dev, warmup=1, iters=args.iters)
                        # sharing a GPU, the wall time holds every rank's kernels and the
                        # staged exchange: also each rank's own kernel time
                        extra = {"kernel_ms": kernel_ms(_step(fn, dout, bwd), dev, group)} \
                            if SHARED else {}
                        record(name, kind, t, flops, world, **extra)
                    except Exception as e:  # noqa: BLE001
                        rows.append(dict(seq=seq, what=name, kind=kind, error=repr(e)[:200]))
                    q = k = v = dout = None  # free before the next case
        # 2b) Ulysses and Ulysses x ring, the same shapes and kernels
        ring_hybrid.bench(args, seq, bwd, flops, dev, world, args.hybrid_sizes, _qkv, _step,
                          record, rows)
        # 3) torch context_parallel, each backend
        if world > 1 and args.torch_cp:
            for name, backend in BACKENDS.items():
                reset_peak(dev)
                try:
                    t = _torch_cp(seq, heads, dim, dtype, dev, world, backend, bwd, args.iters)
                    record(f"torch-cp {name} H{heads}:{heads}", kind, t, flops, world)
                except Exception as e:  # noqa: BLE001
                    rows.append(dict(seq=seq, what=f"torch-cp {name}", kind=kind,
                                     error=repr(e)[:200]))
    return rows


def _torch_cp(seq, heads, dim, dtype, dev, world, backend, bwd, iters):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.experimental import context_parallel

    mesh = init_device_mesh(dev.type, (world,))
    # context_parallel shards its buffers in place on entry (and restores them on exit), which
    # autograd leaves forbid: hand it plain tensors, turn on grad for the local shards inside
    # the context, and skip the restore.
    q, k, v = [t.transpose(1, 2).contiguous()
               for t in _qkv(seq, heads, heads, dim, dev, dtype, grad=False)]
    dout = torch.randn_like(q)
    bufs = [q, k, v, dout]
    with context_parallel(mesh, buffers=bufs, buffer_seq_dims=[2, 2, 2, 2],
                          no_restore_buffers=set(bufs)):
        for t in (q, k, v):
            t.requires_grad_(bwd)

        def run():
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            if bwd:
                out.backward(dout)

        with sdpa_kernel([backend]):
            return timeit(run, dev, warmup=1, iters=iters)


def memory_rows(args, group, dev, world, rank) -> list[dict]:
    """Peak memory of one fwd+bwd at fixed total S: this ring on `world` GPUs vs one GPU alone.

    ``total`` is the peak over what was allocated before (so it includes q, k, v, dout and the
    gradients); ``working`` subtracts those tensors, leaving what attention itself allocates.
    """
    rows = []
    seq, heads, dim = args.memory_seq, args.heads, args.head_dim
    for label, grp, p in (("1 GPU", None, 1), (f"{world} GPUs", group, world)):
        reset_peak(dev)
        base = torch.cuda.memory_allocated(dev) if dev.type == "cuda" else 0
        q, k, v = _qkv(seq // p, heads, heads, dim, dev, torch.bfloat16)
        dout = torch.randn_like(q)
        io_bytes = 2 * sum(t.numel() * t.element_size() for t in (q, k, v)) + dout.numel() * 2
        out = ring_attention(q, k, v, grp, causal=True, layout=args.layout, kernel=args.kernels[0])
        out.backward(dout)
        peak = (torch.cuda.max_memory_allocated(dev) - base) / 2**30 if dev.type == "cuda" else 0
        rows.append(dict(seq=seq, gpus=label, total_gib=peak, working_gib=peak - io_bytes / 2**30))
        q = k = v = out = dout = None
    return rows


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m seqpar_ring.bench ring", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq", type=int, nargs="+", default=[65536, 262144], help="total tokens")
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--gqa-kv-heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--layout", default="zigzag", choices=["contiguous", "zigzag"])
    ap.add_argument("--comms", nargs="+", default=["ring", "allgather"])
    ap.add_argument("--kernels", nargs="+", default=["cudnn", "flash"])
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--memory-seq", type=int, default=131072)
    ap.add_argument("--no-torch-cp", dest="torch_cp", action="store_false")
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--out", default="bench_ring.json")
    ap.add_argument("--ulysses-sizes", type=int, nargs="*", default=None,
                    help="Ulysses factors u > 1 to add as rows (u = world: pure Ulysses); "
                    "default: every divisor of the world that divides --heads; none: no rows")
    return ap


def main(argv=None):
    args = build_parser().parse_args(argv)
    rank, world, dev = init_from_env()
    args.hybrid_sizes = ring_hybrid.sizes(args.ulysses_sizes, world, args.heads)
    if SHARED:  # torch's context_parallel runs on NCCL only: not on ranks sharing a GPU
        args.torch_cp = False
    group = dist.group.WORLD if world > 1 else None
    result: dict = {"args": vars(args)}
    if not args.skip_check:
        result["check"] = check(group, dev, world, rank, args.kernels, args.layout)
        result["check"] += ring_hybrid.check(args, dev, world, rank, args.hybrid_sizes, _qkv,
                                             _sdpa_bhsd)
        if rank == 0:
            cols = ["kernel", "heads", "out_err", "dq_err", "dk_err", "dv_err", "error"]
            print_table(result["check"], cols, "correctness vs fp32 SDPA, S=4096, bf16")
    result["rows"] = []
    for seq in args.seq:
        result["rows"] += bench_seq(args, seq, group, dev, world, rank)
    with contextlib.suppress(Exception):
        result["memory"] = memory_rows(args, group, dev, world, rank)
    if rank == 0:
        print_table(result["rows"], ["seq", "what", "kind", "ms", "tflops_per_gpu", "peak_gib",
                                     *(["kernel_ms"] if SHARED else []), "error"],
                    "ring attention benchmark (per-GPU TFLOP/s)")
        if "memory" in result:
            print_table(result["memory"], ["seq", "gpus", "total_gib", "working_gib"],
                        "peak memory per GPU, causal fwd+bwd, MHA")
        write_json(args.out, result)
    shutdown()  # every rank arrives before any tears the groups down


if __name__ == "__main__":
    main()
