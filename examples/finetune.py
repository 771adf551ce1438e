"""Long-context fine-tuning with sequence parallelism (ring attention) through DeepSpeed.

    python examples/finetune.py                       # 2 CPU processes (gloo), tiny random Llama,
                                                      # passkey retrieval at 1024 tokens, SP = 2
    torchrun --nproc_per_node 2 examples/finetune.py  # the same under a launcher
    python examples/finetune.py --preset h200         # one GPU: passkey at 32K tokens, then
                                                      # evaluated at 32K, 64K and 128K
    torchrun --nproc_per_node 2 examples/finetune.py --preset h200   # 2 GPUs, SP = 2
    deepspeed --num_gpus 8 examples/finetune.py --deepspeed_config configs/zero3_sp.json \\
        --model meta-llama/Meta-Llama-3-8B --seq-len 65536 --data my.jsonl   # see README.md

Every rank of an SP group holds 1/sp of each row's tokens (zigzag layout); attention passes
K/V around the ring, so the row is never whole on any rank. Without a launcher the script
spawns ``--nproc`` gloo processes itself (``--preset h200`` without a launcher: one process
on one GPU). Outputs in ``--out`` (a run dir): metrics.jsonl (one JSON per step and per
evaluated length), summary.json (per training stage and per evaluated length), checkpoints/
(engine.save_checkpoint), args.json. Plot it with ``python -m seqpar_ring.plot <run dir>``.
Evaluation and its tables: passkey_eval.py; schedules and the GPU preset: recipes.py.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import socket
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # examples/passkey.py, ...
import arg_checks  # noqa: E402
import passkey  # noqa: E402
from passkey_eval import (  # noqa: E402
    DEPTHS,
    environment,
    evaluate,
    log,
    passkey_data,
    preflight,
    print_eval,
    print_summary,
    stamp,
)
from recipes import PRESETS, lr_lambda, parse_stages, preset_ds_config, step_plan  # noqa: E402

from seqpar_ring import shutdown  # noqa: E402
from seqpar_ring.integrations import deepspeed as sp_ds  # noqa: E402
from seqpar_ring.integrations.hf import SPDataCollator, shard_dataloader  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help="defaults of a "
                   "GPU recipe (h200: one H200, passkey at 32K, evaluated at 32K/64K/128K); "
                   "flags given explicitly still win")
    p.add_argument("--model", default=None, help="HF model name or path (default: tiny random "
                   "Llama built from LlamaConfig, nothing downloaded)")
    p.add_argument("--data", default=None, help="your .jsonl ('text') / .txt data, packed into "
                   "rows (default: the synthetic passkey task)")
    p.add_argument("--out", default=None, help="run dir: metrics, checkpoints (default: "
                   "runs/passkey, or runs/<data file name> with --data)")
    p.add_argument("--seq-len", type=int, default=1024, help="tokens per row (all SP ranks)")
    p.add_argument("--batch-size", type=int, default=8, help="rows per step per SP group")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default 600; "
                   "with --stages: their sum)")
    p.add_argument("--stages", default=None, help="curriculum as LENxROWS:STEPS,... (rows of "
                   "LEN tokens, ROWS per step per SP group, for STEPS steps); replaces "
                   "--curriculum, --batch-size, --steps and --seq-len (the last LEN)")
    p.add_argument("--grad-accum", type=int, default=None, help="micro-batches per optimizer "
                   "step (default: the config's gradient_accumulation_steps)")
    p.add_argument("--lr", type=float, default=None, help="default: 3e-3 for the tiny model, "
                   "else the config's optimizer lr")
    p.add_argument("--warmup", type=int, default=30, help="linear LR warmup steps")
    p.add_argument("--curriculum", type=float, default=0.75, help="fraction of the steps on "
                   "shorter passkey rows (--seq-len/8, /4, /2); 0 = full length throughout")
    p.add_argument("--digits", type=int, default=4, help="passkey digits")
    p.add_argument("--eval-per-depth", type=int, default=16, help="eval rows per needle depth")
    p.add_argument("--eval-lens", default=None, help="comma-separated row lengths to evaluate "
                   "the final model at (default: --seq-len)")
    p.add_argument("--eval-batch-size", type=int, default=None, help="rows per eval forward "
                   "(default: --batch-size)")
    p.add_argument("--depths", default=None, help="comma-separated needle depths in [0, 1] "
                   "for the evaluation (default: 0,0.25,0.5,0.75,1)")
    p.add_argument("--hidden", type=int, default=64, help="tiny model: hidden size (MLP 2x)")
    p.add_argument("--layers", type=int, default=2, help="tiny model: decoder layers")
    p.add_argument("--heads", type=int, default=4, help="tiny model: attention heads")
    p.add_argument("--rope-theta", type=float, default=None, help="tiny model: RoPE base "
                   "(default: transformers' 10000)")
    p.add_argument("--fast-data", action=argparse.BooleanOptionalAction, default=False,
                   help="draw passkey rows with torch in one go (same task, another random "
                   "stream); per-token Python costs ~15 ms per 32K row")
    p.add_argument("--max-train-s", type=float, default=0.0, help="stop training after this "
                   "many seconds (then save and evaluate); 0 = no limit")
    p.add_argument("--preflight", action=argparse.BooleanOptionalAction, default=False,
                   help="before training, run one forward at the longest eval length "
                   "(fails fast on memory or kernel problems)")
    p.add_argument("--progress-bar", action=argparse.BooleanOptionalAction, default=None,
                   help="tqdm bar (default: only when stderr is a terminal; otherwise, and "
                   "with --no-progress-bar, a timestamped line every --log-every steps)")
    p.add_argument("--log-every", type=int, default=20, help="print a line every N steps")
    p.add_argument("--save-every", type=int, default=200, help="checkpoint every N steps "
                   "(+end); 0 = at the end only")
    p.add_argument("--nproc", type=int, default=2, help="processes to spawn without a launcher")
    p.add_argument("--seed", type=int, default=0, help="data and initialisation seed")
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # deepspeed
    p.add_argument("--deepspeed", action="store_true", help=argparse.SUPPRESS)  # launcher habit
    p.add_argument("--deepspeed_config", default=None, help="DeepSpeed JSON with a "
                   "sequence_parallel section (see configs/; default configs/cpu_gloo.json, "
                   "with --preset a built-in bf16 ZeRO-2 config)")
    sp_ds.add_argparse_args(p)  # --sequence-parallel-size, -layout, -attention, ... override it
    preset = p.parse_known_args(argv)[0].preset
    if preset:
        p.set_defaults(**PRESETS[preset])
    return resolve_args(p.parse_args(argv))


def _numbers(text: str, kind, flag: str) -> list:
    try:
        return [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"error: {flag} {text!r} must be comma-separated numbers") from None


def resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    """Derived settings and every check that needs no process group (fail before spawning)."""
    args.stage_list = parse_stages(args.stages) if args.stages else None
    if args.stage_list:
        if args.data:
            raise SystemExit("error: --stages is a passkey curriculum; with --data use "
                             "--seq-len/--batch-size/--steps")
        if args.steps is not None:
            raise SystemExit(f"error: --steps {args.steps} and --stages both set the step "
                             f"count; the stages add up to {sum(s[2] for s in args.stage_list)}"
                             ": change --stages")
        args.steps = sum(s[2] for s in args.stage_list)
        args.batch_size = max(s[1] for s in args.stage_list)  # DeepSpeed's micro batch
        args.seq_len = args.stage_list[-1][0]  # the length trained last is the one evaluated
    elif args.steps is None:
        args.steps = 600
    arg_checks.at_least({
        "--seq-len": (args.seq_len, 1), "--batch-size": (args.batch_size, 1),
        "--steps": (args.steps, 1), "--grad-accum": (args.grad_accum, 1),
        "--warmup": (args.warmup, 0), "--digits": (args.digits, 1),
        "--eval-per-depth": (args.eval_per_depth, 1), "--eval-batch-size":
        (args.eval_batch_size, 1), "--hidden": (args.hidden, 1), "--layers": (args.layers, 1),
        "--heads": (args.heads, 1), "--log-every": (args.log_every, 1),
        "--save-every": (args.save_every, 0), "--nproc": (args.nproc, 1)})
    if not 0.0 <= args.curriculum <= 1.0:
        arg_checks.fail(f"--curriculum {args.curriculum} must be a fraction in [0, 1]")
    if args.progress_bar is None:  # a bar only on a terminal: in a log file, the log lines
        args.progress_bar = sys.stderr.isatty()
    args.eval_len_list = (_numbers(args.eval_lens, int, "--eval-lens") if args.eval_lens
                          else [args.seq_len])
    args.depth_list = _numbers(args.depths, float, "--depths") if args.depths else DEPTHS
    if not args.depth_list or any(not 0.0 <= d <= 1.0 for d in args.depth_list):
        raise SystemExit(f"error: --depths {args.depths!r} must be values in [0, 1]")
    if args.hidden % args.heads:
        raise SystemExit(f"error: --hidden {args.hidden} is not a multiple of --heads "
                         f"{args.heads}")
    if args.out is None:  # the run is named after its data (the plot titles use the name)
        name = os.path.splitext(os.path.basename(args.data))[0] if args.data else "passkey"
        args.out = os.path.join("runs", name)
    return args


def check_launch(args, world: int, source: str) -> None:
    """The checks that need the world size (``source``: where it comes from) or a file, run
    in the launching process before any spawn, model or engine."""
    try:
        ds_cfg = deepspeed_config(args)
    except ValueError as e:  # a missing or malformed --deepspeed_config
        arg_checks.fail(str(e))
    cfg, ds = arg_checks.sp_config(args, ds_cfg)
    arg_checks.check_world(cfg, world, source, ds)
    if not args.stage_list:  # stages are checked by step_plan, naming --stages
        arg_checks.check_row_len("--seq-len", args.seq_len, cfg)
    for n in args.eval_len_list:
        arg_checks.check_row_len("--eval-lens", n, cfg)
    if args.data:
        try:
            passkey.read_documents(args.data)  # read again by the ranks; small next to training
        except ValueError as e:
            arg_checks.fail(str(e))
        return
    shortest = min(n for n, _ in step_plan(args, cfg.seq_len_divisor))
    if not args.model:  # the tiny vocabulary's rows (a real tokenizer's are checked per row)
        need = passkey.min_row_len(args.digits)
        hint = "" if args.stage_list or shortest == args.seq_len else (
            f" (the curriculum starts at --seq-len / 8: use --seq-len >= {8 * need} or "
            "--curriculum 0)")
        arg_checks.check_passkey_len("--seq-len" if not args.stage_list else "--stages",
                                     shortest, need, hint)
        arg_checks.check_passkey_len("--eval-lens", min(args.eval_len_list), need)


def build_model(args, vocab_size: int):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if args.model:  # attention_dropout must be 0 under SP (patch() checks it)
        model = AutoModelForCausalLM.from_pretrained(args.model, attention_dropout=0.0,
                                                     dtype=torch.bfloat16)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return model
    torch.manual_seed(args.seed)  # identical random weights on every rank
    hidden, heads = getattr(args, "hidden", 64), getattr(args, "heads", 4)
    theta = getattr(args, "rope_theta", None)
    rope = {"rope_parameters": {"rope_type": "default", "rope_theta": theta}} if theta else {}
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=getattr(args, "layers", 2), num_attention_heads=heads,
                      num_key_value_heads=heads, max_position_embeddings=max(
                          4096, args.seq_len, *getattr(args, "eval_len_list", [])),
                      use_cache=False, attention_dropout=0.0, tie_word_embeddings=False, **rope)
    model = LlamaForCausalLM(cfg)
    if theta:  # a transformers version that ignored the base would fail only at long range
        inv = model.model.rotary_emb.inv_freq.double()
        d = hidden // heads
        want = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
        if inv.shape != want.shape or not torch.allclose(inv, want, rtol=1e-4, atol=0.0):
            raise RuntimeError(f"rope_theta={theta:g} was not applied by this transformers "
                               f"version: inverse frequencies {inv[:3].tolist()}..., wanted "
                               f"{want[:3].tolist()}...")
    return model


def deepspeed_config(args) -> dict:
    if args.deepspeed_config is None and getattr(args, "preset", None):
        ds = preset_ds_config(args)
    else:
        ds = sp_ds.load_ds_config(args.deepspeed_config
                                  or os.path.join(ROOT, "configs", "cpu_gloo.json"))
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


def passkey_batches(args, collate: SPDataCollator, groups, plan, tokenizer):
    """Yields (this rank's shard, row length, rows). Rows are drawn per (step, DP replica): the
    SP ranks of a group draw the same rows and keep their own tokens."""
    for step, (n, rows) in enumerate(plan):
        seed = (args.seed * 7919 + step) * groups.dp_size + groups.dp_rank + 1
        if getattr(args, "fast_data", False) and tokenizer is None:
            b = passkey.passkey_batch(rows, n, args.digits, seed)
            yield collate.shard({"input_ids": b["input_ids"], "labels": b["labels"]}), n, rows
        else:
            ds = passkey_data(args, tokenizer, rows, n, seed=seed)
            yield collate([ds[i] for i in range(len(ds))]), n, rows


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
            yield batch, args.seq_len, args.batch_size
            step += 1
            if step == args.steps:
                return
        epoch += 1


def train(args) -> dict:
    rank = dist.get_rank()
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)  # keep the console to the progress bar and our lines
    tokenizer = None
    if args.model:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.model)
    ds_cfg = deepspeed_config(args)
    divisor = sp_ds.config_from_args(args, ds_cfg)[0].seq_len_divisor
    plan = None if args.data else step_plan(args, divisor)  # check_launch checked it
    vocab = len(passkey.VOCAB) if not args.data else passkey.BYTE_VOCAB
    model = build_model(args, vocab)
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
        log(f"engine ready: {environment(engine)}")
    if getattr(args, "preflight", False) and not args.data:
        preflight(engine, args, collate, tokenizer)
    metrics = open(os.path.join(args.out, "metrics.jsonl"), "w") if rank == 0 else None
    batches = (data_batches(args, engine, tokenizer) if args.data
               else passkey_batches(args, collate, g, plan, tokenizer))
    from tqdm import tqdm

    bar = tqdm(total=args.steps, disable=rank != 0 or not args.progress_bar, dynamic_ncols=True)
    say = bar.write if args.progress_bar else (lambda line: print(line, flush=True))
    stages: list[dict] = []
    step_s: list[float] = []
    cuda = engine.device.type == "cuda"
    t_start = time.perf_counter()
    done = 0
    for step, (batch, n, rows) in enumerate(batches):
        if not stages or (stages[-1]["seq_len"], stages[-1]["rows"]) != (n, rows):
            if stages:
                stages[-1]["tokens_per_s"] = _median_rate(stages[-1], step_s)
            step_s = []
            stages.append({"seq_len": n, "rows": rows, "steps": 0, "wall_s": 0.0})
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            if rank == 0:
                left = (len(list(itertools.takewhile((n, rows).__eq__, plan[step:])))
                        if plan else args.steps)
                bar.clear()
                log(f"stage {len(stages)}: rows of {n} tokens ({n // cfg.sp_size} per rank) x "
                    f"{rows} per step, steps {step + 1}-{step + left}")
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
        done = step + 1
        step_s.append(dt)
        st = stages[-1]
        st.update(steps=st["steps"] + 1, wall_s=st["wall_s"] + dt, last_loss=loss)
        rec = {"step": done, "loss": loss, "seq_len": n,
               "lr": engine.get_lr()[0], "tokens_per_s": rows * n * g.dp_size / dt,
               "elapsed_s": time.perf_counter() - t_start}
        if cuda:
            rec["peak_gib"] = st["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        if rank == 0:
            metrics.write(json.dumps(rec) + "\n")
            bar.set_postfix(loss=f"{rec['loss']:.3f}", len=n, tok_s=f"{rec['tokens_per_s']:.0f}")
            bar.update()
            if done % args.log_every == 0:
                say(f"{stamp()} step {done:5d} | "
                    f"loss {rec['loss']:.4f} | len {n} x {rows} | lr {rec['lr']:.2e} | "
                    f"{rec['tokens_per_s']:,.0f} tok/s"
                    + (f" | peak {rec['peak_gib']:.2f} GiB" if cuda else ""))
                metrics.flush()
        if (args.save_every and done % args.save_every == 0) or done == args.steps:
            sp_ds.save_checkpoint(engine, os.path.join(args.out, "checkpoints"))
        if args.max_train_s and done < args.steps and _over_budget(engine, t_start, args):
            if rank == 0:
                bar.clear()
                log(f"WARNING: --max-train-s {args.max_train_s:g} reached after step {done} of "
                    f"{args.steps} (rows of {n} tokens): stopping, saving, evaluating")
            sp_ds.save_checkpoint(engine, os.path.join(args.out, "checkpoints"))
            break
    bar.close()
    if stages:
        stages[-1]["tokens_per_s"] = _median_rate(stages[-1], step_s)
    result = {"train_s": time.perf_counter() - t_start, "steps_done": done, "stages": stages}
    if rank == 0:
        log(f"training done: {done} steps in {result['train_s']:.1f} s")
    if cuda:
        result["peak_gib"] = max(st.get("peak_gib", 0.0) for st in stages)
        if rank == 0:
            print(f"peak GPU memory {result['peak_gib']:.2f} GiB per GPU (rank 0)", flush=True)
    evals = []
    if not args.data:
        for n in args.eval_len_list:
            if rank == 0:
                log(f"evaluating at {n} tokens per row ({len(args.depth_list)} depths x "
                    f"{args.eval_per_depth} keys, {n // cfg.sp_size} tokens per rank)")
            res = evaluate(engine, args, collate, tokenizer, seq_len=n)
            evals.append(res)
            if rank == 0:
                metrics.write(json.dumps({"step": done, "eval": res}) + "\n")
                metrics.flush()
                print_eval(args, res, result["train_s"], done)
        result.update(evals[0])  # the training length's figures at the top level
        result["evals"] = evals
    if rank == 0:
        metrics.close()
        with open(os.path.join(args.out, "summary.json"), "w") as f:
            json.dump(result, f, indent=1)
        print_summary(stages, evals)
        _print_outputs(args)
    return result


def _median_rate(stage: dict, step_s: list[float]) -> float:
    return stage["rows"] * stage["seq_len"] / sorted(step_s)[len(step_s) // 2]


def _over_budget(engine, t_start: float, args) -> bool:
    """Every rank must stop at the same step (else a collective hangs): rank 0's clock decides."""
    flag = torch.tensor([float(time.perf_counter() - t_start > args.max_train_s)],
                        device=engine.device)
    dist.broadcast(flag, src=0)
    return bool(flag.item())


def _print_outputs(args) -> None:
    """Where this run wrote what (rank 0, at the end)."""
    ckpt = os.path.join(args.out, "checkpoints")
    latest = os.path.join(ckpt, "latest")  # DeepSpeed names the newest tag there
    tag = open(latest).read().strip() if os.path.isfile(latest) else "none"
    print(f"\noutputs in {args.out}/:\n"
          f"  metrics.jsonl  one line per step (loss, row length, lr, tokens/s) + one per "
          f"evaluated length\n"
          f"  summary.json   training per stage and the evaluations (accuracy by depth, "
          f"tokens/s, peak memory)\n"
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
    except BaseException:
        shutdown(wait=False)  # a peer may never arrive: tear down at once
        raise
    shutdown()  # every rank arrives before any tears the groups down


def _check_gpus(args) -> None:
    """The GPU preset fails here, before any model or DeepSpeed work, if the machine is off."""
    if not torch.cuda.is_available():
        raise SystemExit(f"error: --preset {args.preset} needs CUDA GPUs and torch found none "
                         f"(torch {torch.__version__}); on CPU run without --preset")
    need = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if torch.cuda.device_count() < need:
        raise SystemExit(f"error: {need} processes per node but {torch.cuda.device_count()} "
                         "visible GPUs: launch one process per GPU")
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))  # no context on GPU 0
    if not torch.cuda.is_bf16_supported():
        raise SystemExit(f"error: --preset {args.preset} trains in bf16, which "
                         f"{torch.cuda.get_device_name()} does not support")


def main(argv=None) -> None:
    args = parse_args(argv)
    launched = "RANK" in os.environ or "OMPI_COMM_WORLD_RANK" in os.environ
    if args.preset:
        if not launched:  # one GPU, this process: a world of one, no launcher needed
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
                              RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
            launched = True
        _check_gpus(args)
    check_launch(args, *arg_checks.world_size(args.nproc))
    if launched:  # torchrun / deepspeed
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        if not dist.is_initialized():
            dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=5))
        try:
            train(args)
        except BaseException:
            shutdown(wait=False)  # a peer may never arrive: tear down at once
            raise
        shutdown()  # every rank arrives before any tears the groups down
        return
    import torch.multiprocessing as mp

    port = _free_port()  # no launcher: spawn the ranks ourselves, CPU + gloo
    mp.spawn(_worker, args=(args.nproc, port, args), nprocs=args.nproc, join=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    main()
