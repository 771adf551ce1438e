"""Training schedules of the passkey fine-tune (examples/finetune.py): the CPU curriculum,
the GPU presets with their length stages, the learning-rate schedule and the presets'
DeepSpeed config. Why the h200 values are what they are: examples/README.md.
"""

from __future__ import annotations

import math
import os

# The GPU recipe (one H200; the same on 2 GPUs with SP = 2). Why each value: examples/README.md.
# Stages "LENxROWS:STEPS": the lookup is learned on 128-token rows (at init a query spreads its
# attention evenly, so the needle's share, and the gradient that finds it, is 1/LEN), then the
# length doubles while the model still answers at the new length, up to 32K.
PRESETS = {
    "h200": dict(
        out="runs/h200", seq_len=32768,
        stages="128x64:200,512x32:150,1024x32:100,2048x16:100,4096x16:100,8192x8:100,"
               "16384x8:150,32768x8:400",
        lr=3e-3, warmup=50, hidden=128, heads=4, layers=2, rope_theta=1e8,
        eval_lens="32768,65536,131072", eval_batch_size=1, eval_per_depth=8,
        depths="0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1", fast_data=True, max_train_s=300.0,
        log_every=25, save_every=0, progress_bar=False, preflight=True),
}


def parse_stages(text: str) -> list[tuple[int, int, int]]:
    """``"128x64:200,512x32:150"`` -> [(128, 64, 200), (512, 32, 150)] (len, rows, steps)."""
    out = []
    for part in text.split(","):
        try:
            size, steps = part.strip().split(":")
            n, rows = size.split("x")
            stage = (int(n), int(rows), int(steps))
        except ValueError:
            raise SystemExit(f"error: --stages part {part!r} is not LENxROWS:STEPS, e.g. "
                             "512x32:150") from None
        if min(stage) < 1:
            raise SystemExit(f"error: --stages part {part!r}: every number must be >= 1")
        out.append(stage)
    return out


def preset_ds_config(args) -> dict:
    """bf16 ZeRO-2 for the tiny model on GPUs; the SP size defaults to every GPU (world)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return {
        "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0, "bf16": {"enabled": True},
        # torch's AdamW: DeepSpeed's FusedAdam is JIT-compiled on first use (nvcc, ninja,
        # TORCH_CUDA_ARCH_LIST), which costs minutes or fails on a machine without a toolchain
        "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "betas": [0.9, 0.95],
                                                  "eps": 1e-8, "weight_decay": 0.0,
                                                  "torch_adam": True}},
        # ZeRO-2 defaults allocate 5e8-element buckets; the model has 0.35M parameters
        "zero_optimization": {"stage": 2, "reduce_bucket_size": 10**7,
                              "allgather_bucket_size": 10**7},
        "sequence_parallel": {"size": world, "attention": "ring", "layout": "zigzag",
                              "comm": "ring", "kernel": "auto"},
        "steps_per_print": 10**9,
    }


def lr_lambda(args):
    def f(step: int) -> float:  # linear warmup, cosine to 10 %
        if step < args.warmup:
            return (step + 1) / args.warmup
        t = (step - args.warmup) / max(1, args.steps - args.warmup)
        return 0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, t)))
    return f


def row_len(args, step: int, divisor: int) -> int:
    """Curriculum: the lookup is learned on short rows (1/8 of --seq-len for the first half of
    the curriculum, then 1/4, 1/2), then kept while the rows grow to the full length."""
    if args.data or step >= args.curriculum * args.steps:
        return args.seq_len
    frac = step / (args.curriculum * args.steps)
    n = args.seq_len // (8 if frac < 0.5 else 4 if frac < 0.75 else 2)
    return max(divisor, n // divisor * divisor)


def step_plan(args, divisor: int) -> list[tuple[int, int]]:
    """(tokens per row, rows) of every step: --stages, else the --curriculum fractions."""
    if args.stage_list:
        plan = [(n, rows) for n, rows, steps in args.stage_list for _ in range(steps)]
    else:
        plan = [(row_len(args, step, divisor), args.batch_size) for step in range(args.steps)]
    bad = sorted({n for n, _ in plan if n % divisor})
    if bad:
        raise SystemExit(f"error: rows of {bad} tokens are not multiples of {divisor} (SP size "
                         "x 2 for zigzag): change --stages / --seq-len")
    return plan
