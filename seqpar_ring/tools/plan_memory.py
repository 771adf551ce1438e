"""Memory model: per-GPU bytes of one training step, term by term, and the longest sequence.

A model of OUR code path (HF Llama-architecture decoder, ring or dilated attention, DeepSpeed
ZeRO, HF gradient checkpointing per decoder layer, ``seqpar_ring.tiled`` loss), not a general
formula. Every term is linear in the tokens a GPU holds, ``T = micro_batch * seq_len / sp``:
nothing is quadratic in the sequence, which is the point of the ring. Each component carries
the reason it exists; the peak is the largest of the training-step phases (see ``estimate``):
MLP backward, attention backward, loss, optimizer step. Checked against measured peaks on
H200s (README, "Measured"). Windowed attention and packed documents have the dense ring's
working set (the same tensors per token).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from seqpar_ring.tiled import default_tile_size
from seqpar_ring.tiled_mlp import default_mlp_tile

from .plan_model import DTYPE_BYTES, GIB, ModelSpec, PlanOptions, seq_divisor


@dataclass
class Plan:
    seq_len: int
    tokens_per_gpu: int
    components: list[tuple[str, float, str]] = field(default_factory=list)  # (name, bytes, why)
    peak_bytes: float = 0.0
    phase: str = ""
    host_components: list[tuple[str, float, str]] = field(default_factory=list)  # per rank

    def gib(self, name: str) -> float:
        return sum(b for n, b, _ in self.components if n == name) / GIB

    def host_gib_of(self, name: str) -> float:
        return sum(b for n, b, _ in self.host_components if n == name) / GIB

    @property
    def peak_gib(self) -> float:
        return self.peak_bytes / GIB

    @property
    def host_bytes(self) -> float:
        return sum(b for _, b, _ in self.host_components)

    @property
    def host_gib(self) -> float:
        return self.host_bytes / GIB


def _attn_saved(m: ModelSpec, b: int) -> float:
    """Bytes per token the attention half of a decoder layer saves for backward (HF Llama code).

    RoPE multiplies q and k by cos/sin, which are shared by all layers: autograd keeps cos/sin,
    not per-token copies, so RoPE adds nothing here.
    """
    norm = m.hidden * (4 + b) + 4                 # RMSNorm: fp32 input, rstd, cast output
    qkv = (m.heads + 2 * m.kv_heads) * m.d * b    # rotated q, k and v, saved by the attention
    attn = m.heads * m.d * b + m.heads * 4        # attention out (dtype) and lse (fp32)
    o_in = m.hidden * b                           # (B,S,H,D)->(B,S,h) contiguous o_proj input
    return norm + qkv + attn + o_in


def _mlp_saved(m: ModelSpec, b: int, tiled: bool = False) -> float:
    """Bytes per token the MLP half saves: its RMSNorm and gate, up, silu(gate), silu*up.

    Tiled (``seqpar_ring.tiled_mlp``): the RMSNorm and the MLP's input only.
    """
    return m.hidden * (4 + b) + 4 + (m.hidden * b if tiled else 4 * m.intermediate * b)


def _layer_saved(m: ModelSpec, b: int, tiled: bool = False) -> float:
    """Bytes per token one decoder layer saves for backward (HF Llama code, autograd)."""
    return _attn_saved(m, b) + _mlp_saved(m, b, tiled)


def _tiled_mlp_work(m: ModelSpec, b: int, tile: int) -> float:
    """Bytes (not per token) of the tiled MLP's backward besides the full-length gradients.

    One tile's recomputed gate, up, act(gate) and the gradients through them (6 x tile x
    intermediate), the tile's input and output gradient slices, and the weight gradients:
    fp32 sums over tiles plus one tile's product in the model dtype (3 x hidden x intermediate).
    """
    return tile * (6 * m.intermediate * b + 2 * m.hidden * b) + 3 * m.hidden * m.intermediate * (
        4 + b)


def _attention_backward(m: ModelSpec, b: int, o: PlanOptions) -> float:
    """Bytes per token of ring_backward's working set (seqpar_ring/ring.py)."""
    d, hq, u = m.d, m.heads, o.ulysses_size
    hkv = math.lcm(m.kv_heads, u)               # K/V replicated to lcm(Hkv, u) heads (ulysses)
    # Ulysses x ring: the ring runs on S/r tokens x H/u heads = the same elements per GPU; the
    # all-to-all adds a send and a receive buffer of q, k, v (and of the gradients) per token
    a2a = 2 * (hq + 2 * hkv) * d * b if u > 1 else 0
    acc = hq * d * 4 + hq * 4 + a2a             # fp32 dq accumulator + delta = rowsum(dout*out)
    dkv = 2 * 2 * hkv * d * 4                   # fp32 dK/dV partial sums: one in flight, one recv
    ring = 2 * 2 * hkv * d * b                  # K/V receive buffers (2 slots: double buffering)
    # per-block kernel outputs dq, dk, dv at q-head count (+ K/V expanded for GQA); zigzag
    # splits a rank's tokens in two chunks, so a block call covers half of them
    blk = (3 + (2 if o.gqa_expand and hq != hkv else 0)) * hq * d * b
    return acc + dkv + ring + blk * (0.5 if o.layout == "zigzag" else 1.0)


