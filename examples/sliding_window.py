"""Fine-tune a sliding-window model (Mistral by default; any Qwen2/Qwen3/Gemma/gpt-oss checkpoint
too) with sequence parallelism: a plain loop, every layer keeps its own window.

    torchrun --nproc_per_node 2 examples/sliding_window.py            # CPU (gloo): tiny random
                                                                      # Mistral, SP = 2
    torchrun --nproc_per_node 2 examples/sliding_window.py --model mistralai/Mistral-7B-v0.1 \\
        --seq-len 65536 --data my.jsonl                               # GPUs: a real checkpoint
    python examples/sliding_window.py --eager     # the reference: one process, eager attention

``patch`` reads each attention layer's window (and gpt-oss's sinks) from the model; the ring
then sends each rank only the K/V rows its windows reach. Gemma 2/3 checkpoints need
``model.config.attn_logit_softcapping = None`` (soft-capping is refused by name). Without
``--data`` the rows are random tokens (``--rows`` of ``--seq-len``). Prints one loss per step
and writes them to ``--out`` (JSON) on rank 0.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist

from seqpar_ring import SeqParConfig, shutdown
from seqpar_ring.integrations.hf import patch, shard_dataloader, sync_sp_gradients
from seqpar_ring.integrations.hf_window import layer_kinds


def tiny_mistral(window: int):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        sliding_window=window, max_position_embeddings=4096,
                        attention_dropout=0.0, use_cache=False)
    return MistralForCausalLM(cfg)


def rows(args, vocab: int) -> list[dict]:
    if args.data:  # JSON lines with "input_ids" (already tokenized)
        with open(args.data) as f:
            ids = [torch.tensor(json.loads(line)["input_ids"][:args.seq_len]) for line in f]
    else:
        g = torch.Generator().manual_seed(1)
        ids = [torch.randint(1, vocab, (args.seq_len,), generator=g) for _ in range(args.rows)]
    return [dict(input_ids=x, labels=x.clone()) for x in ids]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="HF checkpoint (default: tiny random Mistral)")
    p.add_argument("--window", type=int, default=48, help="sliding window of the tiny model")
    p.add_argument("--seq-len", type=int, default=192)
    p.add_argument("--rows", type=int, default=4)
    p.add_argument("--data", default=None)
    p.add_argument("--sp", type=int, default=None, help="SP size (default: world size)")
    p.add_argument("--layout", default="zigzag", choices=("zigzag", "contiguous"))
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--out", default=None, help="write the losses here (JSON)")
    p.add_argument("--eager", action="store_true", help="reference: one process, transformers' "
                   "eager attention, no SP (the losses a patched run must reproduce)")
    args = p.parse_args(argv)
    if args.eager and not dist.is_initialized() and "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", "29533"))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(dist.get_rank() % torch.cuda.device_count())
    if args.model:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16)
        model.gradient_checkpointing_enable()
    else:
        model = tiny_mistral(args.window)
    model.config.use_cache = False
    model.to("cuda" if torch.cuda.is_available() else "cpu").train()
    cfg = SeqParConfig(sp_size=args.sp or dist.get_world_size(), layout=args.layout)
    if args.eager:
        model.set_attn_implementation("eager")
        groups = None
        cfg = SeqParConfig(sp_size=1)
    else:
        groups = patch(model, cfg)  # every layer keeps its window (and sinks)
    if dist.get_rank() == 0:
        print("windows by layer:", [k.window for k in layer_kinds(model)], flush=True)
    loader = shard_dataloader(rows(args, model.config.vocab_size), cfg, groups, batch_size=1,
                              shuffle=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    losses = []
    for batch in loader:
        batch = {k: v.to(model.device) for k, v in batch.items()}
        loss = model(**batch).loss
        loss.backward()
        if groups is not None:
            sync_sp_gradients(model)  # each SP rank holds its tokens' share: sum over SP
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        if dist.get_rank() == 0:
            print(f"step {len(losses)} loss {losses[-1]:.6f}", flush=True)
    if args.out and dist.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump(losses, f)
    shutdown()  # every rank arrives, then the groups are freed


if __name__ == "__main__":
    main()
