"""End-to-end training benchmark: HF Llama-architecture model, DeepSpeed ZeRO, SP = world.

    torchrun --nproc_per_node 2 -m seqpar_ring.bench e2e --impl seqpar alst \
        --seq 65536 262144 1048576 --find-max --out e2e.json --plot

Per implementation, one model with random weights (``--model`` preset of seqpar_ring.tools.plan,
default llama-1.1b), bf16, DeepSpeed ZeRO-3, gradient checkpointing, one sample per step:

* ``seqpar``: ours — ``integrations.hf.patch`` (ring attention), engine from
  ``integrations.deepspeed.initialize``, the tiled loss of ``integrations.hf_tiled`` (decoder
  forward, then ``TiledLMHead(hidden, shift_labels)``). ``--ulysses-size u`` runs it as
  Ulysses x ring (u = world: all-to-all only); ``auto`` lets the planner choose for the first
  ``--seq``.
* ``alst``: DeepSpeed's Ulysses (``UlyssesSPAttentionHF.register_with_transformers`` over
  SDPA) + its ``TiledFusedLogitsLoss``, the same model, config and machine.

Each point reports tokens/s, peak allocated GiB (max over ranks), peak host GiB per rank and
the planner's estimates; a failure (OOM or anything else) is caught, reported in the table and
the engine rebuilt. ``--find-max`` with ring attention doubles the length until a step fails or
exceeds ``--budget-s``, then bisects; with ``--attention dilated`` it runs the reach
demonstration of ``bench/reach.py`` (a dilated step at the planner's longest dense length, a
dense attention layer at that length, the planner's dense figure).

Reach options (ours only): ``--activation-offload on`` (checkpointed layer inputs in pinned
host memory), ``both`` (each point without, then with, on the same engine: the offload's
throughput cost), ``--tiled-mlp``; ``--recompute-attention off`` keeps each layer's attention
across the checkpoint's recomputation, ``both`` measures every point recomputing, then keeping,
on the same engine. CPU smoke test:
``torchrun --nproc_per_node 2 -m seqpar_ring.bench e2e --model tiny --seq 256 512``.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import time
import traceback
from dataclasses import replace

import torch
import torch.distributed as dist

from seqpar_ring.groups import shutdown
from seqpar_ring.tools import plan as planner

from . import reach
from .common import SHARED, init_from_env, peak_gib, print_table, reset_peak, sync, write_json

COLUMNS = ["impl", "offload", "attention", "seq_len", "tokens_per_s", "step_s", "peak_gib",
           "plan_gib", "host_gib", "plan_host_gib", "loss", "status"]


def ds_config(a, world: int, cuda: bool) -> dict:
    # DeepSpeed's fused Adam is a CUDA extension built on first use (nvcc, minutes): only on
    # dedicated GPUs, where the figures are compared with earlier runs. On CPU, and when ranks
    # share a GPU (a debugging setup), torch's AdamW.
    fused = cuda and (a.adam == "fused" or (a.adam == "auto" and not SHARED))
    opt = {"lr": 1e-5} if fused else {"lr": 1e-5, "torch_adam": True}
    return {
        "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
        "sequence_parallel_size": world, "gradient_clipping": 1.0,
        "steps_per_print": 10**9, "bf16": {"enabled": a.dtype == "bf16"},
        "optimizer": {"type": "AdamW", "params": opt},
        "zero_optimization": {"stage": a.zero, "reduce_bucket_size": a.bucket,
                              "stage3_prefetch_bucket_size": a.bucket},
    }


def build_model(spec: planner.ModelSpec, dtype: torch.dtype, attn: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=spec.hidden, num_hidden_layers=spec.layers,
                      num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads,
                      intermediate_size=spec.intermediate, vocab_size=spec.vocab,
                      head_dim=spec.d, tie_word_embeddings=spec.tied, attention_dropout=0.0,
                      max_position_embeddings=2**24, use_cache=False)
    torch.manual_seed(0)  # same random weights on every rank
    model = LlamaForCausalLM._from_config(cfg, attn_implementation=attn, dtype=dtype)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return model.train()


class Impl:
    """One implementation's engine; ``step(batch)`` = forward + backward + optimizer step."""

    divisor = 1

    def __init__(self, a, spec, world, rank, dev):
        self.a, self.spec, self.world, self.rank, self.dev = a, spec, world, rank, dev
        self.engine = None
        self.host = reach.HostPeak(dev)

    def offload(self):
        """Our ActivationOffload on the engine's model (None: not installed)."""
        return None

    def keep(self):
        """Our KeepAttention switch on the engine's model (None: attention is recomputed)."""
        return None

    def teardown(self) -> None:
        if self.engine is not None and hasattr(self.engine, "destroy"):
            self.engine.destroy()
        self.engine = None
        gc.collect()
        if self.dev.type == "cuda":
            torch.cuda.empty_cache()

    def batch(self, seq: int) -> dict:
        g = torch.Generator().manual_seed(seq)
        ids = torch.randint(0, self.spec.vocab, (1, seq), generator=g)
        from seqpar_ring.layout import shard_batch

        b = shard_batch({"input_ids": ids, "labels": ids}, self.world, self.rank, self.layout,
                        ulysses_size=getattr(self, "ulysses", 1))
        return {k: b[k].to(self.dev) for k in ("input_ids", "position_ids", "shift_labels")}