def _dilated_backward(m: ModelSpec, b: int, o: PlanOptions) -> float:
    """Bytes per token of DilatedAttentionFunction.backward (seqpar_ring/dilated.py).

    Two moments compete. (1) The r = 1 branch's backward: its kernel gradients (expanded to all
    query heads for GQA, then folded in fp32), the kernel's fp32 dq workspace and the expanded
    K/V. (2) A branch of rate r later: the base gradients held, the fp32 sums over 1/c of the
    rows (c = gcd of the other rates), that branch's gathered rows (dout, q, out, k, v) and
    its own kernel gradients and workspace, all 1/r of a dense tensor.
    """
    d, hq, hkv = m.d, m.heads, m.kv_heads
    expand = o.gqa_expand and hq != hkv
    rates = o.dilation_rates or (1,)
    rest = [r for r in rates if r != 1]
    grads = hq * d * b + 2 * (hq * d * b + hkv * d * 4 if expand else hkv * d * b)
    kernel = hq * d * 4 + (2 * hq * d * b if expand else 0)  # fp32 dq workspace, expanded K/V
    peak = grads + kernel if 1 in rates else 0.0
    if rest:
        held = hq * d * b + 2 * hkv * d * (4 if expand else b) if 1 in rates else 0.0
        sums = (hq + 2 * hkv) * d * 4 / math.gcd(*rest)
        rows = (3 * hq + 2 * hkv) * d * b
        peak = max(peak, held + sums + (rows + grads + kernel) / min(rest))
    return peak


