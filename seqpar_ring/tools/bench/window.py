"""Sliding-window attention: one layer against transformers' best path and our dense ring, and a
1.1B Mistral shape end to end against transformers' flex_attention and sdpa — in one run.

    python -m seqpar_ring.bench window --out window.json                # one GPU

Attention (``--seq``, default 65,536 and 262,144 tokens; Mistral shape 32/8 heads x 128,
``--window`` 4,096, bf16, causal, forward+backward, one row): ``ring_attention(window=W)``;
FlexAttention (compiled, sliding-window block mask, GQA) — what transformers runs for
``flex_attention``, its fastest windowed path on this image; SDPA with a boolean mask where the
(S x S) mask fits (``--sdpa-max-seq``); and our dense ring (no window). Useful TFLOP/s count the
visible (query, key) pairs only: sum_i min(i + 1, W) for the window, S(S+1)/2 dense — so the
"vs dense" column compares how well each uses the GPU, not how much work it skips.

End to end (``--e2e-seq``, default 32,768 and 65,536; MistralForCausalLM with hidden 2048,
22 layers, 32/8 heads of ``--head-dim`` 64 (1.1B parameters), intermediate 5632, vocab 32000,
sliding_window 4096, random weights, bf16, gradient checkpointing, one row, forward+backward):
``patch`` (SP = 1; and with ``recompute_attention=False``, "seqpar_ring_kept") next to
transformers' ``flex_attention`` and ``sdpa``; tokens/s and peak memory.
"""

from __future__ import annotations

import argparse
import gc

import torch

from .common import (device_activities, init_from_env, kernel_breakdown, peak_gib, print_table,
                     reset_peak, timeit, write_json)

H, HKV, D = 32, 8, 128


def window_pairs(seq: int, window: int | None) -> int:
    """Visible (query, key) pairs of causal attention with a sliding window (None: dense)."""
    if window is None or window >= seq:
        return seq * (seq + 1) // 2
    return window * seq - window * (window - 1) // 2


def useful_tflops(seq: int, window: int | None, seconds: float) -> float:
    """Forward+backward = 3.5 x forward; forward = 4·D·H per visible pair."""
    return 3.5 * 4.0 * window_pairs(seq, window) * H * D / seconds / 1e12


def _inputs(seq: int, dev):
    g = torch.Generator(device=dev).manual_seed(0)
    return [torch.randn(1, seq, h, D, device=dev, dtype=torch.bfloat16, generator=g)
            .requires_grad_(True) for h in (H, HKV, HKV)]


def _our_step(seq, window, dev):
    from seqpar_ring import ring_attention

    q, k, v = _inputs(seq, dev)

    def step():
        out = ring_attention(q, k, v, None, causal=True, window=window)
        out.backward(torch.ones_like(out))
    return step


def _ours(seq, window, dev, iters):
    return timeit(_our_step(seq, window, dev), dev, warmup=2, iters=iters)


def profile_rows(seq, window, dev) -> list[dict]:
    """Where one windowed fwd+bwd of ours spends its GPU time (`common.kernel_breakdown`)."""
    step = _our_step(seq, window, dev)
    step()  # warm: plans, cuDNN graphs
    return kernel_breakdown(device_activities(step, dev), top=15)


def _flex(seq, window, dev, iters):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    flex = torch.compile(flex_attention, dynamic=False)

    def mask(b, h, qi, ki):  # transformers' sliding_window_overlay on a causal mask
        return (ki <= qi) & (ki > qi - window)

    block = create_block_mask(mask, 1, None, seq, seq, device=dev)
    q, k, v = (x.transpose(1, 2).detach().requires_grad_(True) for x in _inputs(seq, dev))

    def step():
        out = flex(q, k, v, block_mask=block, enable_gqa=True)
        out.backward(torch.ones_like(out))
    return timeit(step, dev, warmup=2, iters=iters)


def _sdpa_mask(seq, window, dev, iters):
    import torch.nn.functional as F

    i = torch.arange(seq, device=dev)
    mask = (i[None] <= i[:, None]) & (i[None] > i[:, None] - window)
    q, k, v = (x.transpose(1, 2).detach().requires_grad_(True) for x in _inputs(seq, dev))

    def step():
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        out.backward(torch.ones_like(out))
    return timeit(step, dev, warmup=1, iters=iters)


