"""``python -m seqpar_ring.plan --calibrate``: measure this machine once for the step-time model.

What it times (median of a few runs after a warm-up), on CUDA device 0 when there is one, else
on the CPU (fp32; the CPU figures make a valid file, used by the tests):

* matmul: an n x n x n GEMM in the run's dtype (n = 8192 on a GPU);
* attention: this package's ``ring_attention`` on one rank (the kernel ``auto`` picks: cuDNN on
  H100/H200 in bf16), causal forward+backward, 32 heads, head dim 64 and 128, at several
  lengths (4K..256K on a GPU) — the table the model interpolates;
* dilated: ``dilated_attention`` at the longest length (w = 2048·4^i, r = 2^i, the last segment
  the whole row) against dense at that length: the efficiency factor;
* device copy (bytes read + written per second) and the host link (pinned host memory to
  device and back; the slower direction);
* with two or more GPUs: peer copies from device 0 to 1 at 64 MiB and 1 GiB (a latency and a
  bandwidth), and every device sending to every other at once (all-to-all, per GPU). These
  are copy-engine transfers, not NCCL collectives (the ring and ZeRO use NCCL).

Values it cannot measure in one process (the ring's per-hop cost, ZeRO-3's per-layer cost, CPU
Adam) are kept from the shipped H200 calibration and say so in ``sources``.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import replace

import torch

from .plan_calib import Calibration, load_calibration

FULL = dict(matmul=8192, lengths=(4096, 16384, 65536, 262144), heads=32, copy_mib=1024,
            p2p_mib=(64, 1024))
QUICK = dict(matmul=128, lengths=(64, 256), heads=2, copy_mib=4, p2p_mib=(1, 8))


def _median_s(fn, dev: torch.device, iters: int = 3) -> float:
    fn()
    times = []
    for _ in range(iters):
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        fn()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_matmul(dev, dtype, n: int) -> float:
    a, b = (torch.randn(n, n, device=dev, dtype=dtype) for _ in range(2))
    return 2 * n**3 / _median_s(lambda: a @ b, dev) / 1e12


def schedule(seq: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The measured runs' dilated schedule: w = base·4^i, r = 2^i (r <= 16), then the row.

    base = 2048 from 32K tokens up; shorter (quick) rows use base = seq / 16.
    """
    base = 2048 if seq >= 32768 else max(1, seq // 16)
    segs, rates = [], []
    while base * 4 ** len(segs) < seq and len(segs) < 4:
        segs.append(base * 4 ** len(segs))
        rates.append(2 ** len(rates))
    return tuple(segs) + (seq,), tuple(rates) + (2 ** len(rates),)


def _attention_s(dev, dtype, seq: int, heads: int, d: int, dilated: bool = False,
                 iters: int = 2) -> float:
    from seqpar_ring import dilated_attention, ring_attention

    q, k, v = (torch.randn(1, seq, heads, d, device=dev, dtype=dtype, requires_grad=True)
               for _ in range(3))
    segs, rates = schedule(seq)

    def step():
        if dilated:
            out = dilated_attention(q, k, v, None, segment_lengths=segs, dilation_rates=rates)
        else:
            out = ring_attention(q, k, v, None, causal=True)
        out.sum().backward()
    return _median_s(step, dev, iters=iters)


def measure_attention(dev, dtype, lengths, heads: int, iters: int = 2
                      ) -> dict[int, dict[int, float]]:
    table: dict[int, dict[int, float]] = {}
    for d in (64, 128):
        for n in lengths:
            s = _attention_s(dev, dtype, n, heads, d, iters=iters)
            table.setdefault(d, {})[n] = 3.5 * 4 * d * heads * n * (n + 1) / 2 / s / 1e12
    return table


def measure_dilated(dev, dtype, seq: int, heads: int, iters: int = 2) -> float:
    """Useful-FLOP efficiency of dilated attention relative to dense at ``seq`` (d = 128)."""
    from .plan_model import PlanOptions
    from .plan_time import attention_pairs

    segs, rates = schedule(seq)
    o = PlanOptions(attention="dilated", dilation_rates=rates, segment_lengths=segs)
    ratio = seq * (seq + 1) / 2 / attention_pairs(seq, o)
    dense = _attention_s(dev, dtype, seq, heads, 128, iters=iters)
    dil = _attention_s(dev, dtype, seq, heads, 128, dilated=True, iters=iters)
    return dense / dil / ratio


def measure_copy(dev, mib: int) -> float:
    x = torch.empty(mib * 2**20 // 4, device=dev)
    y = torch.empty_like(x)
    return 2 * x.numel() * 4 / _median_s(lambda: y.copy_(x), dev) / 1e12


def measure_host(dev, mib: int) -> float:
    n = mib * 2**20 // 4
    pin = dev.type == "cuda"
    host = torch.empty(n, pin_memory=pin)
    x = torch.empty(n, device=dev)
    h2d = _median_s(lambda: x.copy_(host, non_blocking=pin), dev)
    d2h = _median_s(lambda: host.copy_(x, non_blocking=pin), dev)
    return n * 4 / max(h2d, d2h) / 1e9


def measure_peers(mibs) -> tuple[float, float, float]:
    """(p2p GB/s, p2p latency s, all-to-all GB/s per GPU) between CUDA devices."""
    d0, d1 = torch.device("cuda", 0), torch.device("cuda", 1)
    secs = []
    for mib in mibs:
        x = torch.empty(mib * 2**20, dtype=torch.uint8, device=d0)
        y = torch.empty_like(x, device=d1)

        def copy():
            y.copy_(x)
            torch.cuda.synchronize(d1)  # the copy may run on either device's stream
        secs.append(_median_s(copy, d0))
    (n0, s0), (n1, s1) = [(mib * 2**20, s) for mib, s in zip(mibs, secs)]
    gbps = (n1 - n0) / max(s1 - s0, 1e-9) / 1e9
    latency = max(0.0, s0 - n0 / (gbps * 1e9))
    g = torch.cuda.device_count()
    n = mibs[-1] * 2**20 // g
    bufs = [torch.empty(n * g, dtype=torch.uint8, device=torch.device("cuda", i))
            for i in range(g)]
    outs = [torch.empty_like(b) for b in bufs]

    def a2a():
        for i in range(g):
            for j in range(g):
                if i != j:
                    outs[j][i * n:(i + 1) * n].copy_(bufs[i][j * n:(j + 1) * n],
                                                     non_blocking=True)
        for i in range(g):
            torch.cuda.synchronize(torch.device("cuda", i))
    s = _median_s(a2a, d0)
    return gbps, latency, n * (g - 1) / s / 1e9


def calibrate(quick: bool = False, log=print) -> Calibration:
    """Measure this machine; keep what cannot be measured here from the shipped defaults."""
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda", 0) if cuda else torch.device("cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    size = QUICK if quick or not cuda else FULL
    name = torch.cuda.get_device_name(dev) if cuda else "CPU"
    day = time.strftime("%Y-%m-%d")
    where = f"measured by `plan --calibrate` on {name} ({dtype}), {day}"
    base = load_calibration()
    src = {k: f"kept from the shipped H200 calibration, not measured here ({v})"
           for k, v in base.sources.items()}
    log(f"calibrating on {name} ({dtype}) ...")
    mm = measure_matmul(dev, dtype, size["matmul"])
    log(f"  matmul {size['matmul']}^3: {mm:.4g} TFLOP/s")
    iters = 1 if quick else 2
    attn = measure_attention(dev, dtype, size["lengths"], size["heads"], iters)
    for d, curve in attn.items():
        log(f"  attention d = {d}: " + ", ".join(f"{n:,}: {v:.4g}" for n, v in curve.items()))
    eff = measure_dilated(dev, dtype, size["lengths"][-1], size["heads"], iters)
    log(f"  dilated / dense efficiency: {eff:.2f}")
    copy = measure_copy(dev, size["copy_mib"])
    host = measure_host(dev, size["copy_mib"])
    log(f"  device copy {copy:.4g} TB/s; host link {host:.4g} GB/s")
    for key in ("matmul_tflops", "attention_tflops/64", "attention_tflops/128",
                "dilated_efficiency", "copy_tbps", "host_gbps"):
        src[key] = where
    c = replace(base, device=f"{name} ({where})", matmul_tflops=mm, attention_tflops=attn,
                dilated_efficiency=eff, copy_tbps=copy, host_gbps=host, sources=src)
    if cuda and torch.cuda.device_count() >= 2:
        gbps, lat, a2a = measure_peers(size["p2p_mib"])
        log(f"  peer copy {gbps:.0f} GB/s + {lat * 1e6:.0f} us; all-to-all {a2a:.0f} GB/s/GPU")
        for key in ("p2p_gbps", "p2p_latency_s", "alltoall_gbps"):
            src[key] = where + " (copy engine between devices, not NCCL)"
        c = replace(c, p2p_gbps=gbps, p2p_latency_s=lat, alltoall_gbps=a2a)
    return c
