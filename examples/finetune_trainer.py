"""The passkey fine-tune of finetune.py with ``transformers.Trainer`` (our ``SPTrainer``).

    python examples/finetune_trainer.py                    # 2 CPU processes (gloo), DDP, SP = 2
    torchrun --nproc_per_node 8 examples/finetune_trainer.py --model <hf id or path> \\
        --deepspeed_config configs/zero3_sp.json --seq-len 65536 --bf16      # DeepSpeed, GPU

``SPTrainer`` patches the model's attention and loss, shards every batch for this SP rank
(samples split over the DP group only) and, under DDP, sums gradients over the SP ranks. With
``--deepspeed_config`` the Trainer runs DeepSpeed (through accelerate) and
``SPTrainer`` hands it the SP x DP groups (``setup_sequence_parallel``) read from the file's
``"sequence_parallel"`` section. Without it the SP size is ``--sequence-parallel-size``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import arg_checks  # noqa: E402
import finetune  # noqa: E402  (model, curriculum-free data, evaluation table)
import passkey  # noqa: E402

from seqpar_ring import shutdown  # noqa: E402
from seqpar_ring.config import SeqParConfig  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None, help="HF model name or path; None: a tiny "
                   "random Llama, nothing downloaded")
    p.add_argument("--out", default="runs/passkey_trainer", help="Trainer output_dir: "
                   "checkpoints, metrics.jsonl")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per row (all SP ranks)")
    p.add_argument("--batch-size", type=int, default=8, help="rows per device per step")
    p.add_argument("--steps", type=int, default=800, help="optimizer steps (max_steps)")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (cosine schedule)")
    p.add_argument("--digits", type=int, default=4, help="passkey digits")
    p.add_argument("--eval-per-depth", type=int, default=16, help="eval rows per needle depth")
    p.add_argument("--bf16", action="store_true", help="train in bf16 (GPU)")
    p.add_argument("--nproc", type=int, default=2, help="processes to spawn without a launcher")
    p.add_argument("--deepspeed_config", default=None, help="DeepSpeed JSON with a "
                   "sequence_parallel section; None: plain DDP")
    p.add_argument("--sequence-parallel-size", dest="sp_size", type=int, default=2,
                   help="SP size without --deepspeed_config")
    p.add_argument("--sequence-parallel-layout", dest="layout", default="zigzag",
                   choices=("zigzag", "contiguous"), help="token layout without "
                   "--deepspeed_config")
    p.add_argument("--seed", type=int, default=0, help="data and initialisation seed")
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    arg_checks.at_least({
        "--seq-len": (args.seq_len, 1), "--batch-size": (args.batch_size, 1),
        "--steps": (args.steps, 1), "--digits": (args.digits, 1),
        "--eval-per-depth": (args.eval_per_depth, 1), "--nproc": (args.nproc, 1),
        "--sequence-parallel-size": (args.sp_size, 1)})
    return args


def check_launch(args, world: int, source: str) -> SeqParConfig:
    """The checks that need the world size or a file, before any spawn or model."""
    if args.deepspeed_config:
        cfg = arg_checks.sp_config(None, args.deepspeed_config)[0]
        flag = f"sequence_parallel.size of {args.deepspeed_config}"
    else:
        cfg = SeqParConfig(sp_size=args.sp_size, layout=args.layout)
        flag = "--sequence-parallel-size"
    arg_checks.check_world(cfg, world, source, flag=flag)
    arg_checks.check_row_len("--seq-len", args.seq_len, cfg)
    if not args.model:
        arg_checks.check_passkey_len("--seq-len", args.seq_len, passkey.min_row_len(args.digits))
    return cfg


def trainer_ds_config(path: str) -> dict:
    """The DeepSpeed JSON with the values the Trainer owns set to "auto" (it fills them from
    TrainingArguments and refuses mismatches); its own LR schedule replaces the file's."""
    from seqpar_ring.integrations.deepspeed import load_ds_config

    ds = load_ds_config(path)
    ds.pop("scheduler", None)
    ds.pop("train_batch_size", None)  # DeepSpeed derives it with dp = world / sp
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                "gradient_clipping"):
        ds[key] = "auto"
    if "optimizer" in ds:
        ds["optimizer"].setdefault("params", {}).update(lr="auto", betas="auto",
                                                        weight_decay="auto")
    for key in ("bf16", "fp16"):
        if key in ds:
            ds[key]["enabled"] = "auto"
    return ds


