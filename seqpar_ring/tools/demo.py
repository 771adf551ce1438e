"""A two-rank CPU demonstration: ``python -m seqpar_ring.demo``.

Spawns 2 gloo processes (no torchrun needed), builds the SP groups, shards a random batch with
the zigzag layout, runs a tiny causal attention model sequence-parallel (forward + backward,
loss over the SP group) and compares loss, attention output and parameter gradients with the
same model run on the whole sequence in one process. Exits non-zero if they disagree.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import seqpar_ring as sp

WORLD, SP_SIZE, LAYOUT = 2, 2, "zigzag"
BATCH, SEQ, VOCAB, HEADS, HEAD_DIM = 2, 16, 32, 2, 8
TOL = 1e-5


class TinyAttentionLM(nn.Module):
    """Embedding -> one causal attention layer -> vocabulary head."""

    def __init__(self) -> None:
        super().__init__()
        width = HEADS * HEAD_DIM
        self.emb = nn.Embedding(VOCAB, width)
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.head = nn.Linear(width, VOCAB)

    def forward(self, ids: torch.Tensor, group=None) -> tuple[torch.Tensor, torch.Tensor]:
        """ids (batch, seq_local) -> logits (batch, seq_local, vocab), attn (b, s, heads, d)."""
        x = self.emb(ids)
        q, k, v = self.qkv(x).view(*ids.shape, 3, HEADS, HEAD_DIM).unbind(2)
        if group is None:  # single process: the whole sequence with torch's SDPA
            attn = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
            ).transpose(1, 2)
        else:
            attn = sp.ring_attention(q, k, v, group, causal=True, layout=LAYOUT)
        return self.head(x + self.out(attn.flatten(2))), attn


def _worker(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60))
    try:
        _run(rank)
    except BaseException:
        sp.shutdown(wait=False)  # a peer may never arrive: tear down at once
        raise
    sp.shutdown()  # every rank arrives before any tears the groups down


def _run(rank: int) -> None:
    groups = sp.init_sp_groups(SP_SIZE)
    torch.manual_seed(0)  # same model and batch on every rank
    model = TinyAttentionLM()
    ids = torch.randint(0, VOCAB, (BATCH, SEQ))
    labels = ids.clone()
    labels[0, :5] = -100  # a masked prompt: ranks hold different numbers of valid labels

    # single-process reference on the whole sequence
    ref_logits, ref_attn = model(ids)
    ref_loss = F.cross_entropy(ref_logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
    ref_grads = torch.autograd.grad(ref_loss, list(model.parameters()))

    # sequence parallel: each rank sees SEQ / SP_SIZE tokens
    local = sp.shard_batch({"input_ids": ids, "labels": labels}, SP_SIZE, groups.sp_rank, LAYOUT)
    logits, attn = model(local["input_ids"], groups.sp_group)
    loss = sp.sp_cross_entropy(logits, local["shift_labels"], groups.sp_group)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    for g in grads:  # what DeepSpeed does with the mpu: sum over SP x DP, divide by dp
        dist.all_reduce(g, group=groups.sp_dp_group)
        g.div_(groups.dp_size)

    full_attn = sp.gather(attn.detach(), groups.sp_group, LAYOUT)
    err = {
        "loss": (loss - ref_loss).abs().item(),
        "attention": (full_attn - ref_attn).abs().max().item(),
        "grads": max((a - b).abs().max().item() for a, b in zip(grads, ref_grads)),
    }
    info = dict(rank=rank, sp_rank=groups.sp_rank, input_ids=tuple(local["input_ids"].shape),
                logits=tuple(logits.shape), positions=local["position_ids"][0].tolist(),
                valid_labels=int((local["shift_labels"] != -100).sum()))
    infos: list = [None] * WORLD
    dist.all_gather_object(infos, info)
    if rank == 0:
        print(groups.describe())
        print(f"batch ({BATCH}, {SEQ}) sharded with layout={LAYOUT!r}:")
        for i in infos:
            print(f"  rank {i['rank']} (sp_rank {i['sp_rank']}): input_ids {i['input_ids']}, "
                  f"logits {i['logits']}, {i['valid_labels']} valid labels, "
                  f"global positions {i['positions']}")
        print(f"loss: sequence-parallel {loss.item():.6f}, single process {ref_loss.item():.6f}")
        print("max abs error vs single process: "
              + ", ".join(f"{k} {v:.2e}" for k, v in err.items()))
    bad = {k: v for k, v in err.items() if not v <= TOL}
    if bad:
        raise AssertionError(f"rank {rank}: sequence-parallel result differs by {bad} > {TOL}")


def main(argv: list[str] | None = None) -> int:
    """Run the demo; ``--help`` prints what it does and exits (argparse: exit status 0)."""
    argparse.ArgumentParser(
        prog="python -m seqpar_ring.demo", description=__doc__.split("\n\n", 1)[1].strip(),
        epilog="About 20 s on a 2-core CPU machine (process start-up dominates). "
        "No arguments.").parse_args(argv)
    if not hasattr(sp, "ring_attention"):
        print("seqpar_ring.ring_attention is not available in this build", file=sys.stderr)
        return 1
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    try:
        mp.spawn(_worker, args=(port,), nprocs=WORLD, join=True)
    except Exception as err:  # noqa: BLE001 - report the failing rank's error, exit non-zero
        print(f"demo FAILED: {err}", file=sys.stderr)
        return 1
    print(f"demo OK: {WORLD} gloo ranks agree with the single-process run (tolerance {TOL})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