def attention_rows(a, dev) -> list[dict]:
    rows = []
    for seq in a.seq:
        runs = [("ours (window)", a.window, _ours), ("ours dense ring", None, _ours),
                ("flex_attention", a.window, _flex)]
        if seq <= a.sdpa_max_seq:
            runs.append(("sdpa + mask", a.window, _sdpa_mask))
        res = {}
        for name, window, fn in runs:
            reset_peak(dev)
            try:
                t = fn(seq, window, dev, a.iters)
                res[name] = useful_tflops(seq, window, t)
                rows.append(dict(seq=seq, impl=name, window=window, ms=t * 1e3,
                                 tflops=res[name], peak_gib=peak_gib(dev)))
            except Exception as err:  # noqa: BLE001 - reported in the table (e.g. OOM)
                rows.append(dict(seq=seq, impl=name, window=window, status=repr(err)[:80]))
            gc.collect()
            torch.cuda.empty_cache()
        ours = res.get("ours (window)")
        for row in rows:
            if row["seq"] == seq and "tflops" in row and ours:
                if res.get("ours dense ring"):
                    row["vs_dense"] = row["tflops"] / res["ours dense ring"]
                row["ours_vs_this"] = ours / row["tflops"]
    return rows


E2E_IMPLS = ("seqpar_ring", "seqpar_ring_kept", "flex_attention", "sdpa")


def build_mistral(attn: str, window: int, head_dim: int = 64):
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32,
                        num_key_value_heads=8, head_dim=head_dim, intermediate_size=5632,
                        vocab_size=32000, sliding_window=window, attention_dropout=0.0,
                        max_position_embeddings=2**20, use_cache=False)
    torch.manual_seed(0)
    model = MistralForCausalLM._from_config(cfg, attn_implementation=attn, dtype=torch.bfloat16)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return model.train()


