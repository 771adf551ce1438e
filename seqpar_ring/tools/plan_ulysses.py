"""Choosing ``ulysses_size`` ("auto"): a cost model of one attention layer, per GPU.

MODELLED, NOT MEASURED for the hybrid: the constants come from the pure-ring and one-GPU SDPA
figures of README "Measured" (2 x H200, 2026-11-22); no Ulysses or hybrid run on GPUs backs
the rule yet (`python -m seqpar_ring.bench ring` prints those rows; replace the constants
when they exist).

Time of one layer's attention, forward + backward, on each of the p = u x r GPUs, S tokens,
H query / Hkv K/V heads of dimension d, b bytes per element:

* compute = F / (p · peak · e(L)), F = 3.5 · 4·S²·H·d (x 1/2 causal). The local kernel runs
  blocks of L tokens: L = S when r = 1 (one full-length call, Ulysses), S/(2r) for zigzag,
  S/r for contiguous. e(L) = L / (L + L0): short blocks lose efficiency. L0 = 4096 fits the
  measured 64K pair on 2 GPUs: the ring (blocks of 16K) ran 479.2 TFLOP/s per GPU where one GPU
  on the whole 64K ran 559.5; e(16K)/e(64K) = 0.85 ~ 479.2/559.5 = 0.86.
* all-to-all (not overlapped): forward q, k, v, out and backward dout, dq, dk, dv each move
  (u-1)/u of S/p tokens x (2H + 2Hkv') heads, Hkv' = lcm(Hkv, u) (K/V replicated when u does
  not divide Hkv), at the all-to-all bandwidth of the group: intra-node when u <= GPUs per node.
* ring exposure: a hop carries K/V (forward), K/V + fp32 dK/dV (backward) of S/r tokens x
  Hkv'/u heads; it hides under the step's compute (compute / r) and shows only beyond it.

Rule: candidates are the u that divide sp_size and the head count, fit in one node (the
all-to-all stays on NVLink; the ring takes the slow links), and for dilated attention leave a
multiple of lcm(rates) heads per rank. Starting from u = 1 (the pure ring: no head limit, no
un-overlapped traffic), a larger u replaces the current choice only when modelled at least
``margin`` (6%) faster. The margin is the model's error at the one long point measured: at
256K on 2 GPUs the model puts the ring 4% behind Ulysses, yet the ring kernel measured 536.3
TFLOP/s per GPU against 528.8 for one GPU on the full length (1.4% ahead). So: short contexts
and many GPUs pick Ulysses or a hybrid (e.g. llama-1.1b, 2 GPUs: u = 2 at 64K, u = 1 from
256K; 8 GPUs of a node at 64K: u = 8 for 32 heads), long contexts keep the ring.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Any

from seqpar_ring.config import AUTO, SeqParConfig

__all__ = ["Hardware", "ulysses_cost", "ulysses_candidates", "choose_ulysses_size",
           "resolve_ulysses_size", "format_choice"]


@dataclass(frozen=True)
class Hardware:
    """Constants of the cost model (H200 NVLink node; see the module doc for their origin)."""

    attn_tflops: float = 560.0     # fused attention at long blocks, TFLOP/s per GPU (measured)
    half_block: int = 4096         # L0 of e(L) = L / (L + L0) (fit to the measured 64K pair)
    intra_gbps: float = 300.0      # per-GPU all-to-all / P2P bandwidth inside a node (modelled)
    inter_gbps: float = 50.0       # per-GPU bandwidth across nodes, 400 Gb/s NIC (modelled)
    gpus_per_node: int = 8
    margin: float = 0.06           # a larger u must be modelled this much faster


def ulysses_cost(heads: int, kv_heads: int, head_dim: int, seq_len: int, sp_size: int, u: int,
                 *, causal: bool = True, layout: str = "zigzag", dtype_bytes: int = 2,
                 hw: Hardware = Hardware()) -> dict[str, float]:
    """Modelled seconds of one layer's attention fwd+bwd per GPU: compute, a2a, ring, total."""
    r = sp_size // u
    s, d, b = float(seq_len), head_dim, dtype_bytes
    flops = 3.5 * 4.0 * s * s * heads * d * (0.5 if causal else 1.0)
    block = s if r == 1 else s / (2 * r if layout == "zigzag" else r)
    eff = block / (block + hw.half_block)
    compute = flops / (sp_size * hw.attn_tflops * 1e12 * eff)
    hkv = math.lcm(kv_heads, u)
    a2a_bytes = 2 * (s / sp_size) * d * b * (2 * heads + 2 * hkv) * (u - 1) / u
    a2a_bw = hw.intra_gbps if u <= hw.gpus_per_node else hw.inter_gbps
    a2a = a2a_bytes / (a2a_bw * 1e9)
    ring = 0.0
    if r > 1:
        hop = 2 * (s / r) * (hkv / u) * d * (2 * b + 4)
        ring_bw = hw.intra_gbps if sp_size <= hw.gpus_per_node else hw.inter_gbps
        ring = r * max(0.0, hop / (ring_bw * 1e9) - compute / r)
    return {"compute_s": compute, "a2a_s": a2a, "ring_s": ring, "total_s": compute + a2a + ring}


