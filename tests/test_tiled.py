"""tiled_lm_loss = sp_cross_entropy(F.linear(...)): value and grads of hidden, weight, bias;
TiledLMHead / integrations.hf_tiled: the explicit tiled-loss call equals the model's loss."""

import pytest
import torch
import torch.nn.functional as F

from seqpar_ring import groups as G
from seqpar_ring.layout import shard
from seqpar_ring.loss import sp_cross_entropy
from seqpar_ring.tiled import TiledLMHead, default_tile_size, tiled_lm_loss
from tests._dist import run_distributed

TOL = dict(atol=1e-5, rtol=0)
TILES = (1, 3, 7, 16, 1000, None)


def _data(seed=0, bsz=2, seq=12, hid=16, vocab=37, bias=True):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(bsz, seq, hid, generator=gen)
    w = torch.randn(vocab, hid, generator=gen) * 0.3
    b = torch.randn(vocab, generator=gen) * 0.1 if bias else None
    y = torch.randint(0, vocab, (bsz, seq), generator=gen)
    y[0, :5] = -100
    y[1, -1] = -100
    return h, w, b, y


def _grads(fn, h, w, b):
    leaves = [t.detach().clone().requires_grad_(True) for t in (h, w) + ((b,) if b is not None
                                                                      else ())]
    loss = fn(*leaves, *([None] if b is None else []))
    loss.backward()
    return loss.detach(), [t.grad for t in leaves]


def _plain(group=None):
    return lambda h, w, b, y: sp_cross_entropy(F.linear(h, w, b), y, group)


def test_local_exact_tile_sizes_and_ignored():
    for bias in (True, False):
        h, w, b, y = _data(bias=bias)
        ref_loss, ref_g = _grads(lambda h_, w_, b_: _plain()(h_, w_, b_, y), h, w, b)
        torch_ce = F.cross_entropy(F.linear(h, w, b).flatten(0, 1), y.flatten())
        torch.testing.assert_close(ref_loss, torch_ce, **TOL)
        for tile in TILES:
            loss, g = _grads(lambda h_, w_, b_: tiled_lm_loss(h_, w_, y, bias=b_, tile_size=tile),
                             h, w, b)
            torch.testing.assert_close(loss, ref_loss, **TOL, msg=f"loss tile={tile}")
            for name, a, r in zip(("hidden", "weight", "bias"), g, ref_g):
                torch.testing.assert_close(a, r, **TOL, msg=f"d{name} tile={tile} bias={bias}")


def test_all_ignored_is_zero_not_nan():
    h, w, b, y = _data()
    loss, g = _grads(lambda h_, w_, b_: tiled_lm_loss(h_, w_, torch.full_like(y, -100),
                                                      bias=b_, tile_size=5), h, w, b)
    assert loss.item() == 0.0
    assert all(torch.isfinite(t).all() and (t == 0).all() for t in g)


def test_bf16_close_and_num_items():
    h, w, b, y = _data(seed=3)
    hb, wb = h.bfloat16(), w.bfloat16()
    ref_loss, ref_g = _grads(lambda h_, w_, _: _plain()(h_, w_, None, y), hb, wb, None)
    loss, g = _grads(lambda h_, w_, _: tiled_lm_loss(h_, w_, y, tile_size=5), hb, wb, None)
    assert loss.dtype == torch.float32 and g[0].dtype == torch.bfloat16
    torch.testing.assert_close(loss, ref_loss, atol=1e-3, rtol=0)
    for a, r in zip(g, ref_g):
        torch.testing.assert_close(a.float(), r.float(), atol=2e-2, rtol=2e-2)
    count = (y != -100).sum().item()
    with torch.no_grad():
        a = tiled_lm_loss(h, w, y, tile_size=4)
        c = tiled_lm_loss(h, w, y, tile_size=4, num_items=2 * count)
    torch.testing.assert_close(c, a / 2, **TOL)


def test_errors_and_default_tile():
    h, w, b, y = _data()
    with pytest.raises(ValueError, match="shift_labels"):
        tiled_lm_loss(h, w, y[:, :-1])
    with pytest.raises(ValueError, match="vocab"):
        tiled_lm_loss(h, w.t(), y)
    with pytest.raises(ValueError, match="integer"):
        tiled_lm_loss(h, w, y.float())
    assert default_tile_size(32000) == 2**26 // 32000 and default_tile_size(10**9) == 64


def _tiny_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=97,
                      max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).float()


def _grads_of(model):
    return [p.grad.clone() for p in model.parameters()]


