"""Step-time model: seconds of one training step per GPU, term by term, and tokens/s.

The same code path as the memory model (`plan_memory`): HF Llama-architecture decoder,
DeepSpeed ZeRO, gradient checkpointing per decoder layer, tiled loss, ring / dilated /
windowed / packed-document attention, optionally Ulysses x ring, activation offload, tiled
MLP. Every throughput comes from a `Calibration` (measured figures; see `plan_calib`), every
link from `Links`. Per decoder layer, on each GPU (t = micro_batch * S / sp tokens):

* matmuls: 2 x (projection + MLP parameters) FLOPs per token forward; forward, the
  checkpoint's recompute and a backward of twice the forward (the tiled MLP recomputes its
  gate and up projections once more), at ``matmul_tflops``;
* elementwise (norms, RoPE, SiLU x up, residuals, layout copies): (64·h + 5·I) elements per
  token forward, counted from the HF Llama layer (an estimate), same passes, at ``copy_tbps``;
* attention: useful forward FLOPs 4·d·H·pairs / sp, where pairs counts the (query, key)
  pairs one head attends over the sequence — dense causal S(S+1)/2, window W: each query
  sees min(i + 1, W) keys, packed documents of L: each its causal square, dilated: per branch
  S/w segments of (w/r)(w/r + 1)/2 — at the calibrated TFLOP/s of a call of L tokens (the
  tokens of one ring rank, the window or the document, whichever is shorter); backward 2.5 x
  forward; forward again under checkpointing;
* ring (r = sp / u > 1 ranks): each hop costs max(its compute, its transfer) plus
  ``ring_hop_s``; a forward hop carries K/V (2·b bytes per element), a backward hop K/V and
  the fp32 dK/dV (2·b + 8); the last dK/dV return cannot overlap. Within a node the hop runs
  at the p2p link, across nodes at the fabric (``Links.inter_gbps``);
* Ulysses all-to-all (u > 1): q, k, v, out forward and their gradients backward, (u-1)/u of
  t x (2H + 2·lcm(Hkv, u)) x d elements, not overlapped;
* activation offload: one layer input out and back over the host link per layer, hidden
  under the layer's compute where it is shorter;

and per step: the loss (LM-head FLOPs forward + recompute + backward, fp32 logits traffic),
ZeRO's parameter all-gathers (forward, recompute, backward) and gradient reduce-scatter over
all GPUs (exposed only where longer than the step's compute), a fitted per-layer ZeRO-3 cost,
the optimizer step (memory-bound on the GPU; ZeRO-Offload: CPU Adam plus host transfers).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .plan_calib import Calibration
from .plan_model import DTYPE_BYTES, ModelSpec, PlanOptions, dilated_schedule


@dataclass(frozen=True)
class Links:
    """Links a step uses (GB/s per GPU per direction); None: the calibration's figure."""

    gpus_per_node: int = 8
    intra_gbps: float | None = None    # NVLink class: p2p and all-to-all inside a node
    inter_gbps: float = 50.0           # across nodes: 400 Gb/s per GPU (e.g. InfiniBand NDR)
    host_gbps: float | None = None     # pinned host memory <-> GPU