def ulysses_candidates(heads: int, sp_size: int, *, gpus_per_node: int,
                       dilation_rates: tuple[int, ...] = ()) -> list[int]:
    """The u the rule considers (ascending; always contains 1)."""
    need = math.lcm(*dilation_rates) if dilation_rates else 1
    return [u for u in range(1, sp_size + 1)
            if sp_size % u == 0 and heads % u == 0 and (u == 1 or u <= gpus_per_node)
            and (heads // u) % need == 0]


def choose_ulysses_size(heads: int, kv_heads: int, head_dim: int, seq_len: int, sp_size: int,
                        *, causal: bool = True, layout: str = "zigzag", dtype_bytes: int = 2,
                        dilation_rates: tuple[int, ...] = (), hw: Hardware = Hardware()
                        ) -> tuple[int, dict[int, dict[str, float]]]:
    """(chosen u, modelled costs of every candidate) by the rule of the module doc."""
    costs = {u: ulysses_cost(heads, kv_heads, head_dim, seq_len, sp_size, u, causal=causal,
                             layout=layout, dtype_bytes=dtype_bytes, hw=hw)
             for u in ulysses_candidates(heads, sp_size, gpus_per_node=hw.gpus_per_node,
                                         dilation_rates=dilation_rates)}
    best = 1
    for u in sorted(costs):
        if costs[u]["total_s"] < costs[best]["total_s"] * (1.0 - hw.margin):
            best = u
    return best, costs


def _model_shape(model: Any) -> tuple[int, int, int]:
    cfg = getattr(model, "config", model)
    cfg = getattr(cfg, "text_config", None) or cfg
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return int(heads), int(kv), int(d)


def _gpus_per_node(sp_size: int) -> int:
    local = os.environ.get("LOCAL_WORLD_SIZE", "")
    if local.isdigit() and int(local) > 0:
        return int(local)
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else sp_size


def resolve_ulysses_size(config: SeqParConfig, model: Any = None, seq_len: int | None = None,
                         *, heads: int | None = None, kv_heads: int | None = None,
                         head_dim: int | None = None, gpus_per_node: int | None = None,
                         dtype_bytes: int = 2) -> SeqParConfig:
    """``config`` with ``ulysses_size="auto"`` replaced by `choose_ulysses_size`'s choice.

    Head counts come from ``model`` (an HF model or its config: num_attention_heads,
    num_key_value_heads, head_dim) or the keywords; ``seq_len`` is the total tokens per
    sample the run trains on. GPUs per node: ``gpus_per_node``, else ``LOCAL_WORLD_SIZE``,
    else the visible CUDA devices. Every rank computes the same value. A config whose
    ulysses_size is already a number is returned unchanged.
    """
    if config.ulysses_size != AUTO:
        return config
    if seq_len is None:
        raise ValueError("ulysses_size='auto' needs the sequence length it plans for: pass "
                         "seq_len (total tokens per sample), or set ulysses_size to a number")
    if heads is None:
        if model is None:
            raise ValueError("ulysses_size='auto' needs the model (or heads=, kv_heads=, "
                             "head_dim=) to know its head counts")
        heads, kv_heads, head_dim = _model_shape(model)
    kv_heads = kv_heads or heads
    head_dim = head_dim or 128
    hw = Hardware(gpus_per_node=gpus_per_node or _gpus_per_node(config.sp_size))
    rates = tuple(config.dilation_rates or ()) if config.attention == "dilated" else ()
    u, _ = choose_ulysses_size(heads, kv_heads, head_dim, seq_len, config.sp_size,
                               layout=config.layout, dtype_bytes=dtype_bytes,
                               dilation_rates=rates, hw=hw)
    return dataclasses.replace(config, ulysses_size=u)


def format_choice(u: int, costs: dict[int, dict[str, float]]) -> str:
    """The modelled table behind a choice, one line per candidate (milliseconds)."""
    rows = ["ulysses_size auto (modelled, not measured): per layer attention fwd+bwd per GPU",
            f"{'u':>4} {'compute ms':>11} {'a2a ms':>8} {'ring ms':>8} {'total ms':>9}"]
    for c, t in sorted(costs.items()):
        rows.append(f"{c:>4} {t['compute_s'] * 1e3:>11.2f} {t['a2a_s'] * 1e3:>8.2f} "
                    f"{t['ring_s'] * 1e3:>8.2f} {t['total_s'] * 1e3:>9.2f}"
                    + ("  <- chosen" if c == u else ""))
    return "\n".join(rows)