def e2e_rows(a, dev, profiles: dict | None = None) -> list[dict]:
    """Tokens/s and peak memory of every ``--e2e-impls`` entry at every ``--e2e-seq``; with
    ``profiles`` (a dict) also where one step at the shortest length spends its GPU time, per
    implementation (`common.kernel_breakdown`, plus GPU-busy time against the step's wall)."""
    from seqpar_ring import SeqParConfig
    from seqpar_ring.integrations.hf import SPDataCollator, patch

    rows = []
    for impl in a.e2e_impls:
        ours = impl.startswith("seqpar_ring")
        model = build_mistral("sdpa" if ours else impl, a.window, a.head_dim).to(dev)
        collate = None
        if ours:
            cfg = SeqParConfig(sp_size=1, recompute_attention=impl != "seqpar_ring_kept")
            patch(model, cfg)
            collate = SPDataCollator(cfg)
        for seq in a.e2e_seq:
            g = torch.Generator().manual_seed(seq)
            ids = torch.randint(1, 32000, (1, seq), generator=g)
            batch = dict(input_ids=ids, labels=ids, position_ids=torch.arange(seq)[None])
            if collate is not None:
                batch = collate.shard(batch)
            batch = {k: v.to(dev) if torch.is_tensor(v) else v for k, v in batch.items()}

            def step():
                model.zero_grad(set_to_none=True)
                model(**batch).loss.backward()
            # Every point compiles afresh: a compiled flex_attention that has seen another
            # length recompiles with dynamic shapes, which ran 13% slower at 64K (flex measured
            # after 32K in the same process: 28,263-28,708 tokens/s; alone: 32,788).
            torch._dynamo.reset()
            reset_peak(dev)
            try:
                t = timeit(step, dev, warmup=1, iters=a.iters)
                rows.append(dict(impl=impl, seq=seq, tokens_per_s=seq / t, step_s=t,
                                 peak_gib=peak_gib(dev)))
                print(f"e2e {impl} {seq}: {seq / t:,.0f} tokens/s, {rows[-1]['peak_gib']:.1f} "
                      "GiB peak", flush=True)  # each row as it comes: a cut-off run keeps it
                if profiles is not None and seq == min(a.e2e_seq) and impl not in profiles:
                    acts = device_activities(step, dev)
                    busy = sum(d for _, d in acts) / 1e6
                    profiles[impl] = dict(step_ms=t * 1e3, gpu_busy_ms=busy,
                                          kernels=kernel_breakdown(acts, top=200, width=200))
            except Exception as err:  # noqa: BLE001 - reported in the table (e.g. OOM)
                rows.append(dict(impl=impl, seq=seq, status=repr(err)[:80]))
            gc.collect()
            torch.cuda.empty_cache()
        model = None
        gc.collect()
        torch.cuda.empty_cache()
    for row in rows:
        flex = next((r for r in rows if r["impl"] == "flex_attention" and r["seq"] == row["seq"]
                     and "tokens_per_s" in r), None)
        if flex and "tokens_per_s" in row:
            row["vs_flex"] = row["tokens_per_s"] / flex["tokens_per_s"]
            row["mem_vs_flex"] = row["peak_gib"] / flex["peak_gib"]
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m seqpar_ring.bench window", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq", type=int, nargs="+", default=[65536, 262144])
    ap.add_argument("--window", type=int, default=4096)
    ap.add_argument("--sdpa-max-seq", type=int, default=65536,
                    help="sdpa with a boolean (S x S) mask only up to this length")
    ap.add_argument("--e2e-seq", type=int, nargs="+", default=[32768, 65536])
    ap.add_argument("--head-dim", type=int, default=64,
                    help="end to end: head_dim (64 = hidden / heads, the 1.1B shape)")
    ap.add_argument("--e2e-impls", nargs="+", choices=E2E_IMPLS,
                    default=["seqpar_ring", "seqpar_ring_kept", "flex_attention", "sdpa"],
                    help="seqpar_ring_kept: with recompute_attention=False (attention kept "
                    "across the checkpoint's recomputation)")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--skip-e2e", action="store_true")
    ap.add_argument("--skip-attention", action="store_true")
    ap.add_argument("--profile", action="store_true",
                    help="also: GPU time by kernel of one windowed fwd+bwd at the longest --seq "
                    "and of one end-to-end step of each --e2e-impls at the shortest --e2e-seq")
    ap.add_argument("--out", default="window.json")
    a = ap.parse_args(argv)
    _, world, dev = init_from_env()
    if dev.type != "cuda" or world != 1:
        raise SystemExit("bench window measures one GPU: run it without torchrun on a CUDA machine")
    payload = {"args": vars(a)}
    if not a.skip_attention:
        rows = attention_rows(a, dev)
        print_table(rows, ["seq", "impl", "window", "ms", "tflops", "vs_dense", "ours_vs_this",
                           "peak_gib", "status"],
                    f"one attention layer, {H}/{HKV} heads x {D}, W={a.window}, causal fwd+bwd, "
                    "useful TFLOP/s")
        payload["attention"] = rows
    if a.profile:
        seq = max(a.seq)
        rows = profile_rows(seq, a.window, dev)
        print_table(rows, ["kernel", "calls", "ms", "share"],
                    f"GPU time by kernel, ours (window), S={seq}, W={a.window}, one fwd+bwd")
        payload["profile"] = rows
        gc.collect()
        torch.cuda.empty_cache()
    if not a.skip_e2e:
        profiles = {} if a.profile else None
        rows = e2e_rows(a, dev, profiles)
        print_table(rows, ["impl", "seq", "tokens_per_s", "step_s", "peak_gib", "vs_flex",
                           "mem_vs_flex", "status"],
                    f"end to end, 1.1B Mistral shape (head_dim {a.head_dim}, sliding_window "
                    f"{a.window}), bf16, "
                    "checkpointing, one row, fwd+bwd")
        payload["e2e"] = rows
        for impl, prof in (profiles or {}).items():
            print_table(prof["kernels"][:25], ["kernel", "calls", "ms", "share"],
                        f"GPU time by kernel, end to end, {impl}, S={min(a.e2e_seq)}, one step: "
                        f"{prof['gpu_busy_ms']:.1f} ms of GPU work in a {prof['step_ms']:.1f} ms "
                        "step (the JSON lists every kernel)")
        if profiles:
            payload["e2e_profile"] = profiles
    write_json(a.out, payload)
