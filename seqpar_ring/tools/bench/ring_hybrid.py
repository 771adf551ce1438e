"""Ulysses (u = world) and Ulysses x ring (1 < u < world) rows of ``bench ring``, attention only.

Called from `seqpar_ring.bench.ring`; each row runs `seqpar_ring.ulysses.ulysses_ring_attention`
on the grid built by ``seqpar_ring.groups.initialize(world, ulysses_size=u)`` (rebuilt per u),
with the same shapes, kernels and FLOP count as the ring rows, so a row compares directly.
"""

from __future__ import annotations

import traceback

import torch

from seqpar_ring import groups as G
from seqpar_ring.layout import shard
from seqpar_ring.ulysses import ulysses_ring_attention
from .common import reset_peak, timeit


def sizes(requested: list[int] | None, world: int, heads: int) -> list[int]:
    """The u > 1 to run: ``requested``, or every divisor of the world that divides heads."""
    if requested is not None:
        bad = [u for u in requested if u < 1 or world % u]
        if bad:
            raise SystemExit(f"--ulysses-sizes {bad}: each must divide the world size {world}")
        return [u for u in requested if u > 1]
    return [u for u in range(2, world + 1) if world % u == 0 and heads % u == 0]


def _label(u: int, world: int) -> str:
    return f"ulysses u={u}" if u == world else f"hybrid u={u}xr={world // u}"


def _grid(u: int, world: int):
    G.destroy()
    return G.initialize(world, ulysses_size=u)


def check(args, dev, world: int, rank: int, us: list[int], qkv, sdpa) -> list[dict]:
    """Max error of each hybrid vs fp32 SDPA on the full sequence (S = 4096, bf16)."""
    rows = []
    for u in us:
        groups = _grid(u, world)
        for heads, kvh in ((8, 8), (8, 2)):
            q, k, v = qkv(4096, heads, kvh, 64, dev, torch.bfloat16)
            g = torch.Generator(device=dev).manual_seed(1)
            dout = torch.randn(q.shape, device=dev, dtype=q.dtype, generator=g)
            qf, kf, vf = [t.detach().float().requires_grad_() for t in (q, k, v)]
            ref = sdpa(qf, kf, vf, True)
            ref.backward(dout.float())

            def sh(t):
                return shard(t, world, groups.sp_rank, args.layout, ulysses_size=u)

            for kern in args.kernels:
                name = dict(kernel=f"{_label(u, world)} {kern}", heads=f"{heads}:{kvh}")
                ql, kl, vl = [sh(t.detach()).requires_grad_() for t in (q, k, v)]
                try:
                    out = ulysses_ring_attention(ql, kl, vl, groups, causal=True,
                                                 layout=args.layout, kernel=kern)
                    out.backward(sh(dout))
                    errs = [(out.float() - sh(ref)).abs().max().item()]
                    errs += [(a.grad.float() - sh(b.grad)).abs().max().item()
                             for a, b in ((ql, qf), (kl, kf), (vl, vf))]
                    rows.append(dict(name, out_err=errs[0], dq_err=errs[1], dk_err=errs[2],
                                     dv_err=errs[3]))
                except Exception as e:  # noqa: BLE001 - reported in the table, not hidden
                    rows.append(dict(name, error=repr(e)[:200]))
                    if rank == 0:
                        traceback.print_exc()
    G.destroy()
    return rows


def bench(args, seq: int, bwd: bool, flops: float, dev, world: int, us: list[int], qkv, step,
          record, rows: list[dict]) -> None:
    """Time every u in ``us`` (ring comm, each kernel, MHA and GQA); rows through ``record``."""
    kind = "fwd+bwd" if bwd else "fwd"
    for u in us:
        groups = _grid(u, world)
        for kvh in (args.heads, args.gqa_kv_heads):
            for kern in args.kernels:
                reset_peak(dev)
                name = f"{_label(u, world)} {kern} H{args.heads}:{kvh}"
                q, k, v = qkv(seq // world, args.heads, kvh, args.head_dim, dev, torch.bfloat16,
                              grad=bwd)
                dout = torch.randn_like(q)
                try:
                    def fn():
                        return ulysses_ring_attention(q, k, v, groups, causal=True,
                                                      layout=args.layout, kernel=kern)

                    t = timeit(step(fn, dout, bwd), dev, warmup=1, iters=args.iters)
                    record(name, kind, t, flops, world)
                except Exception as e:  # noqa: BLE001
                    rows.append(dict(seq=seq, what=name, kind=kind, error=repr(e)[:200]))
                q = k = v = dout = None  # free before the next case
    G.destroy()