@dataclass
class StepTime:
    seq_len: int
    gpus: int
    sp: int
    ulysses: int
    micro_batch: int = 1
    terms: list[tuple[str, float, str]] = field(default_factory=list)  # (name, s, why)
    notes: list[str] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return sum(s for _, s, _ in self.terms)

    @property
    def tokens_per_s(self) -> float:
        """All GPUs: dp = gpus / sp replicas each train micro_batch samples per step."""
        return self.micro_batch * self.seq_len * (self.gpus // self.sp) / self.seconds

    def of(self, name: str) -> float:
        return sum(s for n, s, _ in self.terms if n == name)


def attention_pairs(seq: int, o: PlanOptions) -> float:
    """(query, key) pairs one head attends over the whole sequence (causal) under ``o``."""
    if o.attention == "dilated":
        ws, rs = dilated_schedule(o, seq)
        return sum((seq // w) * (w / r) * (w / r + 1) / 2 for w, r in zip(ws, rs))
    if o.window and o.window < seq:
        w = o.window
        return w * (w + 1) / 2 + (seq - w) * w
    if o.doc_len and o.doc_len < seq:
        n, rest = divmod(seq, o.doc_len)
        return n * o.doc_len * (o.doc_len + 1) / 2 + rest * (rest + 1) / 2
    return seq * (seq + 1) / 2


def _xfer(nbytes: float, gbps: float, latency: float) -> float:
    return latency + nbytes / (gbps * 1e9) if nbytes > 0 else 0.0


def step_time(m: ModelSpec, seq_len: int, o: PlanOptions, c: Calibration,
              links: Links = Links()) -> StepTime:
    """Modelled seconds of one training step per GPU at ``seq_len`` tokens per sample."""
    sp, u, mb = o.sp_size, o.ulysses_size, o.micro_batch
    if seq_len % sp or sp % u or o.gpus % sp:
        raise ValueError(f"seq_len {seq_len}, sp {sp}, ulysses {u}, gpus {o.gpus}: sp must "
                         "divide seq_len and gpus, ulysses_size must divide sp")
    st = StepTime(seq_len, o.gpus, sp, u, mb)
    b, h, inter, L = DTYPE_BYTES[o.dtype], m.hidden, m.intermediate, m.layers
    d, hq, hkv = m.d, m.heads, m.kv_heads
    t = mb * seq_len / sp
    fwd_n = 2 if o.checkpointing else 1            # forward (+ the checkpoint's recompute)
    passes = fwd_n + 2                             # + backward at twice a forward
    mm = c.matmul_tflops * 1e12
    intra = links.intra_gbps or c.p2p_gbps
    a2a_bw = links.intra_gbps or c.alltoall_gbps
    host = links.host_gbps or c.host_gbps

    def add(name, s, why):
        st.terms.append((name, float(s), why))
        return float(s)

    # --- one decoder layer ----------------------------------------------------------------
    proj = h * d * (2 * hq + 2 * hkv)
    mlp = 3 * h * inter
    flops = t * 2 * (proj + mlp) * passes + (t * 2 * 2 * h * inter if o.tiled_mlp else 0)
    matmul = flops / mm
    elementwise = t * (64 * h + 5 * inter) * b * passes / (c.copy_tbps * 1e12)
    r = sp // u
    call = seq_len / r                              # tokens of one ring rank = a kernel call
    if o.window:
        call = min(call, o.window)
    if o.doc_len:
        call = min(call, o.doc_len)
    tput = c.attention(d, call) * 1e12
    if o.attention == "dilated":
        tput *= c.dilated_efficiency
    fwd = 4 * d * hq * attention_pairs(seq_len, o) * mb / sp / tput
    bwd = 2.5 * fwd
    ring_f, ring_b = fwd, bwd
    if r > 1:
        hkv_g = math.lcm(hkv, u) / u               # K/V heads a GPU holds after the all-to-all
        kv = mb * seq_len / r * hkv_g * d         # elements of one rank's K (or V)
        ring_bw = intra if sp <= links.gpus_per_node else links.inter_gbps
        hops, share = _ring_hops(seq_len, o, r)
        f_x = _xfer(sum(2 * b * kv * s for s in share), ring_bw, c.p2p_latency_s)
        b_x = _xfer(sum((2 * b + 8) * kv * s for s in share), ring_bw, c.p2p_latency_s)
        back = _xfer(8 * kv * max(share, default=0), ring_bw, c.p2p_latency_s)
        fc, bc = fwd / (hops + 1), bwd / (hops + 1)
        ring_f = fc + hops * (max(fc, f_x) + c.ring_hop_s)
        ring_b = bc + hops * (max(bc, b_x) + c.ring_hop_s) + back + c.ring_hop_s
        if hops and f_x > fc:
            st.notes.append(f"ring hop transfer-bound: {f_x * 1e3:.2f} ms per forward hop over "
                            f"{ring_bw:g} GB/s against {fc * 1e3:.2f} ms of compute")
    attn = (1 if o.keep_attention else fwd_n) * ring_f + ring_b  # kept: no recomputed forward
    a2a = 0.0
    if u > 1:
        elems = t * (2 * hq + 2 * math.lcm(hkv, u)) * d * (u - 1) / u
        bw = a2a_bw if u <= links.gpus_per_node else links.inter_gbps
        a2a = (fwd_n + 1) * (_xfer(elems * b, bw, c.p2p_latency_s))
    layer_compute = matmul + elementwise + attn
    offload = 0.0
    if o.activation_offload:
        one = t * h * b / (host * 1e9)            # one layer input, each way
        offload = max(0.0, one - layer_compute / passes) * 2
        if offload:
            st.notes.append(f"offload exposed: {one * 1e3:.1f} ms per layer input over "
                            f"{host:g} GB/s")
    mode = ("dilated" if o.attention == "dilated" else f"window {o.window}" if o.window else
            f"documents of {o.doc_len}" if o.doc_len else "dense causal")
    add("matmuls", L * matmul, f"projections + MLP, {passes} passes at {c.matmul_tflops:g} "
        "TFLOP/s" + (" (+ tiled-MLP recompute)" if o.tiled_mlp else ""))
    add("elementwise", L * elementwise, f"norms, RoPE, SiLU, residuals at {c.copy_tbps:g} TB/s")
    add("attention", L * attn, f"{mode}, calls of {call:,.0f} tokens at "
        f"{tput / 1e12:.0f} TFLOP/s" + (f", ring of {r} (hops {fwd_n}x fwd + bwd)"
                                          if r > 1 else "")
        + (", kept across the recomputation" if o.keep_attention else ""))
    if u > 1:
        add("all-to-all", L * a2a, f"Ulysses u = {u}: q, k, v, out and gradients")
    if o.activation_offload:
        add("offload", L * offload, f"layer inputs over the host link ({host:g} GB/s), "
            "overlapped with each layer's compute")
    compute = st.seconds
    _step_terms(st, m, o, c, links, t, compute, add)
    return st


def _ring_hops(seq: int, o: PlanOptions, r: int) -> tuple[int, list[float]]:
    """(hops of the longest ring pass, K/V share each hop carries relative to dense)."""
    if o.attention == "dilated":
        ws, rs = dilated_schedule(o, seq)
        per = seq / r
        spans = [(min(r, math.ceil(w / per)), rate) for w, rate in zip(ws, rs)]
        hops = max((n - 1 for n, _ in spans), default=0)
        return hops, [1.0 / rate for n, rate in spans if n > 1]
    hops = r - 1
    if o.window:
        hops = min(hops, math.ceil(o.window / (seq / r)))
    return hops, [1.0]


def _step_terms(st, m, o, c, links, t, compute, add) -> None:
    """Loss, ZeRO collectives and overhead, optimizer step (per step, per GPU)."""
    b, n, world = DTYPE_BYTES[o.dtype], m.params(), o.gpus
    head = t * 2 * m.hidden * m.vocab * (4 if o.tiled_loss else 3) / (c.matmul_tflops * 1e12)
    head += t * m.vocab * (2 * b + 12) * 2 / (c.copy_tbps * 1e12)
    add("loss", head, "LM head " + ("(tiled: forward, recompute, backward)" if o.tiled_loss
                                    else "(full logits)") + " and fp32 logits traffic")
    if world > 1:
        bw = (links.intra_gbps or c.p2p_gbps) if world <= links.gpus_per_node else \
            links.inter_gbps
        share = n * b * (world - 1) / world
        gathers = (2 if o.checkpointing else 1) + 1 if o.zero >= 3 else 0
        grads = 1 if o.zero >= 2 else 2            # reduce-scatter, or all-reduce
        comm = (gathers + grads) * share / (bw * 1e9)
        red = "reduce-scatter" if grads == 1 else "all-reduce"
        add("ZeRO collectives", max(0.0, comm - compute),
            f"{gathers} parameter all-gathers + gradient {red} over {world} GPUs at "
            f"{bw:g} GB/s: {comm:.2f} s, exposed beyond the compute")
    if o.zero >= 3:
        add("ZeRO-3 overhead", m.layers * c.zero3_layer_s,
            f"{c.zero3_layer_s * 1e3:.1f} ms per decoder layer per step (fitted)")
    local = n / (world if o.zero else 1)
    if o.offload_optimizer:
        add("optimizer", local / c.cpu_adam_params_per_s
            + local * 2 * b / ((links.host_gbps or c.host_gbps) * 1e9),
            "ZeRO-Offload: CPU Adam, gradients out and parameters back over the host link")
    else:
        add("optimizer", local * 32 / (c.copy_tbps * 1e12), "Adam: ~32 B per parameter")
