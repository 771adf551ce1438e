"""Fine-tune a causal LM with sequence parallelism under DeepSpeed (copy and edit).

    deepspeed --num_gpus 8 examples/train_deepspeed.py --deepspeed \
        --deepspeed_config configs/zero3_sp.json --sequence-parallel-size 4 --model <hf id or path>
    # CPU, 2 processes over gloo, a tiny random Llama (no download):
    torchrun --nproc_per_node 2 examples/train_deepspeed.py --deepspeed \
        --deepspeed_config configs/cpu_gloo.json --steps 3

Every rank of an SP group reads the same rows; SPDataCollator keeps this rank's tokens (global
position ids, labels shifted before sharding); the loss on each rank is the whole sample's.
"""

from __future__ import annotations

import argparse
import os
import sys

import deepspeed
import torch

from seqpar_ring.integrations import deepspeed as sp_ds
from seqpar_ring.integrations.hf import SPDataCollator

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import arg_checks  # noqa: E402  (the examples' shared argument checks)


def build_model(name: str | None) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if name:
        return AutoModelForCausalLM.from_pretrained(name, attn_implementation="sdpa")
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                                        num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None, help="HF model id/path (default: tiny random)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--local_rank", type=int, default=-1)  # set by the deepspeed launcher
    deepspeed.add_config_arguments(parser)
    sp_ds.add_argparse_args(parser)
    args = parser.parse_args()
    # before the model and the engine: a bad value fails in a second, naming the flag
    arg_checks.at_least({"--seq-len": (args.seq_len, 1), "--steps": (args.steps, 1)})
    cfg = arg_checks.sp_config(args, args.deepspeed_config)[0]
    arg_checks.check_world(cfg, *arg_checks.world_size(1))
    arg_checks.check_row_len("--seq-len", args.seq_len, cfg)

    model = build_model(args.model)
    engine, _, _, _ = sp_ds.initialize(model=model, model_parameters=model.parameters(),
                                       args=args)
    groups, config = engine.seqpar_groups, engine.seqpar_config
    collate = SPDataCollator(config, groups)
    micro = engine.train_micro_batch_size_per_gpu()
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(1234)
    for step in range(args.steps):
        for _ in range(engine.gradient_accumulation_steps()):
            # one global batch per micro step; this DP replica takes its rows (use a
            # DistributedSampler over dp_rank / dp_size, e.g. shard_dataloader, for real data)
            rows = torch.randint(0, vocab, (micro * groups.dp_size, args.seq_len), generator=gen)
            rows = rows[groups.dp_rank * micro:(groups.dp_rank + 1) * micro]
            batch = collate.shard({"input_ids": rows, "labels": rows})
            batch = {k: v.to(engine.device) for k, v in batch.items()}
            loss = engine(**batch).loss
            engine.backward(loss)
            engine.step()
        if engine.global_rank == 0:
            print(f"step {step}: loss {loss.item():.4f} ({groups})", flush=True)


if __name__ == "__main__":
    main()
