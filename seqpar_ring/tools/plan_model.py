"""Planner inputs: a decoder's shapes (``ModelSpec``, presets, config.json), the run's options.

Shared by the memory model (`plan_memory`), the step-time model (`plan_time`) and the CLI.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

GIB = 2**30
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
FALLBACK_GPU_MEM_GIB = 80.0  # without --gpu-mem-gib and without a CUDA device (A100/H100 80 GB)


@dataclass(frozen=True)
class ModelSpec:
    """Shapes of a Llama-architecture decoder (what the memory terms need)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    head_dim: int | None = None
    tied: bool = False

    @property
    def d(self) -> int:
        return self.head_dim or self.hidden // self.heads

    def layer_params(self) -> int:
        attn = self.hidden * self.d * (2 * self.heads + 2 * self.kv_heads)  # q, o + k, v
        return attn + 3 * self.hidden * self.intermediate + 2 * self.hidden  # MLP + 2 norms

    def params(self) -> int:
        emb = self.vocab * self.hidden * (1 if self.tied else 2)
        return emb + self.layers * self.layer_params() + self.hidden  # + final norm


PRESETS = {
    "tiny": ModelSpec(64, 2, 4, 2, 128, 256),
    "llama-1.1b": ModelSpec(2048, 22, 32, 4, 5632, 32000),   # TinyLlama shape (bench default)
    "llama-7b": ModelSpec(4096, 32, 32, 32, 11008, 32000),   # Llama-2-7B
    "llama-8b": ModelSpec(4096, 32, 32, 8, 14336, 128256),   # Llama-3-8B
    "llama-70b": ModelSpec(8192, 80, 64, 8, 28672, 128256),  # Llama-3-70B
}


def load_spec(model: str) -> ModelSpec:
    """A preset name or the path of an HF config.json (Llama-like keys)."""
    if model in PRESETS:
        return PRESETS[model]
    if not os.path.isfile(model):
        raise ValueError(f"--model {model!r} is neither a preset {sorted(PRESETS)} nor a file; "
                         "pass a preset name or the path of a config.json")
    with open(model) as f:
        c = json.load(f)
    c = c.get("text_config", c)
    try:
        return ModelSpec(c["hidden_size"], c["num_hidden_layers"], c["num_attention_heads"],
                         c.get("num_key_value_heads") or c["num_attention_heads"],
                         c["intermediate_size"], c["vocab_size"], c.get("head_dim"),
                         bool(c.get("tie_word_embeddings", False)))
    except KeyError as err:
        raise ValueError(f"{model}: config lacks {err}; expected a Llama-like config.json")


@dataclass(frozen=True)
class PlanOptions:
    gpus: int = 1
    sp: int | None = None            # None = gpus (all ranks in one SP group)
    zero: int = 3
    dtype: str = "bf16"
    checkpointing: bool = True
    tiled_loss: bool = True
    loss_tile: int | None = None     # None = seqpar_ring.tiled.default_tile_size(vocab)
    micro_batch: int = 1
    layout: str = "zigzag"
    attention: str = "ring"          # "ring" or "dilated" (then dilation_rates matter)
    dilation_rates: tuple[int, ...] = ()
    gqa_expand: bool = True          # fused GPU kernels expand K/V to all heads in backward
    ulysses_size: int = 1            # Ulysses x ring: all-to-all buffers, K/V replication
    offload_optimizer: bool = False
    reduce_bucket: float = 5e8       # DeepSpeed defaults (elements)
    prefetch_bucket: float = 5e7
    sub_group: float = 1e9
    reserve_gib: float = 1.0         # CUDA context, NCCL, allocator slack: not in max_allocated
    activation_offload: bool = False  # checkpointed layer inputs in pinned host memory
    tiled_mlp: bool = False          # decoder MLPs over sequence tiles (seqpar_ring.tiled_mlp)
    mlp_tile: int | None = None      # None = seqpar_ring.tiled_mlp.default_mlp_tile(intermediate)
    keep_attention: bool = False     # recompute_attention=False: outputs kept, not recomputed
    host_reserve_gib: float = 8.0    # host allowance for the process itself (CUDA runtime,
    #                                  libraries, Python): an assumption, not a measurement
    # step-time model only (the memory terms are the dense ring's for these):
    segment_lengths: tuple[int, ...] = ()  # dilated: () = 2048 * 4**i, the last one the sequence
    window: int | None = None        # sliding window: each query sees min(i + 1, window) keys
    doc_len: int | None = None       # packed rows: documents of this many tokens

    @property
    def sp_size(self) -> int:
        return self.sp or self.gpus


def dilated_schedule(o: PlanOptions, seq_len: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(segment lengths, rates) of a dilated plan, each segment clipped to the sequence.

    Without ``segment_lengths`` the schedule of the measured runs: w_i = 2048 * 4**i for every
    rate but the last, whose segment is the whole sequence (2K, 8K, 32K, 128K, S for r = 1..16).
    """
    rates = o.dilation_rates or (1,)
    ws = o.segment_lengths or tuple(2048 * 4**i for i in range(len(rates) - 1)) + (seq_len,)
    if len(ws) != len(rates):
        raise ValueError(f"segment_lengths {list(ws)} and dilation_rates {list(rates)} must have "
                         "the same length (one rate per segment)")
    return tuple(min(w, seq_len) for w in ws), tuple(rates)


def seq_divisor(o: PlanOptions) -> int:
    base = o.sp_size * (2 if o.layout == "zigzag" else 1)
    if o.attention == "dilated" and o.dilation_rates:
        base *= math.lcm(*o.dilation_rates)
    return base



def gpu_memory_gib(requested: float | None) -> tuple[float, str]:
    """(GiB per GPU, why): ``requested``, else CUDA device 0's total memory, else the fallback."""
    if requested is not None:
        return requested, "--gpu-mem-gib"
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return props.total_memory / GIB, f"detected: CUDA device 0, {props.name}"
    return FALLBACK_GPU_MEM_GIB, "no CUDA device found: default; pass --gpu-mem-gib for yours"
