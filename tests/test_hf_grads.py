"""Gradient bookkeeping under SP without DeepSpeed (integrations/hf_grads.py), SP 2 x DP 2.

One spawn of 4 gloo ranks. With SGD (which, unlike Adam, shows a wrong gradient scale):
`sync_sp_gradients` in a plain loop with gradient accumulation, and DDP with
`register_sp_ddp_hook`, give the weights of one process on the whole global batch; forgetting the
sum (plain loop, or DDP without the hook) raises at ``optimizer.step()``; summing twice (a second
call, a call per micro-batch, a call on top of DDP or DeepSpeed) raises; a loop that updates the
weights by hand (no torch optimizer) is not flagged.
"""

from __future__ import annotations

import pytest
import torch
from _dist import run_distributed

pytest.importorskip("transformers")

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from seqpar_ring import SeqParConfig  # noqa: E402
from seqpar_ring import groups as sp_groups  # noqa: E402

VOCAB, SEQ, LR, STEPS, ACCUM = 64, 16, 0.5, 2, 2


def tiny_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))


def rows(step: int, dp: int) -> torch.Tensor:
    """(dp * ACCUM, SEQ): the step's global batch; replica d takes rows d*ACCUM .. +ACCUM."""
    g = torch.Generator().manual_seed(100 + step)
    return torch.randint(1, VOCAB, (dp * ACCUM, SEQ), generator=g)


def reference(dp: int) -> dict:
    """One process: mean loss over the whole global batch, SGD."""
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for step in range(STEPS):
        ids = rows(step, dp)
        losses = [model(input_ids=r[None], labels=r[None]).loss for r in ids]
        torch.stack(losses).mean().backward()
        opt.step()
        opt.zero_grad()
    return {n: p.detach() for n, p in model.named_parameters()}


def expect(exc, match: str, fn, *args, **kwargs):
    with pytest.raises(exc, match=match):
        fn(*args, **kwargs)


def _train(model, forward, g, collate, *, sync=None, micro_sync=False, opt=None):
    opt = opt or torch.optim.SGD(model.parameters(), lr=LR)
    for step in range(STEPS):
        mine = rows(step, g.dp_size)[g.dp_rank * ACCUM:(g.dp_rank + 1) * ACCUM]
        for r in mine:
            batch = collate.shard({"input_ids": r[None], "labels": r[None]})
            (forward(**batch).loss / ACCUM).backward()
            if micro_sync:
                sync(model)
        if sync is not None and not micro_sync:
            sync(model)
        opt.step()
        opt.zero_grad()


def _assert_close(model, ref, what: str) -> None:
    for n, p in model.named_parameters():
        err = ((p.detach() - ref[n]).abs().max() / ref[n].abs().max()).item()
        assert err <= 1e-5, f"{what}: {n} differs from one process by {err:.2e}"


def _cases(rank: int, world: int) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    from seqpar_ring.integrations.hf import (
        SPDataCollator,
        patch,
        register_sp_ddp_hook,
        sync_sp_gradients,
    )
    from seqpar_ring.integrations.hf_grads import mark_reduced_by

    torch.set_num_threads(1)
    cfg = SeqParConfig(sp_size=2, layout="zigzag")
    g = sp_groups.initialize(2)
    assert (g.sp_size, g.dp_size) == (2, 2)
    collate = SPDataCollator(cfg, g)
    ref = reference(g.dp_size)

    def fresh():
        model = tiny_model()
        patch(model, cfg, g)
        return model

    # plain loop, accumulation over 2 micro-batches, one sum per step: the one-process weights
    model = fresh()
    _train(model, model, g, collate, sync=sync_sp_gradients)
    _assert_close(model, ref, "plain loop + sync_sp_gradients")

    # forgetting the sum: the first step refuses, on every rank
    model = fresh()
    expect(RuntimeError, "never summed over the SP ranks", _train, model, model, g, collate)

    # summing twice: a second call, or one call per micro-batch of an accumulation
    model = fresh()
    (model(**collate.shard({"input_ids": rows(0, 2)[:1], "labels": rows(0, 2)[:1]})).loss
     .backward())
    sync_sp_gradients(model)
    expect(RuntimeError, "called twice", sync_sp_gradients, model)
    model = fresh()
    expect(RuntimeError, "already summed", _train, model, model, g, collate,
           sync=sync_sp_gradients, micro_sync=True)

    # a hand-written update (no torch optimizer) that zeroes its gradients is not flagged
    model = fresh()
    for step in range(2):
        batch = collate.shard({"input_ids": rows(step, 2)[:1], "labels": rows(step, 2)[:1]})
        model(**batch).loss.backward()
        sync_sp_gradients(model)
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.1 * p.grad
                p.grad = None

    # DDP over the SP x DP world with the comm hook: the one-process weights; no second sum
    model = fresh()
    ddp = DDP(model)
    register_sp_ddp_hook(ddp, g)
    _train_ddp(model, ddp, g, collate)
    _assert_close(model, ref, "DDP + register_sp_ddp_hook")
    expect(RuntimeError, "already summed .* by DDP", sync_sp_gradients, model)

    # DDP without the hook averages over sp*dp ranks: refused at the step
    model = fresh()
    ddp = DDP(model)
    expect(RuntimeError, "never summed", _train, model, ddp, g, collate)

    # DeepSpeed's mpu sums: a plain step is not checked, sync_sp_gradients refuses (sticky)
    model = fresh()
    mark_reduced_by(model, "deepspeed", g)
    patch(model, cfg, g)
    expect(RuntimeError, "already summed .* by DeepSpeed", sync_sp_gradients, model)
    _train(model, model, g, collate, opt=torch.optim.SGD(model.parameters(), lr=0.0))
    sp_groups.destroy()


def _train_ddp(model, ddp, g, collate) -> None:
    """As `_train`, through DDP: it reduces on the last micro-batch only (no_sync before)."""
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for step in range(STEPS):
        mine = rows(step, g.dp_size)[g.dp_rank * ACCUM:(g.dp_rank + 1) * ACCUM]
        for i, r in enumerate(mine):
            batch = collate.shard({"input_ids": r[None], "labels": r[None]})
            if i < len(mine) - 1:
                with ddp.no_sync():
                    (ddp(**batch).loss / ACCUM).backward()
            else:
                (ddp(**batch).loss / ACCUM).backward()
        opt.step()
        opt.zero_grad()


def test_gradient_sum_over_sp_is_checked():
    run_distributed(_cases, 4, timeout=240)