def estimate(m: ModelSpec, seq_len: int, o: PlanOptions) -> Plan:
    """Per-GPU memory of one step at ``seq_len`` total tokens per sample.

    Peak = static + max(layer-backward phase, loss phase) during the step's forward/backward,
    or static + the optimizer-step transient, whichever is larger.
    """
    if seq_len % o.sp_size:
        raise ValueError(f"seq_len {seq_len} is not a multiple of sp={o.sp_size}")
    if o.dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype {o.dtype!r} is not one of {sorted(DTYPE_BYTES)}")
    b, n, world = DTYPE_BYTES[o.dtype], m.params(), o.gpus
    t = o.micro_batch * seq_len // o.sp_size
    pl = Plan(seq_len, t)

    def add(name, nbytes, why):
        pl.components.append((name, float(nbytes), why))
        return float(nbytes)

    # ZeRO partitions over every replica of the params: SP ranks hold the same params as DP ranks
    static = add("weights", n * b / (world if o.zero >= 3 else 1),
                 f"{n / 1e9:.2f}B params x {b} B" + (" / gpus (ZeRO-3)" if o.zero >= 3 else ""))
    static += add("grads", n * b / (world if o.zero >= 2 else 1),
                  f"{b} B/param" + (" / gpus (ZeRO-2/3)" if o.zero >= 2 else ""))
    opt_b = 8 + (4 if b < 4 else 0)
    static += add("optimizer", 0 if o.offload_optimizer else
                  n * opt_b / (world if o.zero >= 1 else 1),
                  "offloaded to CPU" if o.offload_optimizer else
                  f"Adam m, v (+ fp32 master) = {opt_b} B/param" + (" / gpus" if o.zero else ""))
    if o.zero >= 3:
        live = max(m.layer_params(), m.vocab * m.hidden) + o.prefetch_bucket
        static += add("zero3 gathered params", live * b,
                      "largest module gathered for compute + prefetch bucket")
    static += add("comm buckets", o.reduce_bucket * b, "gradient reduce (all-reduce) bucket")

    tiled = o.tiled_mlp
    if o.activation_offload and not o.checkpointing:
        raise ValueError("activation_offload moves the layer inputs that checkpointing keeps: "
                         "it needs checkpointing=True")
    final = 0.0  # final RMSNorm, counted apart (loss phase only) under activation offload
    if o.activation_offload:
        ckpt = add("checkpoints", t * m.hidden * b,
                   "one layer input on the GPU: the next one down, prefetched from host "
                   "memory during backward (activation offload)")
        ckpt += add("rope", t * 2 * m.d * b, "cos/sin shared by layers")
        # Freed by the final norm's backward, before the first layer's: live at the loss
        # only. (Without offload the term stays in the sum, as calibrated on measured peaks.)
        final = t * m.hidden * (2 * b + 4)
    else:
        per_layer = m.hidden * b if o.checkpointing else _layer_saved(m, b, tiled)
        ckpt = add("checkpoints", m.layers * t * per_layer,
                   "each decoder layer's input (HF gradient checkpointing)" if o.checkpointing
                   else "every layer's saved activations (no checkpointing)")
        ckpt += add("rope + final norm", t * (2 * m.d * b + m.hidden * (2 * b + 4)),
                    "cos/sin shared by layers; final RMSNorm input/output")
    if o.keep_attention:
        if not o.checkpointing:
            raise ValueError("keep_attention (recompute_attention=False) keeps attention "
                             "across checkpointing's recomputation: it needs checkpointing=True")
        ckpt += add("kept attention", m.layers * t * (m.heads * m.d * b + m.heads * 4),
                    "each layer's attention output and fp32 lse, kept for the recomputation "
                    "(recompute_attention=False)")
    # A layer's backward runs the MLP first: its saved tensors are freed before the attention's
    # backward allocates its working set, so the two moments are separate peaks, not a sum.
    layer = t * _layer_saved(m, b, tiled) if o.checkpointing else 0.0
    mlp_grads = t * (3 * m.hidden * b + (0 if tiled else 2 * m.intermediate * b))
    mlp_why = "gradients flowing through the MLP's backward"
    if tiled:
        mlp_tile = min(t, o.mlp_tile or default_mlp_tile(m.intermediate))
        mlp_grads += _tiled_mlp_work(m, b, mlp_tile)
        mlp_why += f"; one {mlp_tile}-token tile's intermediates, weight-gradient sums (tiled)"
    attn_layer = t * _attn_saved(m, b) if o.checkpointing else 0.0
    attn_grads = t * 3 * m.hidden * b
    dilated = o.attention == "dilated"
    attn = t * (_dilated_backward(m, b, o) if dilated else _attention_backward(m, b, o))
    mlp_phase = layer + mlp_grads
    # without checkpointing every layer's activations are in `ckpt`; the MLP's are freed by now
    attn_held = attn_layer if o.checkpointing else -t * _mlp_saved(m, b, tiled)
    attn_phase = attn_held + attn_grads + attn
    layer_phase = max(mlp_phase, attn_phase)
    attn_why = ("dilated backward: base grads, fp32 sums over 1/c rows, one branch's rows"
                if dilated else "ring_backward: fp32 dq/dK/dV, K/V buffers, block grads")
    if o.tiled_loss:
        tile = min(t, o.loss_tile or default_tile_size(m.vocab))
        loss_phase = (tile * m.vocab * (2 * b + 8) + t * 4 + t * m.hidden * b
                      + m.vocab * m.hidden * 4)
        loss_why = f"tiled: {tile}-token tile of logits + fp32 dW accumulator + lse"
    else:
        loss_phase = t * m.vocab * (b + 12) + t * m.hidden * b
        loss_why = "full logits (dtype) + fp32 upcast, log-softmax and its gradient"
    final_why = "final RMSNorm input/output (freed before the layers' backward)"
    if layer_phase >= loss_phase + final:
        if mlp_phase >= attn_phase:
            add("layer recompute", layer, "one layer's activations rebuilt during its backward")
            add("backward grads", mlp_grads, mlp_why)
            add("attention", 0.0, attn_why + f" ({attn / GIB:.2f} GiB, after the MLP's "
                "activations are freed: not live at this peak)")
            pl.phase = "MLP backward"
        else:
            add("layer recompute" if o.checkpointing else "freed MLP activations", attn_held,
                "the attention half's activations (the MLP's are freed by now)"
                if o.checkpointing else "the last layer's MLP activations, freed by now")
            add("backward grads", attn_grads, "gradients flowing through the attention")
            add("attention", attn, attn_why)
            pl.phase = "attention backward"
        if o.activation_offload:
            add("final norm", 0.0, final_why + f" ({final / GIB:.2f} GiB, not live here)")
        add("logits/loss", 0.0, loss_why + " (not live at the layer peak)")
        active = layer_phase
    else:
        if o.activation_offload:
            add("final norm", final, final_why)
        add("logits/loss", loss_phase, loss_why)
        active, pl.phase = loss_phase + final, "loss"
    step = 0.0 if o.offload_optimizer else 4 * min(n / (world if o.zero else 1), o.sub_group)
    train = static + ckpt + active
    if static + step > train:
        add("optimizer step", step, "fp32 copy of a gradient sub-group at step()")
        pl.phase, train = "optimizer step", static + step
    pl.peak_bytes = train

    def host(name, nbytes, why):
        pl.host_components.append((name, float(nbytes), why))

    if o.activation_offload:
        host("checkpoints", m.layers * t * m.hidden * b,
             "every decoder layer's input, pinned (power-of-two pieces: < 2 MiB rounding each)")
    if o.offload_optimizer:
        host("optimizer", n * 16 / (world if o.zero else 1),
             "ZeRO-Offload: fp32 master, Adam m, v and fp32 gradients = 16 B/param")
    host("process", o.host_reserve_gib * GIB,
         "allowance for the process itself: CUDA runtime, libraries, Python (--host-reserve-gib)")
    return pl


