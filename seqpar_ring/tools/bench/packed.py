"""Real rows: padded and packed batches, attention alone and end to end, against transformers.

    python -m seqpar_ring.bench packed --out packed.json            # one GPU
    torchrun --nproc_per_node 2 -m seqpar_ring.bench packed --skip-e2e   # SP = 2 attention rows

Attention (``--seq`` tokens, default 65,536; 32 heads / 8 KV heads x 128, bf16, causal,
forward+backward, one row): our ``ring_attention`` on plain, right-padded (last 1,024 tokens),
packed 16 x 4K and packed mixed-length rows, next to FlexAttention (compiled, document block
mask, GQA) on the same documents and to single-GPU SDPA on the plain row. TFLOP/s count useful
work only: the causal square of every document. With several ranks (SP = world, zigzag) the
rows are sharded so that documents cross shard boundaries, and rank 0 also measures one GPU on
the whole row in the same run (per-GPU efficiency).

End to end (``--e2e-seq`` tokens, default 32,768; 1.1B Llama shape, random weights, bf16,
gradient checkpointing, forward+backward of one row): ``patch`` + ``SPDataCollator`` (SP = 1)
next to transformers' own ``sdpa`` and ``flex_attention`` on the same rows.
"""

from __future__ import annotations

import argparse
import gc
import random

import torch
import torch.distributed as dist

from seqpar_ring import documents
from seqpar_ring.groups import shutdown

from .common import (SHARED, init_from_env, kernel_ms, peak_gib, print_table, reset_peak, timeit,
                     write_json)

H, HKV, D = 32, 8, 128


def doc_lengths(kind: str, seq: int, seed: int = 0) -> list[int] | None:
    """Document lengths of a row: None (one document), equal 4K documents, or mixed lengths."""
    if kind == "plain":
        return None
    if kind == "equal":
        return [4096] * (seq // 4096)
    rng, lens = random.Random(seed), []
    while sum(lens) < seq:
        lens.append(rng.randint(256, 8192))
    lens[-1] -= sum(lens) - seq
    return [n for n in lens if n > 0]


def _ids(kind: str, seq: int) -> torch.Tensor | None:
    if kind == "right_padded":
        ids = torch.zeros(1, seq, dtype=torch.long)
        ids[0, -1024:] = -1
        return ids
    lens = doc_lengths(kind, seq)
    if lens is None:
        return None
    return torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))[None]


def useful_flops(ids: torch.Tensor | None, seq: int) -> float:
    """Forward+backward FLOPs of the causal squares of the documents (3.5 x 2·L²·H·D each)."""
    if ids is None:
        lens = [seq]
    else:
        row = ids[0]
        lens = torch.unique_consecutive(row[row >= 0], return_counts=True)[1].tolist()
    return sum(3.5 * 2.0 * n * n * H * D for n in lens)


