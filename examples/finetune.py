"""Long-context fine-tuning with sequence parallelism (ring attention) through DeepSpeed.

    python examples/finetune.py                       # 2 CPU processes (gloo), tiny random Llama,
                                                      # passkey retrieval at 1024 tokens, SP = 2
    torchrun --nproc_per_node 2 examples/finetune.py  # the same under a launcher
    deepspeed --num_gpus 8 examples/finetune.py --deepspeed_config configs/zero3_sp.json \\
        --model meta-llama/Meta-Llama-3-8B --seq-len 65536 --data my.jsonl   # see README.md

Every rank of an SP group holds 1/sp of each row's tokens (zigzag layout); attention passes
K/V around the ring, so the row is never whole on any rank. Without a launcher the script
spawns ``--nproc`` gloo processes itself. Outputs in ``--out`` (a run dir): metrics.jsonl
(one JSON per step and per evaluation), checkpoints/ (engine.save_checkpoint), args.json.
Plot it with ``python -m seqpar_ring.plot <run dir>``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import socket
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # examples/passkey.py
import passkey  # noqa: E402

from seqpar_ring.integrations import deepspeed as sp_ds  # noqa: E402
from seqpar_ring.integrations.hf import SPDataCollator, shard_dataloader  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEPTHS = [0.0, 0.25, 0.5, 0.75, 1.0]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="HF model name or path (default: tiny random "
                   "Llama built from LlamaConfig, nothing downloaded)")
    p.add_argument("--data", default=None, help="your .jsonl ('text') / .txt data, packed into "
                   "rows (default: the synthetic passkey task)")
    p.add_argument("--out", default=None, help="run dir: metrics, checkpoints (default: "
                   "runs/passkey, or runs/<data file name> with --data)")
    p.add_argument("--seq-len", type=int, default=1024, help="tokens per row (all SP ranks)")
    p.add_argument("--batch-size", type=int, default=8, help="rows per step per SP group")
    p.add_argument("--steps", type=int, default=600, help="optimizer steps")
    p.add_argument("--grad-accum", type=int, default=None, help="micro-batches per optimizer "
                   "step (default: the config's gradient_accumulation_steps)")
    p.add_argument("--lr", type=float, default=None, help="default: 3e-3 for the tiny model, "
                   "else the config's optimizer lr")
    p.add_argument("--warmup", type=int, default=30, help="linear LR warmup steps")
    p.add_argument("--curriculum", type=float, default=0.75, help="fraction of the steps on "
                   "shorter passkey rows (--seq-len/8, /4, /2); 0 = full length throughout")
    p.add_argument("--digits", type=int, default=4, help="passkey digits")
    p.add_argument("--eval-per-depth", type=int, default=16, help="eval rows per needle depth")
    p.add_argument("--log-every", type=int, default=20, help="print a line every N steps")
    p.add_argument("--save-every", type=int, default=200, help="checkpoint every N steps (+end)")
    p.add_argument("--nproc", type=int, default=2, help="processes to spawn without a launcher")
    p.add_argument("--seed", type=int, default=0, help="data and initialisation seed")
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # deepspeed
    p.add_argument("--deepspeed", action="store_true", help=argparse.SUPPRESS)  # launcher habit
    p.add_argument("--deepspeed_config", default=os.path.join(ROOT, "configs", "cpu_gloo.json"),
                   help="DeepSpeed JSON with a sequence_parallel section (see configs/)")
    sp_ds.add_argparse_args(p)  # --sequence-parallel-size, -layout, -attention, ... override it
    args = p.parse_args(argv)
    if args.out is None:  # the run is named after its data (the plot titles use the name)
        name = os.path.splitext(os.path.basename(args.data))[0] if args.data else "passkey"
        args.out = os.path.join("runs", name)
    return args


def build_model(args, vocab_size: int):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if args.model:  # attention_dropout must be 0 under SP (patch() checks it)
        model = AutoModelForCausalLM.from_pretrained(args.model, attention_dropout=0.0,
                                                     dtype=torch.bfloat16)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return model
    torch.manual_seed(args.seed)  # identical random weights on every rank
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                      max_position_embeddings=max(4096, args.seq_len), use_cache=False,
                      attention_dropout=0.0, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


def deepspeed_config(args) -> dict:
    ds = sp_ds.load_ds_config(args.deepspeed_config)
    ds["train_micro_batch_size_per_gpu"] = args.batch_size
    ds["gradient_accumulation_steps"] = args.grad_accum or ds.get("gradient_accumulation_steps", 1)
    ds.pop("train_batch_size", None)  # DeepSpeed derives it: micro * accumulation * (world/sp)
    lr = args.lr if args.lr is not None else (None if args.model else 3e-3)
    if lr is not None and "optimizer" in ds:
        ds["optimizer"].setdefault("params", {})["lr"] = lr
        sched = ds.get("scheduler", {}).get("params", {})
        if "warmup_max_lr" in sched:  # WarmupLR/WarmupDecayLR would otherwise cap the lr
            sched["warmup_max_lr"] = lr
    if not args.model and "optimizer" in ds:  # the tiny model learns the lookup ~2x faster so
        ds["optimizer"]["params"]["betas"] = [0.9, 0.95]
    return ds


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


def passkey_data(args, tokenizer, size: int, seq_len: int, seed: int, depths=None):
    """The tiny-vocabulary passkey rows, or the same task in words for a real tokenizer."""
    if tokenizer is None:
        return passkey.PasskeyDataset(size, seq_len, args.digits, seed, depths)
    return passkey.TextPasskeyDataset(tokenizer, size, seq_len, args.digits, seed, depths)


def passkey_batches(args, collate: SPDataCollator, groups, divisor: int, tokenizer):
    """Yields (this rank's shard, row length). Rows are drawn per (step, DP replica): the SP
    ranks of a group draw the same rows and keep their own tokens."""
    for step in range(args.steps):
        n = row_len(args, step, divisor)
        ds = passkey_data(args, tokenizer, args.batch_size, n,
                          seed=(args.seed * 7919 + step) * groups.dp_size + groups.dp_rank + 1)
        yield collate([ds[i] for i in range(len(ds))]), n


def data_batches(args, engine, tokenizer):
    texts = passkey.read_documents(args.data)
    if tokenizer is None:
        tokens = [passkey.byte_tokenize(t) for t in texts]
    else:
        tokens = [tokenizer(t)["input_ids"] + [tokenizer.eos_token_id] for t in texts]
    loader = shard_dataloader(passkey.PackedDataset(tokens, args.seq_len), engine.seqpar_config,
                              engine.seqpar_groups, batch_size=args.batch_size, seed=args.seed)
    step, epoch = 0, 0
    while True:
        loader.set_epoch(epoch)
        for batch in loader:
            yield batch, args.seq_len
            step += 1
            if step == args.steps:
                return
        epoch += 1


@torch.no_grad()
def evaluate(engine, args, collate: SPDataCollator, tokenizer=None) -> dict:
    """Passkey accuracy by needle depth at the full --seq-len (teacher forced: a key counts
    when every digit is the argmax, which is what greedy decoding would produce)."""
    g = engine.seqpar_groups
    ds = passkey_data(args, tokenizer, len(DEPTHS) * args.eval_per_depth, args.seq_len,
                      seed=10**6 + args.seed, depths=DEPTHS)
    # rows, keys right, tokens right, tokens per depth; on the engine's device (NCCL needs it)
    stats = torch.zeros(len(DEPTHS), 4, dtype=torch.float64, device=engine.device)
    engine.eval()
    for start in range(g.dp_rank * args.batch_size, len(ds), g.dp_size * args.batch_size):
        idx = list(range(start, min(start + args.batch_size, len(ds))))
        batch = {k: v.to(engine.device) for k, v in collate([ds[i] for i in idx]).items()}
        logits = engine(**batch).logits
        labels = batch["shift_labels"]
        answer = labels != passkey.IGNORE
        counts = torch.stack([((logits.argmax(-1) != labels) & answer).sum(1),
                              answer.sum(1)], 1).double()
        dist.all_reduce(counts, group=g.sp_group)  # digits of one key may sit on other ranks
        for i, (wrong, total) in zip(idx, counts.tolist()):
            stats[DEPTHS.index(ds.depth_of(i))] += torch.tensor(
                [1.0, wrong == 0, total - wrong, total], dtype=stats.dtype, device=stats.device)
    dist.all_reduce(stats, group=g.dp_group)
    engine.train()
    by_depth = {f"{d:g}": stats[j, 1].item() / stats[j, 0].item() for j, d in enumerate(DEPTHS)}
    return {"accuracy": stats[:, 1].sum().item() / stats[:, 0].sum().item(),
            "digit_accuracy": stats[:, 2].sum().item() / stats[:, 3].sum().item(),
            "by_depth": by_depth}


def train(args) -> dict:
    rank = dist.get_rank()
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)  # keep the console to the progress bar and our lines
    tokenizer = None
    if args.model:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.model)
    vocab = len(passkey.VOCAB) if not args.data else passkey.BYTE_VOCAB
    model = build_model(args, vocab)
    ds_cfg = deepspeed_config(args)
    engine, _, _, _ = sp_ds.initialize(
        model=model, config=ds_cfg, model_parameters=[p for p in model.parameters()
                                                      if p.requires_grad],
        args=args, lr_scheduler=None if "scheduler" in ds_cfg else
        (lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(args))))
    g, cfg = engine.seqpar_groups, engine.seqpar_config
    collate = SPDataCollator(cfg, g)
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "args.json"), "w") as f:
            json.dump({**vars(args), "groups": str(g), "seqpar": cfg.to_dict()}, f, indent=1)
        print(f"{g.describe() if hasattr(g, 'describe') else g}: {cfg}\nmodel "
              # ZeRO-3 leaves empty placeholders; ds_numel is the real size
              f"{sum(getattr(p, 'ds_numel', p.numel()) for p in model.parameters()) / 1e6:.2f}"
              "M params, rows of "
              f"{args.seq_len} tokens = {args.seq_len // cfg.sp_size} per rank", flush=True)
    metrics = open(os.path.join(args.out, "metrics.jsonl"), "w") if rank == 0 else None
    batches = (data_batches(args, engine, tokenizer) if args.data
               else passkey_batches(args, collate, g, cfg.seq_len_divisor, tokenizer))
    from tqdm import tqdm

    bar = tqdm(total=args.steps, disable=rank != 0, dynamic_ncols=True)
    t_start = time.perf_counter()
    for step, (batch, n) in enumerate(batches):
        t0 = time.perf_counter()
        # ---- the training step: this rank's 1/sp of every row in, the whole rows' loss out
        batch = {k: v.to(engine.device) for k, v in batch.items()}
        loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()
        # ----
        loss = loss.detach().float()
        dist.all_reduce(loss, group=g.dp_group)  # SP ranks agree already; mean over replicas
        loss = loss.item() / g.dp_size  # waits for the step: dt below is its real time
        dt = time.perf_counter() - t0
        rec = {"step": step + 1, "loss": loss, "seq_len": n,
               "lr": engine.get_lr()[0], "tokens_per_s": args.batch_size * n * g.dp_size / dt,
               "elapsed_s": time.perf_counter() - t_start}
        if torch.cuda.is_available():
            rec["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        if rank == 0:
            metrics.write(json.dumps(rec) + "\n")
            bar.set_postfix(loss=f"{rec['loss']:.3f}", len=n, tok_s=f"{rec['tokens_per_s']:.0f}")
            bar.update()
            if (step + 1) % args.log_every == 0:
                bar.write(f"step {step + 1:5d} | loss {rec['loss']:.4f} | len {n} | "
                          f"lr {rec['lr']:.2e} | {rec['tokens_per_s']:.0f} tok/s")
                metrics.flush()
        if (step + 1) % args.save_every == 0 or step + 1 == args.steps:
            sp_ds.save_checkpoint(engine, os.path.join(args.out, "checkpoints"))
    bar.close()
    result = {"train_s": time.perf_counter() - t_start}
    if torch.cuda.is_available():
        result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        if rank == 0:
            print(f"peak GPU memory {result['peak_gib']:.2f} GiB per GPU (rank 0)", flush=True)
    if not args.data:
        result.update(evaluate(engine, args, collate, tokenizer))
        if rank == 0:
            metrics.write(json.dumps({"step": args.steps, "eval": result}) + "\n")
            print(f"\npasskey accuracy by needle depth ({args.seq_len} tokens, "
                  f"{args.eval_per_depth} keys per depth, chance {10.0 ** -args.digits:g}):")
            print("| depth | " + " | ".join(result["by_depth"]) + " | all |")
            print("|---" * (len(DEPTHS) + 2) + "|")
            print("| accuracy | " + " | ".join(f"{a:.2f}" for a in result["by_depth"].values())
                  + f" | {result['accuracy']:.2f} |")
            print(f"digit accuracy {result['digit_accuracy']:.3f} (chance 0.1); "
                  f"trained {args.steps} steps in {result['train_s']:.0f} s")
    if rank == 0:
        metrics.close()
        _print_outputs(args)
    return result


def _print_outputs(args) -> None:
    """Where this run wrote what (rank 0, at the end)."""
    ckpt = os.path.join(args.out, "checkpoints")
    latest = os.path.join(ckpt, "latest")  # DeepSpeed names the newest tag there
    tag = open(latest).read().strip() if os.path.isfile(latest) else "none"
    print(f"\noutputs in {args.out}/:\n"
          f"  metrics.jsonl  one line per step (loss, row length, lr, tokens/s) + the evaluation\n"
          f"  args.json      this run's arguments and SP settings\n"
          f"  checkpoints/   DeepSpeed checkpoints, latest {tag} (sp_ds.load_checkpoint resumes)\n"
          f"plot: python -m seqpar_ring.plot {args.out}", flush=True)


def _worker(rank: int, world: int, port: int, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))  # no oversubscription
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(minutes=5))
    try:
        train(args)
    finally:
        dist.destroy_process_group()


def main(argv=None) -> None:
    args = parse_args(argv)
    if "RANK" in os.environ or "OMPI_COMM_WORLD_RANK" in os.environ:  # torchrun / deepspeed
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        if not dist.is_initialized():
            dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=5))
        train(args)
        return
    import torch.multiprocessing as mp

    with socket.socket() as s:  # no launcher: spawn the ranks ourselves, CPU + gloo
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(args.nproc, port, args), nprocs=args.nproc, join=True)


if __name__ == "__main__":
    main()