def test_tiled_head_is_linear_without_labels_and_loss_with():
    h, w, b, y = _data()
    lin = torch.nn.Linear(16, 37)
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.copy_(b)
    head = TiledLMHead(lin, tile_size=5)
    assert head.weight is lin.weight and head.bias is lin.bias  # same Parameters, not copies
    with torch.no_grad():
        torch.testing.assert_close(head(h), lin(h), **TOL)
        torch.testing.assert_close(head(h, y), _plain()(h, w, b, y), **TOL)
        torch.testing.assert_close(head(h, y, None), head(h, y), **TOL)
        torch.testing.assert_close(head(h, y, num_items=1000.0),
                                   tiled_lm_loss(h, w, y, bias=b, num_items=1000.0), **TOL)
    with pytest.raises(ValueError, match="nn.Linear"):
        TiledLMHead(torch.nn.Embedding(4, 4))


def test_hf_explicit_tiled_loss_equals_model_loss():
    from seqpar_ring import SeqParConfig
    from seqpar_ring.integrations.hf import patch
    from seqpar_ring.integrations.hf_tiled import tiled_causal_lm_loss, use_tiled_lm_head

    ref = _tiny_llama()
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[0, :3] = -100
    out_ref = ref(input_ids=ids, labels=labels)
    out_ref.loss.backward()
    ref_grads = _grads_of(ref)
    shift = F.pad(labels, (0, 1), value=-100)[:, 1:]
    for order in ("head only", "head then patch", "patch then head"):
        model = _tiny_llama()
        if order == "patch then head":
            patch(model, SeqParConfig(sp_size=1))
        head = use_tiled_lm_head(model, tile_size=5)
        if order == "head then patch":
            patch(model, SeqParConfig(sp_size=1))
        assert model.lm_head is head and "lm_head.weight" in model.state_dict(), order
        for batch in ({"input_ids": ids, "labels": labels},
                      {"input_ids": ids, "shift_labels": shift}):
            model.zero_grad()
            loss = tiled_causal_lm_loss(model, batch, None)
            torch.testing.assert_close(loss, out_ref.loss, **TOL, msg=order)
            loss.backward()
            for (name, a), r in zip(model.named_parameters(), ref_grads):
                torch.testing.assert_close(a.grad, r, **TOL, msg=f"{order} {name}")
        # the model's own forward is untouched: real logits and its own loss, in any order
        with torch.no_grad():
            out = model(input_ids=ids, labels=labels)
            torch.testing.assert_close(out.logits, out_ref.logits, **TOL, msg=order)
            torch.testing.assert_close(out.loss, out_ref.loss, **TOL, msg=order)
            assert model(input_ids=ids, logits_to_keep=1).logits.shape == (2, 1, 97)


def test_hf_tiled_errors():
    from seqpar_ring.integrations.hf_tiled import tiled_causal_lm_loss, use_tiled_lm_head

    model = _tiny_llama()
    ids = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="use_tiled_lm_head"):
        tiled_causal_lm_loss(model, {"input_ids": ids, "labels": ids}, None)
    use_tiled_lm_head(model)
    with pytest.raises(ValueError, match="neither shift_labels nor labels"):
        tiled_causal_lm_loss(model, {"input_ids": ids}, None)
    with pytest.raises(ValueError, match="causal LM"):
        use_tiled_lm_head(torch.nn.Linear(2, 2))
    model.config.final_logit_softcapping = 30.0
    model.lm_head = torch.nn.Linear(32, 97, bias=False)
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        use_tiled_lm_head(model)


def _dist_body(rank, world):
    g = G.initialize(world)
    h, w, b, y = _data(seed=7, seq=8 * world)
    ref_loss, (rh, rw, rb) = _grads(lambda h_, w_, b_: _plain()(h_, w_, b_, y), h, w, b)
    empty = y.clone()
    mine = shard(torch.arange(y.shape[1]).view(1, -1), world, 1, "zigzag")[0]
    empty[:, mine] = -100  # sp_rank 1 holds only ignored labels
    ref_e, (eh, ew, eb) = _grads(lambda h_, w_, b_: _plain()(h_, w_, b_, empty), h, w, b)
    cases = [("random", y, ref_loss, rh, rw, rb), ("rank1-empty", empty, ref_e, eh, ew, eb)]
    for name, lab, rl, gh, gw, gb in cases:
        for layout in ("contiguous", "zigzag"):
            for tile in (1, 5, None):
                hl = shard(h, world, g.sp_rank, layout)
                yl = shard(lab, world, g.sp_rank, layout)
                loss, (dh, dw, db) = _grads(
                    lambda h_, w_, b_: tiled_lm_loss(h_, w_, yl, g.sp_group, bias=b_,
                                                     tile_size=tile), hl, w, b)
                msg = f"{name} {layout} tile={tile}"
                torch.testing.assert_close(loss, rl, **TOL, msg=msg)
                torch.testing.assert_close(dh, shard(gh, world, g.sp_rank, layout), **TOL,
                                           msg=msg)
                for part, ref in ((dw, gw), (db, gb)):  # rank shares sum to the true gradient
                    torch.distributed.all_reduce(part, group=g.sp_group)
                    torch.testing.assert_close(part, ref, **TOL, msg=msg)
    _hf_sp_cases(g, world)
    G.destroy()
    _zero3_tiled(world)
    return True