def attention_rows(seq: int, dev, rank: int, world: int) -> list[dict]:
    from seqpar_ring import ring_attention
    from seqpar_ring.layout import shard

    group = dist.group.WORLD if world > 1 else None
    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(1, seq, H, D, device=dev, dtype=torch.bfloat16, generator=g)
    k = torch.randn(1, seq, HKV, D, device=dev, dtype=torch.bfloat16, generator=g)
    v = torch.randn(1, seq, HKV, D, device=dev, dtype=torch.bfloat16, generator=g)
    rows = []

    def ours(ids, p, grp, me, compute=False):
        """Seconds per fwd+bwd; with ``compute`` also the largest rank's own kernel time
        (ms; ranks sharing a GPU: the step's wall time holds every rank's kernels)."""
        layout = "zigzag" if p > 1 else "contiguous"
        ql, kl, vl = (shard(x, p, me, layout).contiguous().requires_grad_(True)
                      for x in (q, k, v))
        doc = None if ids is None else shard(ids.to(dev), p, me, layout).contiguous()

        def step():
            out = ring_attention(ql, kl, vl, grp, causal=True, layout=layout, doc_ids=doc)
            out.backward(torch.ones_like(out))
        t = timeit(step, dev, warmup=2, iters=5, group=grp, aligned=grp is not None)
        return (t, kernel_ms(step, dev, grp)) if compute else t

    for kind in ("plain", "right_padded", "equal", "mixed"):
        ids = _ids(kind, seq)
        flops = useful_flops(ids, seq)
        row = {"row": kind, "docs": 1 if ids is None else int(ids.max()) + 1}
        if world > 1 and SHARED:  # wall time holds every rank's kernels: per-rank compute
            t, row["ours_sp_kernel_ms"] = ours(ids, world, group, rank, compute=True)
            row["ours_sp_ms"] = t * 1e3
        elif world > 1:
            t = ours(ids, world, group, rank)
            row["ours_sp_ms"] = t * 1e3
            row["ours_sp_tflops_per_gpu"] = flops / world / t / 1e12
        if rank == 0:  # one GPU on the whole row, in the same run
            t = ours(ids, 1, None, 0)
            row["ours_ms"], row["ours_tflops"] = t * 1e3, flops / t / 1e12
            if kind == "plain":
                t = _sdpa(q, k, v, dev)
                row["ref"], row["ref_ms"], row["ref_tflops"] = "sdpa", t * 1e3, flops / t / 1e12
            elif kind in ("equal", "mixed"):
                t = _flex(q, k, v, ids.to(dev), dev)
                row["ref"], row["ref_ms"], row["ref_tflops"] = "flex", t * 1e3, flops / t / 1e12
            if "ref_tflops" in row:
                row["ours_vs_ref"] = row["ours_tflops"] / row["ref_tflops"]
            if "ours_sp_tflops_per_gpu" in row:
                row["sp_efficiency"] = row["ours_sp_tflops_per_gpu"] / row["ours_tflops"]
        if world > 1:
            dist.barrier()
        rows.append(row)
    return rows


def _sdpa(q, k, v, dev) -> float:
    import torch.nn.functional as F

    qt, kt, vt = (x.transpose(1, 2).detach().requires_grad_(True) for x in (q, k, v))

    def step():
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True)
        out.backward(torch.ones_like(out))
    return timeit(step, dev, warmup=2, iters=5, aligned=False)  # rank 0 alone


def _flex(q, k, v, ids, dev) -> float:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    doc = ids[0]
    flex = torch.compile(flex_attention, dynamic=False)

    def mask(b, h, qi, ki):
        return (doc[qi] == doc[ki]) & (ki <= qi)

    n = doc.shape[0]
    block = create_block_mask(mask, 1, None, n, n, device=dev)
    qt, kt, vt = (x.transpose(1, 2).detach().requires_grad_(True) for x in (q, k, v))

    def step():
        out = flex(qt, kt, vt, block_mask=block, enable_gqa=True)
        out.backward(torch.ones_like(out))
    return timeit(step, dev, warmup=2, iters=5, aligned=False)  # rank 0 alone


E2E_ROWS = ("plain", "right_padded", "equal", "mixed")
E2E_IMPLS = ("seqpar_ring", "sdpa", "flex_attention")


def e2e_rows(seq: int, dev, kinds=E2E_ROWS, impls=E2E_IMPLS) -> list[dict]:
    from seqpar_ring.tools import plan as planner

    spec = planner.PRESETS["llama-1.1b"]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, spec.vocab, (1, seq), generator=g)
    batches = {}
    for kind in kinds:
        pos = torch.arange(seq)[None]
        mask = None
        if kind == "right_padded":
            mask = torch.ones(1, seq, dtype=torch.long)
            mask[0, -1024:] = 0
        elif kind != "plain":
            pos = torch.cat([torch.arange(n) for n in doc_lengths(kind, seq)])[None]
        batches[kind] = dict(input_ids=ids, position_ids=pos, attention_mask=mask,
                             labels=ids.masked_fill(mask == 0, -100) if mask is not None else ids)
    rows = []
    for impl in impls:
        rows += _e2e_impl(impl, spec, batches, seq, dev)
        gc.collect()
        torch.cuda.empty_cache()
    return rows


