"""Evaluation of the passkey fine-tune (examples/finetune.py): accuracy by needle depth at
any row length, run under sequence parallelism exactly like training (same engine, collator
and SP groups), with wall time, tokens/s and peak GPU memory; the run's summary tables.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

import passkey
from seqpar_ring.integrations.hf import SPDataCollator

DEPTHS = [0.0, 0.25, 0.5, 0.75, 1.0]
_T0 = time.time()


def stamp() -> str:
    """Wall clock and seconds since start: partial runs stay readable."""
    return f"[{time.strftime('%H:%M:%S')} +{time.time() - _T0:6.1f}s]"


def log(msg: str) -> None:
    print(f"{stamp()} {msg}", flush=True)


def passkey_data(args, tokenizer, size: int, seq_len: int, seed: int, depths=None):
    """The tiny-vocabulary passkey rows, or the same task in words for a real tokenizer."""
    if tokenizer is None:
        return passkey.PasskeyDataset(size, seq_len, args.digits, seed, depths)
    return passkey.TextPasskeyDataset(tokenizer, size, seq_len, args.digits, seed, depths)


def _eval_rows(args, tokenizer, collate, seq_len: int, depths: list, idx: list) -> dict:
    """Full rows ``idx`` of the evaluation at ``seq_len`` (row i has depth i % len(depths)),
    sharded for this rank. Deterministic, so every length and run sees the same keys."""
    seed = 10**6 + args.seed
    if getattr(args, "fast_data", False) and tokenizer is None:
        b = passkey.passkey_batch(len(idx), seq_len, args.digits, seed * 1_000_003 + idx[0],
                                  [depths[i % len(depths)] for i in idx])
        return collate.shard({"input_ids": b["input_ids"], "labels": b["labels"]})
    ds = passkey_data(args, tokenizer, idx[-1] + 1, seq_len, seed=seed, depths=depths)
    return collate([ds[i] for i in idx])


def _score(engine, batch: dict, groups) -> torch.Tensor:
    """(rows, 2) float64: wrong answer tokens and answer tokens of each full row. Only the
    answer positions get logits (a 128K row of a real vocabulary would not fit otherwise)."""
    batch = {k: v.to(engine.device) for k, v in batch.items()}
    labels = batch.pop("shift_labels")
    batch.pop("labels", None)  # no loss
    keep = (labels != passkey.IGNORE).any(0).nonzero().flatten()  # may be empty on a rank
    logits = engine(**batch, logits_to_keep=keep).logits
    labels = labels[:, keep]
    answer = labels != passkey.IGNORE
    counts = torch.stack([((logits.argmax(-1) != labels) & answer).sum(1),
                          answer.sum(1)], 1).double()
    dist.all_reduce(counts, group=groups.sp_group)  # digits of one key may sit on other ranks
    return counts


def _sync(engine) -> None:
    if torch.cuda.is_available() and engine.device.type == "cuda":
        torch.cuda.synchronize()


def _peak_gib(engine) -> float | None:
    """Peak allocated GPU memory since the last reset, max over all ranks (None on CPU)."""
    if not (torch.cuda.is_available() and engine.device.type == "cuda"):
        return None
    peak = torch.tensor([torch.cuda.max_memory_allocated() / 2**30], device=engine.device)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    return peak.item()


@torch.no_grad()
def evaluate(engine, args, collate: SPDataCollator, tokenizer=None, seq_len=None) -> dict:
    """Passkey accuracy by needle depth at ``seq_len`` (default --seq-len), under SP exactly as
    in training (teacher forced: a key counts when every digit is the argmax, which is what
    greedy decoding would produce). Also the wall time, tokens/s and peak GPU memory."""
    g = engine.seqpar_groups
    seq_len = seq_len or args.seq_len
    depths = getattr(args, "depth_list", DEPTHS)
    bsz = getattr(args, "eval_batch_size", None) or args.batch_size
    n_rows = len(depths) * args.eval_per_depth
    # rows, keys right, tokens right, tokens per depth; on the engine's device (NCCL needs it)
    stats = torch.zeros(len(depths), 4, dtype=torch.float64, device=engine.device)
    engine.eval()
    if engine.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    _sync(engine)
    t0 = time.perf_counter()
    for start in range(g.dp_rank * bsz, n_rows, g.dp_size * bsz):
        idx = list(range(start, min(start + bsz, n_rows)))
        counts = _score(engine, _eval_rows(args, tokenizer, collate, seq_len, depths, idx), g)
        for i, (wrong, total) in zip(idx, counts.tolist()):
            stats[i % len(depths)] += torch.tensor(
                [1.0, wrong == 0, total - wrong, total], dtype=stats.dtype, device=stats.device)
    dist.all_reduce(stats, group=g.dp_group)
    _sync(engine)
    dt = time.perf_counter() - t0
    engine.train()
    by_depth = {f"{d:g}": stats[j, 1].item() / stats[j, 0].item() for j, d in enumerate(depths)}
    out = {"seq_len": seq_len, "accuracy": stats[:, 1].sum().item() / stats[:, 0].sum().item(),
           "digit_accuracy": stats[:, 2].sum().item() / stats[:, 3].sum().item(),
           "by_depth": by_depth, "rows": n_rows, "eval_s": dt,
           "tokens_per_s": n_rows * seq_len / dt}
    peak = _peak_gib(engine)
    if peak is not None:
        out["peak_gib"] = peak
    return out


@torch.no_grad()
def preflight(engine, args, collate, tokenizer) -> None:
    """One forward of one row at the longest eval length before training: a memory or kernel
    problem there fails now, not after the training minutes."""
    g, n = engine.seqpar_groups, max(args.eval_len_list)
    engine.eval()
    if engine.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    _sync(engine)
    t0 = time.perf_counter()
    _score(engine, _eval_rows(args, tokenizer, collate, n, [0.5], [g.dp_rank]), g)
    _sync(engine)
    dt, peak = time.perf_counter() - t0, _peak_gib(engine)
    engine.train()
    if dist.get_rank() == 0:
        log(f"preflight: one {n}-token row forward in {dt:.2f} s (first call, kernel set-up "
            f"included){'' if peak is None else f', peak {peak:.2f} GiB'}: ok")


def print_eval(args, res: dict, train_s: float, steps: int) -> None:
    log(f"passkey accuracy by needle depth ({res['seq_len']} tokens, {args.eval_per_depth} "
        f"keys per depth, chance {10.0 ** -args.digits:g}):")
    print("| depth | " + " | ".join(res["by_depth"]) + " | all |")
    print("|---" * (len(res["by_depth"]) + 2) + "|")
    print("| accuracy | " + " | ".join(f"{a:.2f}" for a in res["by_depth"].values())
          + f" | {res['accuracy']:.2f} |")
    print(f"digit accuracy {res['digit_accuracy']:.3f} (chance 0.1); "
          f"trained {steps} steps in {train_s:.0f} s")
    mem = f", peak {res['peak_gib']:.2f} GiB per GPU" if "peak_gib" in res else ""
    print(f"evaluation: {res['rows']} rows in {res['eval_s']:.1f} s, "
          f"{res['tokens_per_s']:,.0f} tokens/s{mem}", flush=True)


def print_summary(stages: list, evals: list) -> None:
    """The tables of a run: training per stage, evaluation per length."""
    print("\n| stage | tokens per row | rows per step | steps | wall s | tokens/s (median) "
          "| peak GiB | last loss |\n|---|---|---|---|---|---|---|---|")
    for i, st in enumerate(stages, 1):
        print(f"| {i} | {st['seq_len']} | {st['rows']} | {st['steps']} | {st['wall_s']:.1f} | "
              f"{st['tokens_per_s']:,.0f} | {_gib(st)} | "
              f"{st['last_loss']:.4f} |")
    if evals:
        depths = list(evals[0]["by_depth"])
        print("\n| eval tokens per row | accuracy | digit acc. | " + " | ".join(
            f"depth {d}" for d in depths) + " | tokens/s | peak GiB | wall s |")
        print("|---" * (len(depths) + 6) + "|")
        for e in evals:
            print(f"| {e['seq_len']} | {e['accuracy']:.2f} | {e['digit_accuracy']:.3f} | "
                  + " | ".join(f"{e['by_depth'][d]:.2f}" for d in depths)
                  + f" | {e['tokens_per_s']:,.0f} | {_gib(e)} | "
                  f"{e['eval_s']:.1f} |")
    print(flush=True)


def _gib(rec: dict) -> str:
    return f"{rec['peak_gib']:.2f}" if "peak_gib" in rec else "-"


def environment(engine) -> str:
    """GPU, versions and the attention kernel the ring will run."""
    import deepspeed
    import transformers

    from seqpar_ring.kernels import select_kernel

    dtype = next(engine.module.parameters()).dtype
    kernel = select_kernel(engine.seqpar_config.kernel,
                           torch.empty(1, 1, 1, 1, device=engine.device, dtype=dtype)).name
    dev = (f"{torch.cuda.get_device_name(engine.device)} "
           f"({torch.cuda.get_device_properties(engine.device).total_memory / 2**30:.0f} GiB)"
           if engine.device.type == "cuda" else "CPU")
    return (f"{dev} x {dist.get_world_size()}; torch {torch.__version__}, transformers "
            f"{transformers.__version__}, deepspeed {deepspeed.__version__}; {dtype}, "
            f"attention kernel {kernel}")