def max_seq_len(m: ModelSpec, o: PlanOptions, gpu_mem_gib: float,
                limit: int = 2**34, host_mem_gib: float | None = None) -> int:
    """Longest total sequence (multiple of the layout's divisor) whose peak fits the GPU.

    With ``host_mem_gib`` (per rank) the host terms must fit it too. Both are monotone in the
    length, so bisect over multiples of the divisor. 0 if none fits.
    """
    budget = (gpu_mem_gib - o.reserve_gib) * GIB
    host_budget = None if host_mem_gib is None else host_mem_gib * GIB

    def fits(seq: int) -> bool:
        pl = estimate(m, seq, o)
        return pl.peak_bytes <= budget and (host_budget is None or pl.host_bytes <= host_budget)

    div = seq_divisor(o)
    lo, hi = 0, limit // div
    if not fits(div):
        return 0
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid * div):
            lo = mid
        else:
            hi = mid - 1
    return lo * div


def reach(m: ModelSpec, o: PlanOptions, gpu_mem_gib: float,
          host_mem_gib: float | None) -> tuple[int, str]:
    """(longest sequence, what limits it: ``"GPU memory"`` or ``"host memory"``)."""
    both = max_seq_len(m, o, gpu_mem_gib, host_mem_gib=host_mem_gib)
    if host_mem_gib is not None and both < max_seq_len(m, o, gpu_mem_gib):
        return both, "host memory"
    return both, "GPU memory"


def attention_check_bytes(m: ModelSpec, seq_len: int, o: PlanOptions) -> float:
    """Bytes above its inputs of one dense attention forward+backward on one rank.

    What ``bench e2e --find-max`` measures (q, k, v and the output gradient allocated before):
    the saved output and lse, ring_backward's working set (the training step's attention
    term) and the gradients dq, dk, dv in the model dtype, cast from their fp32 sums.
    """
    b, t = DTYPE_BYTES[o.dtype], o.micro_batch * seq_len // o.sp_size
    d, hq, hkv = m.d, m.heads, m.kv_heads
    dense = replace(o, attention="ring")
    return t * (hq * d * b + hq * 4 + _attention_backward(m, b, dense) + (hq + 2 * hkv) * d * b)