class SeqPar(Impl):
    def setup(self) -> None:
        from seqpar_ring.config import SeqParConfig
        from seqpar_ring.integrations.deepspeed import initialize as ds_initialize
        from seqpar_ring.integrations.hf_tiled import use_tiled_lm_head

        a = self.a
        section = {"size": self.world, "attention": a.attention,
                   "kernel": a.kernel, "activation_offload": a.activation_offload != "off",
                   "tiled_mlp": a.tiled_mlp,
                   "recompute_attention": a.recompute_attention == "on"}
        if a.attention == "dilated":
            section.update(segment_lengths=a.segments, dilation_rates=a.rates)
        if a.layout is not None:  # else the config's default for the attention
            section["layout"] = a.layout
        cfg = SeqParConfig.from_dict({k: v for k, v in section.items() if k != "size"}
                                     | {"sp_size": self.world, "ulysses_size": a.ulysses_size})
        cfg = planner.resolve_ulysses_size(cfg, seq_len=a.seq[0] if a.seq else None,
                                           heads=self.spec.heads, kv_heads=self.spec.kv_heads,
                                           head_dim=self.spec.d)
        section["ulysses_size"] = self.ulysses = cfg.ulysses_size
        if self.rank == 0:
            print(f"seqpar: ulysses_size {a.ulysses_size} -> {cfg.ulysses_size}", flush=True)
        self.layout, self.divisor = cfg.layout, cfg.seq_len_divisor
        model = build_model(self.spec, a.torch_dtype, "sdpa")
        use_tiled_lm_head(model, a.loss_tile)  # before ZeRO-3 hooks are attached
        config = {**ds_config(a, self.world, self.dev.type == "cuda"),
                  "sequence_parallel": section}
        self.engine = ds_initialize(model=model, config=config,
                                    model_parameters=model.parameters())[0]

    def offload(self):
        from seqpar_ring.integrations.hf_reach import get_activation_offload

        return None if self.engine is None else get_activation_offload(self.engine.module)

    def keep(self):
        from seqpar_ring.integrations import hf_recompute

        return None if self.engine is None else hf_recompute.get(self.engine.module)

    def step(self, b: dict) -> float:
        from seqpar_ring.integrations.hf_tiled import tiled_causal_lm_loss

        loss = tiled_causal_lm_loss(self.engine.module, b, self.engine.seqpar_groups)
        self.engine.backward(loss)
        self.engine.step()
        return loss.item()