def _hf_sp_cases(g, world):
    """tiled_causal_lm_loss under SP = the full model's loss, whatever the order with patch."""
    from seqpar_ring import SeqParConfig
    from seqpar_ring.integrations.hf import SPDataCollator, patch
    from seqpar_ring.integrations.hf_tiled import tiled_causal_lm_loss, use_tiled_lm_head

    ref = _tiny_llama()
    ids = torch.randint(0, 97, (2, 8 * world), generator=torch.Generator().manual_seed(2))
    labels = ids.clone()
    labels[1, :6] = -100
    ref_loss = ref(input_ids=ids, labels=labels).loss
    ref_loss.backward()
    ref_grads = _grads_of(ref)
    cfg = SeqParConfig(sp_size=world, layout="zigzag")
    local = SPDataCollator(cfg, g).shard({"input_ids": ids, "labels": labels})
    for head_first in (True, False):
        model = _tiny_llama()
        if head_first:
            use_tiled_lm_head(model, tile_size=3)
        patch(model, cfg, g)
        if not head_first:
            use_tiled_lm_head(model, tile_size=3)
        msg = f"sp={world} head_first={head_first}"
        loss = tiled_causal_lm_loss(model, local, g)
        torch.testing.assert_close(loss, ref_loss, **TOL, msg=msg)
        loss.backward()
        for (name, p), r in zip(model.named_parameters(), ref_grads):
            grad = p.grad.clone()
            torch.distributed.all_reduce(grad, group=g.sp_group)  # rank shares sum to the truth
            torch.testing.assert_close(grad, r, **TOL, msg=f"{msg} {name}")
        with torch.no_grad():  # the model's own loss stays patch()'s SP loss
            torch.testing.assert_close(model(**local).loss, ref_loss, **TOL, msg=msg)
        with pytest.raises(ValueError, match="shift_labels"):
            tiled_causal_lm_loss(model, {"input_ids": local["input_ids"], "labels": ids}, g)
        with pytest.raises(ValueError, match="position_ids"):
            tiled_causal_lm_loss(model, {"input_ids": local["input_ids"],
                                         "shift_labels": local["shift_labels"]}, g)


def test_sp2_tiled_loss_hf_model_and_zero3():
    assert all(run_distributed(_dist_body, 2, timeout=180))


def _zero3_tiled(world):
    """DeepSpeed ZeRO-3, SP = world: 3 SGD steps on the explicit tiled loss (head and decoder
    called on engine.module) end at the parameters of one process on the whole rows."""
    from tests.test_deepspeed import (STEPS, _batches, _ds_config, _params, _reference,
                                      _teardown)
    from tests.test_deepspeed import _tiny_llama as ds_llama

    from seqpar_ring.integrations import deepspeed as sp_ds
    from seqpar_ring.integrations.hf import SPDataCollator
    from seqpar_ring.integrations.hf_tiled import tiled_causal_lm_loss, use_tiled_lm_head

    micro = 2
    data = _batches(STEPS, micro)
    ref_losses, ref_params = _reference(data, 1)
    model = ds_llama()
    use_tiled_lm_head(model, tile_size=5)  # before initialize: ZeRO-3 hooks the new head
    engine, *_ = sp_ds.initialize(model=model, config=_ds_config(world, 3, micro, 1))
    collate = SPDataCollator(engine.seqpar_config, engine.seqpar_groups)
    losses = []
    for rows in data:
        batch = collate.shard({"input_ids": rows, "labels": rows})
        loss = tiled_causal_lm_loss(engine.module, batch, engine.seqpar_groups)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    params = _params(engine)
    _teardown(engine)
    assert losses == pytest.approx(ref_losses, rel=1e-5, abs=1e-6), (losses, ref_losses)
    for name, ref in ref_params.items():
        torch.testing.assert_close(params[name], ref, atol=1e-5, rtol=1e-5, msg=name)