def train(args) -> dict:
    from transformers import TrainingArguments

    from seqpar_ring.integrations.hf import SPDataCollator
    from seqpar_ring.integrations.hf_trainer import SPTrainer

    model = finetune.build_model(args, len(passkey.VOCAB))
    targs = TrainingArguments(
        output_dir=args.out, per_device_train_batch_size=args.batch_size, max_steps=args.steps,
        learning_rate=args.lr, warmup_steps=min(30, args.steps // 10), lr_scheduler_type="cosine",
        weight_decay=0.0, adam_beta2=0.95, max_grad_norm=1.0, logging_steps=10,
        save_steps=max(1, args.steps // 2), bf16=args.bf16, use_cpu=not torch.cuda.is_available(),
        report_to=[], seed=args.seed, average_tokens_across_devices=True,
        dataloader_num_workers=0, ddp_find_unused_parameters=False,
        ddp_backend=None if torch.cuda.is_available() else "gloo",
        deepspeed=trainer_ds_config(args.deepspeed_config) if args.deepspeed_config else None,
        # a bar on a terminal only: in a log file the Trainer prints its logs every 10 steps
        disable_tqdm=(dist.is_initialized() and dist.get_rank() != 0) or not sys.stderr.isatty(),
    )
    sp_cfg = check_launch(args, dist.get_world_size(), "the process group")  # the JSON's or
    data = passkey.PasskeyDataset(args.steps * args.batch_size * 8, args.seq_len, args.digits,
                                  seed=args.seed + 1)
    # under DeepSpeed, SPTrainer hands DeepSpeed the SP x DP groups as its mpu itself
    trainer = SPTrainer(model=model, args=targs, train_dataset=data, sp_config=sp_cfg)
    trainer.train()

    # evaluation: the same passkey table as finetune.py (each rank feeds its shard)
    g = trainer.sp_groups
    engine = _EvalView(trainer.model_wrapped, g)
    result = finetune.evaluate(engine, args, SPDataCollator(sp_cfg, g))
    if dist.get_rank() == 0:
        print(json.dumps({"passkey_accuracy": result["accuracy"],
                          "by_depth": result["by_depth"]}, indent=1))
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        with open(os.path.join(args.out, "metrics.jsonl"), "w") as f:
            for h in trainer.state.log_history:
                if "loss" in h:
                    f.write(json.dumps({"step": h["step"], "loss": h["loss"]}) + "\n")
            f.write(json.dumps({"step": args.steps, "eval": result}) + "\n")
        if losses:
            print(f"logged loss {losses[0]:.3f} -> {losses[-1]:.3f}")
        print(f"outputs in {args.out}/: metrics.jsonl (logged losses + the evaluation), "
              f"checkpoint-<step>/ (Trainer checkpoints); plot them with "
              f"`python -m seqpar_ring.plot {args.out}`")
    return result


class _EvalView:
    """What finetune.evaluate needs from an engine: call, eval/train, device, groups."""

    def __init__(self, model, groups):
        self.model, self.seqpar_groups = model, groups
        self.device = next(model.parameters()).device

    def __call__(self, **batch):
        return self.model(**batch)

    def eval(self):
        self.model.eval()

    def train(self):
        self.model.train()


def _worker(rank: int, world: int, port: int, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(minutes=5))
    try:
        train(args)
    except BaseException:
        shutdown(wait=False)  # a peer may never arrive: tear down at once
        raise
    shutdown()  # every rank arrives before any tears the groups down


def main(argv=None) -> None:
    args = parse_args(argv)
    check_launch(args, *arg_checks.world_size(args.nproc))
    if "RANK" in os.environ:  # torchrun / deepspeed / accelerate launch: the Trainer joins
        train(args)
        return
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(args.nproc, port, args), nprocs=args.nproc, join=True)


if __name__ == "__main__":
    main()