class ALST(Impl):
    layout = "contiguous"

    def setup(self) -> None:
        import deepspeed
        from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        self.divisor = self.world
        deepspeed.init_distributed()  # ALST's mpu asserts deepspeed.comm is up (joins torch's)
        self._sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]  # ALST overrides it globally: restored
        model = build_model(self.spec, self.a.torch_dtype, "sdpa")
        mpu = UlyssesSPAttentionHF.register_with_transformers(
            model_name_or_path=model, core_attn_implementation="sdpa",
            sequence_parallel_size=self.world, micro_batch_size=1, seq_length_is_variable=True)
        self.group = mpu.get_sequence_parallel_group() if mpu is not None else None
        self.engine = deepspeed.initialize(
            model=model, config=ds_config(self.a, self.world, self.dev.type == "cuda"),
            model_parameters=model.parameters(), mpu=mpu)[0]

    def teardown(self) -> None:
        super().teardown()
        if hasattr(self, "_sdpa"):
            from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

            ALL_ATTENTION_FUNCTIONS["sdpa"] = self._sdpa

    def step(self, b: dict) -> float:
        from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledFusedLogitsLoss

        module = self.engine.module
        hidden = module.model(input_ids=b["input_ids"], position_ids=b["position_ids"],
                              use_cache=False).last_hidden_state
        y = b["shift_labels"]
        tile = self.a.loss_tile or planner.default_tile_size(self.spec.vocab)
        shards = max(1, math.ceil(y.numel() / tile))

        def loss_fn(mod, x, labels):  # sum of token losses of one shard
            logits = mod.lm_head(x).float()
            return torch.nn.functional.cross_entropy(
                logits.view(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100,
                reduction="sum")

        total = TiledFusedLogitsLoss.apply(loss_fn, module, hidden, y, None, shards,
                                           [module.lm_head.weight], "sum")
        count = (y != -100).sum().float()
        if self.group is not None:
            dist.all_reduce(count, group=self.group)
        loss = total / count.clamp(min=1)  # this rank's share of the token mean
        self.engine.backward(loss)
        self.engine.step()
        shown = loss.detach().clone()
        if self.group is not None:
            dist.all_reduce(shown, group=self.group)
        return shown.item()


IMPLS = {"seqpar": SeqPar, "alst": ALST}


def _agree_failed(failed: bool, dev) -> bool:
    """Every rank learns whether any rank failed (so all rebuild together)."""
    if not dist.is_initialized():
        return failed
    flag = torch.tensor([float(failed)], device=dev)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def run_point(impl: Impl, seq: int, a, *, steps: int, offload: bool | None = None,
              keep: bool | None = None) -> dict:
    """Warm-up step + up to ``steps`` timed steps within ``a.budget_s``; errors become rows.

    ``offload`` / ``keep``: switch our activation offload / kept attention on or off for this
    point (None: as configured).
    """
    off, kept = impl.offload(), impl.keep()
    if off is not None and offload is not None:
        off.enabled = offload
    if kept is not None and keep is not None:
        kept.enabled = keep
    on = off is not None and off.enabled
    keeping = kept is not None and kept.enabled
    ours = a.impl_name == "seqpar"
    row = {"impl": a.impl_name, "seq_len": seq, "status": "ok", "world": impl.world,
           "offload": ("on" if on else "off") if ours else None,
           "attention": ("kept" if keeping else "recomputed") if ours else None}
    o = replace(reach.plan_options(impl, a, offload=on), keep_attention=keeping)
    if seq % planner.seq_divisor(o) == 0:
        pl = planner.estimate(impl.spec, seq, o)
        row.update(plan_gib=pl.peak_gib, plan_host_gib=pl.host_gib)
    err, peaks = None, None
    try:
        if seq % impl.divisor:
            raise ValueError(f"seq_len must be a multiple of {impl.divisor}")
        b = impl.batch(seq)
        reset_peak(impl.dev)
        impl.host.reset()
        if off is not None:
            off.stats.reset_peak()
        t0 = time.perf_counter()
        # the same batch every step: the losses must fall (a training sanity check on GPU)
        losses = [impl.step(b)]  # warm-up (the only step when it alone exhausts the budget)
        sync(impl.dev)
        first = time.perf_counter() - t0
        times = []
        while len(times) < steps and sum(times) + first < a.budget_s:
            sync(impl.dev)
            t0 = time.perf_counter()
            losses.append(impl.step(b))
            sync(impl.dev)
            times.append(time.perf_counter() - t0)
        step_s = statistics.median(times) if times else first
        host = impl.host.read()
        peaks = [peak_gib(impl.dev), host.pop("host_gib"),
                 off.stats.host_peak_bytes / 2**30 if on else 0.0]
        row.update(step_s=step_s, tokens_per_s=seq / step_s, loss=losses[-1], losses=losses,
                   timed_steps=len(times) or 1, **host)
        if not times and steps > 0:
            row["status"] = "warm-up only (budget)"
    except Exception as e:  # noqa: BLE001 - any failure is a table row, not a crashed run
        err = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
    if _agree_failed(err is not None, impl.dev):
        row["status"] = err or "failed on another rank"
        impl.teardown()
        impl.setup()
    else:  # every rank has its peaks: the per-GPU / per-rank figure is the largest
        keys = ("peak_gib", "host_gib", "offload_host_gib")
        row.update(zip(keys, reach.all_ranks_max(peaks, impl.dev)))
    return row


def find_max(impl: Impl, a) -> tuple[int, list[dict]]:
    """Doubling then bisection over multiples of the divisor; returns (longest ok, rows).

    Dilated attention (ours): the reach demonstration of ``bench/reach.py`` instead.
    """
    if a.impl_name == "seqpar" and a.attention == "dilated":
        best, rows, summary = reach.find_max(impl, a, run_point)
        a.reach_summary = summary
        return best, rows
    rows, good, bad = [], 0, None
    seq = a.find_start
    while seq <= a.find_limit:
        r = run_point(impl, seq, a, steps=1)
        rows.append(r)
        if r["status"] != "ok":
            bad = seq
            break
        good = seq
        if r["step_s"] > a.budget_s:
            break  # the next doubling would take too long
        seq *= 2
    div = impl.divisor * a.find_resolution
    while bad is not None and good and bad - good > div:
        mid = (good + bad) // 2 // div * div
        if mid <= good:
            break
        r = run_point(impl, mid, a, steps=1)
        rows.append(r)
        good, bad = (mid, bad) if r["status"] == "ok" else (good, mid)
    return good, rows


def plot(json_path: str, prefix: str | None = None) -> list[str]:
    """Memory and tokens/s vs sequence length PNGs from the JSON (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot: matplotlib is not installed (pip install seqpar_ring[plot])")
        return []
    with open(json_path) as f:
        rows = [r for r in json.load(f)["rows"] if r.get("peak_gib") is not None]
    prefix = prefix or json_path.rsplit(".", 1)[0]
    written = []
    for key, label in (("peak_gib", "peak GiB per GPU"), ("tokens_per_s", "tokens/s")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for impl in sorted({r["impl"] for r in rows}):
            pts = sorted((r["seq_len"], r[key]) for r in rows if r["impl"] == impl)
            ax.plot(*zip(*pts), marker="o", label=impl)
            if key == "peak_gib":
                est = sorted((r["seq_len"], r["plan_gib"]) for r in rows
                             if r["impl"] == impl and r.get("plan_gib") is not None)
                ax.plot(*zip(*est), ls="--", alpha=0.6, label=f"{impl} (planner)")
        ax.set(xscale="log", xlabel="sequence length (tokens)", ylabel=label)
        ax.legend()
        fig.tight_layout()
        path = f"{prefix}_{key}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    print("wrote " + ", ".join(written))
    return written


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m seqpar_ring.bench e2e", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--impl", nargs="+", default=["seqpar", "alst"], choices=sorted(IMPLS))
    p.add_argument("--model", default="llama-1.1b",
                   help="preset of seqpar_ring.tools.plan or a config.json")
    p.add_argument("--seq", type=int, nargs="*", default=[65536, 262144, 1048576])
    p.add_argument("--steps", type=int, default=3, help="timed steps per point after its "
                   "warm-up step; 0: the point's first step is the measurement (use with "
                   "--warmup-seq)")
    p.add_argument("--warmup-seq", type=int, default=0, help="one unreported step at this "
                   "length after each engine is built (0: none)")
    p.add_argument("--budget-s", type=float, default=300.0, help="time budget per point")
    p.add_argument("--find-max", action="store_true")
    p.add_argument("--find-start", type=int, default=131072)
    p.add_argument("--find-limit", type=int, default=2**24)
    p.add_argument("--find-resolution", type=int, default=1024,
                   help="bisection stops at this many multiples of the length divisor")
    p.add_argument("--dtype", default=None, choices=("bf16", "fp32"),
                   help="default bf16 on GPU, fp32 on CPU")
    p.add_argument("--zero", type=int, default=3, choices=(0, 1, 2, 3))
    p.add_argument("--bucket", type=int, default=50_000_000, help="ZeRO bucket sizes")
    p.add_argument("--attention", default="ring", choices=("ring", "dilated"))
    p.add_argument("--segments", type=int, nargs="*", default=[])
    p.add_argument("--rates", type=int, nargs="*", default=[])
    p.add_argument("--layout", default=None, choices=("contiguous", "zigzag"),
                   help="default: zigzag for ring attention, contiguous for dilated")
    p.add_argument("--kernel", default="auto")
    from seqpar_ring.integrations.ds_config import int_or_auto

    p.add_argument("--ulysses-size", type=int_or_auto, default=1,
                   help="seqpar only: Ulysses factor u of the SP group (world = u x ring), or "
                   "'auto' (planner, for the first --seq)")
    p.add_argument("--loss-tile", type=int, default=None)
    p.add_argument("--activation-offload", default="off", choices=("off", "on", "both"),
                   help="ours: checkpointed layer inputs in pinned host memory; both: every "
                   "point without, then with, on the same engine")
    p.add_argument("--tiled-mlp", action=argparse.BooleanOptionalAction, default=False,
                   help="ours: decoder MLPs over sequence tiles")
    p.add_argument("--gpu-mem-gib", type=float, default=None,
                   help="GPU memory the planner plans for (default: the device's)")
    p.add_argument("--host-mem-gib", type=float, default=None,
                   help="host memory per rank the planner plans for (default: this machine's "
                   "memory or cgroup limit / local ranks)")
    p.add_argument("--host-reserve-gib", type=float, default=planner.PlanOptions.host_reserve_gib,
                   help="planner: host memory of the process besides offloaded tensors")
    p.add_argument("--adam", default="auto", choices=("auto", "fused", "torch"),
                   help="optimizer: DeepSpeed's fused Adam (auto: on dedicated GPUs) or torch's")
    p.add_argument("--recompute-attention", default="on", choices=("on", "off", "both"),
                   help="ours: off keeps each layer's attention across the checkpoint's "
                   "recomputation (recompute_attention=false); both: every point recomputing, "
                   "then keeping, on the same engine")
    p.add_argument("--out", default="e2e.json")
    p.add_argument("--plot", action="store_true", help="also write PNGs (rank 0)")
    return p


def option_costs(rows: list[dict]) -> list[str]:
    """'tokens/s without -> with' activation offload, and recomputed -> kept attention, for
    every length measured both ways (the other option the same)."""
    lines = []
    for key, before, after, what in (("offload", "off", "on", "activation offload"),
                                     ("attention", "recomputed", "kept", "kept attention")):
        other = "attention" if key == "offload" else "offload"
        for r in rows:
            if r.get(key) != before or r.get("status") != "ok":
                continue
            for w in rows:
                if (w.get(key), w.get(other), w.get("seq_len"), w.get("impl"),
                        w.get("status")) == (after, r.get(other), r["seq_len"], r["impl"], "ok"):
                    gain = w["tokens_per_s"] / r["tokens_per_s"] - 1
                    peaks = (r.get("peak_gib"), w.get("peak_gib"))
                    mem = ("" if any(p is None or math.isnan(p) for p in peaks) else
                           f", peak GPU {peaks[0]:.1f} -> {peaks[1]:.1f} GiB")  # nan: on CPU
                    lines.append(f"{what} at {r['seq_len']:,} tokens: "
                                 f"{r['tokens_per_s']:,.0f} -> {w['tokens_per_s']:,.0f} tokens/s "
                                 f"({100 * gain:+.1f}%){mem}")
    return lines


def main(argv: list[str] | None = None) -> None:
    a = build_parser().parse_args(argv)
    rank, world, dev = init_from_env(single_process_group=True)  # DeepSpeed needs a group
    a.dtype = a.dtype or ("bf16" if dev.type == "cuda" else "fp32")
    a.torch_dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    spec = planner.load_spec(a.model)
    rows, maxima, last = [], {}, None
    for name in a.impl:
        a.impl_name = name
        impl = IMPLS[name](a, spec, world, rank, dev)
        try:
            impl.setup()
        except Exception as e:  # noqa: BLE001 - one broken implementation must not stop the other
            if world > 1:  # the other ranks wait inside setup's collectives: end the job
                raise
            traceback.print_exc()
            rows.append({"impl": name, "status": f"setup failed: {type(e).__name__}: {e}"[:160]})
            impl.teardown()
            continue
        if a.warmup_seq:  # kernels, allocator and ZeRO-3's trace warm before the first point
            warm = run_point(impl, a.warmup_seq, a, steps=0)
            if warm["status"] != "ok":
                rows.append(dict(warm, status=f"warm-up: {warm['status']}"))
        ours = name == "seqpar"
        offloads = [False, True] if ours and a.activation_offload == "both" else [None]
        keeps = [False, True] if ours and a.recompute_attention == "both" else [None]
        for seq in a.seq:
            for offload in offloads:  # same engine, an option switched: the A/B of its cost
                for keep in keeps:
                    rows.append(run_point(impl, seq, a, steps=a.steps, offload=offload,
                                          keep=keep))
                    if rank == 0:
                        print_table(rows[-1:], COLUMNS)
        if a.find_max:
            if offloads != [None]:
                impl.offload().enabled = True
            if keeps != [None]:
                impl.keep().enabled = True
            maxima[name], probes = find_max(impl, a)
            rows += [dict(r, status=f"probe: {r['status']}") for r in probes]
        last = impl
        impl.teardown()
    if rank == 0:
        title = f"e2e: {a.model} {a.dtype} ZeRO-{a.zero} SP={world} on {dev.type}"
        print_table(rows, COLUMNS, title)
        for line in option_costs(rows):
            print(line)
        for name, best in maxima.items():
            note = " (--find-limit reached)" if best * 2 > a.find_limit else ""
            print(f"longest trainable sequence ({name}): {best:,} tokens{note}")
        summary = getattr(a, "reach_summary", None)
        if summary is not None:
            print(reach.format_summary(summary, a))
        elif last is not None and reach.budgets(last, a)[0]:  # a GPU (or --gpu-mem-gib)
            gpu, host = reach.budgets(last, a)
            o = replace(reach.plan_options(last, a), reserve_gib=planner.PlanOptions.reserve_gib)
            best, limit = planner.reach(spec, o, gpu, host)
            print(f"planner ({a.impl_name}, {o.attention}): longest that fits {gpu:.0f} GiB GPU "
                  f"and {host:.0f} GiB host per rank: {best:,} tokens ({limit})")
        skip = ("torch_dtype", "reach_summary")
        write_json(a.out, {"args": {k: v for k, v in vars(a).items() if k not in skip},
                           "rows": rows, "max_seq_len": maxima, "reach": summary})
        if a.plot:
            plot(a.out)
    shutdown()  # every rank arrives before any tears the groups down