def _e2e_impl(impl: str, spec, batches: dict, seq: int, dev) -> list[dict]:
    from seqpar_ring import SeqParConfig
    from seqpar_ring.integrations.hf import SPDataCollator, patch

    from .e2e import build_model

    model = build_model(spec, torch.bfloat16, "sdpa" if impl == "seqpar_ring" else impl)
    model.to(dev).train()
    collate = None
    if impl == "seqpar_ring":
        cfg = SeqParConfig(sp_size=1)
        patch(model, cfg)
        collate = SPDataCollator(cfg)
    rows = []
    for kind, batch in batches.items():
        b = {k: v for k, v in batch.items() if v is not None}
        if collate is not None:
            b = collate.shard(b)
        elif kind in ("equal", "mixed"):
            b.pop("attention_mask", None)  # packed: transformers reads the position_ids
        b = {k: v.to(dev) if torch.is_tensor(v) else v for k, v in b.items()}

        def step():
            model.zero_grad(set_to_none=True)
            model(**b).loss.backward()
        reset_peak(dev)
        try:
            t = timeit(step, dev, warmup=1, iters=3, aligned=False)  # rank 0 alone
            rows.append({"impl": impl, "row": kind, "tokens_per_s": seq / t, "step_s": t,
                         "peak_gib": peak_gib(dev)})
        except Exception as err:  # noqa: BLE001 - reported in the table
            rows.append({"impl": impl, "row": kind, "status": repr(err)[:80]})
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m seqpar_ring.bench packed", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq", type=int, default=65536, help="attention rows: tokens per row")
    ap.add_argument("--e2e-seq", type=int, default=32768, help="end-to-end rows: tokens per row")
    ap.add_argument("--skip-e2e", action="store_true", help="attention rows only")
    ap.add_argument("--skip-attention", action="store_true", help="end-to-end rows only")
    ap.add_argument("--e2e-rows", nargs="+", choices=E2E_ROWS, default=list(E2E_ROWS),
                    help="end-to-end rows to run")
    ap.add_argument("--e2e-impls", nargs="+", choices=E2E_IMPLS, default=list(E2E_IMPLS),
                    help="end-to-end implementations to run (flex_attention compiles per row)")
    ap.add_argument("--out", default="packed.json", help="JSON file to write")
    ap.add_argument("--fused-min-rows", type=int, default=None,
                    help="override seqpar_ring.documents.FUSED_MIN_ROWS (1 = no tiny call "
                    "rerouted to varlen: the plan before 1-token documents were fixed)")
    a = ap.parse_args(argv)
    if a.fused_min_rows is not None:
        documents.FUSED_MIN_ROWS = a.fused_min_rows
    rank, world, dev = init_from_env()
    if dev.type != "cuda":
        raise SystemExit("bench packed measures the fused GPU kernels: run it on a CUDA machine")
    payload = {"args": vars(a)}
    if not a.skip_attention:
        rows = attention_rows(a.seq, dev, rank, world)
        cols = ["row", "docs", "ours_ms", "ours_tflops", "ref", "ref_ms", "ref_tflops",
                "ours_vs_ref"]
        if world > 1 and SHARED:  # not throughput: what one rank computes
            cols += ["ours_sp_ms", "ours_sp_kernel_ms"]
        elif world > 1:
            cols += ["ours_sp_ms", "ours_sp_tflops_per_gpu", "sp_efficiency"]
        if rank == 0:
            print_table(rows, cols, f"attention only, S={a.seq}, {H}/{HKV} heads x {D}, causal "
                        f"fwd+bwd, useful TFLOP/s, world={world}, fused_min_rows="
                        f"{documents.FUSED_MIN_ROWS}; ours_ms, ref_ms: one GPU, rank 0 alone",
                        alone=("ours_ms", "ref_ms"))
        payload["attention"] = rows
    if not a.skip_e2e and rank == 0:
        rows = e2e_rows(a.e2e_seq, dev, a.e2e_rows, a.e2e_impls)
        print_table(rows, ["impl", "row", "tokens_per_s", "step_s", "peak_gib", "status"],
                    alone=("step_s",), title=f"end to end (rank 0 alone), 1.1B Llama shape, "
                    f"{a.e2e_seq} tokens, bf16, checkpointing, "
                    "fwd+bwd")
        payload["e2e"] = rows
    if rank == 0:
        write_json(a.out, payload)
    shutdown()  # every rank arrives before any tears the groups down
