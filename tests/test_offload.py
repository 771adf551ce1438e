"""Activation-checkpoint offload: on vs off gives bit-identical losses and gradients.

On CPU the offload copies into (unpinned) host buffers and back, through the same pack /
unpack / prefetch code as on GPU. Checked: only the checkpointed layer inputs move (one per
layer, hidden-state shaped), host memory is released after backward, prefetch hits, reentrant
and non-reentrant checkpoints, HF models through ``patch`` (SP = 1 here, SP = 2 ring and
dilated under gloo), DeepSpeed ZeRO-3 with the tiled MLP, the config keys and flags, errors.
"""

from __future__ import annotations

import argparse
import copy

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

from seqpar_ring import SeqParConfig
from seqpar_ring.offload import MIN_PIECE_BYTES, ActivationOffload, host_pieces
from tests._dist import run_distributed

pytest.importorskip("transformers")

VOCAB, SEQ = 64, 16


def test_host_pieces_are_powers_of_two_and_a_small_tail():
    for n in (1, 2**21 - 1, 2**21, 5 * 2**30 + 12345, 3 * 2**22 + 7):
        pieces = host_pieces(n)
        assert sum(pieces) == n
        big, tail = pieces[:-1], pieces[-1]
        assert all(p & (p - 1) == 0 and p >= 2**21 for p in big)
        assert tail < 2**21 or tail & (tail - 1) == 0
        assert big == sorted(big, reverse=True)
    assert host_pieces(5 * 2**30) == [2**32, 2**30]


class _Stack(nn.Module):
    def __init__(self, n=3, d=8):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(),
                                                  nn.Linear(2 * d, d)) for _ in range(n))

    def forward(self, x, ckpt):
        for layer in self.layers:
            x = x + ckpt(layer, x)
        return x


@pytest.mark.parametrize("reentrant", [False, True])
def test_plain_checkpoint_bit_identical(reentrant):
    ref, mod = _Stack(), _Stack()
    off = ActivationOffload()
    seen = []
    pack = off._pack
    off._pack = lambda t: seen.append(tuple(t.shape)) or pack(t)
    x = torch.randn(4, 8, requires_grad=True)
    xo = x.detach().clone().requires_grad_()

    def ckpt(fn, *a):
        return checkpoint(fn, *a, use_reentrant=reentrant)

    ref(x, ckpt).square().sum().backward()
    off.new_pass()
    out = mod(xo, off.wrap(ckpt))
    assert off.stats.host_bytes == 3 * 4 * 8 * 4  # three layer inputs held, nothing else
    out.square().sum().backward(retain_graph=True)
    assert seen == [(4, 8)] * 3 and off.stats.packed == 3
    assert (off.stats.fetched, off.stats.prefetched) == (3, 2)  # the last layer's had no warning
    assert torch.equal(xo.grad, x.grad)
    for p, q in zip(ref.parameters(), mod.parameters()):
        assert torch.equal(p.grad, q.grad)
    out.square().sum().backward()  # a second backward unpacks again from host
    del out
    assert off.stats.host_bytes == 0 and off.stats.host_peak_bytes == 3 * 4 * 8 * 4


def _tiny_llama(seed=0, layers=3):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=64, attention_dropout=0.0)
    model = LlamaForCausalLM(cfg).float().train()
    model.config.use_cache = False
    return model


def _run(model, batch, group=None):
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    grads = [p.grad.detach().clone() for p in model.parameters()]
    if group is not None:
        for g in grads:
            dist.all_reduce(g, group=group)
    return loss.detach(), grads


def _same(a, b) -> bool:
    return torch.equal(a[0], b[0]) and all(torch.equal(x, y) for x, y in zip(a[1], b[1]))


def _close(a, b, tol) -> bool:
    return all(((x - y).abs().max() <= tol * y.abs().max() + 1e-9).item()
               for x, y in zip([a[0], *a[1]], [b[0], *b[1]]))


def _batch(cfg: SeqParConfig, rank: int = 0, seq: int = SEQ):
    from seqpar_ring.layout import shard_batch

    ids = torch.randint(0, VOCAB, (2, seq), generator=torch.Generator().manual_seed(1))
    b = shard_batch({"input_ids": ids, "labels": ids}, cfg.sp_size, rank, cfg.layout)
    return {"input_ids": b["input_ids"], "position_ids": b["position_ids"],
            "shift_labels": b["shift_labels"], "labels": b["shift_labels"]}


def test_hf_model_bit_identical_and_errors():
    from seqpar_ring.integrations.hf import patch
    from seqpar_ring.integrations.hf_reach import decoder_layers, get_activation_offload

    base = _tiny_llama()
    for reentrant in (False, True):
        kw = {"gradient_checkpointing_kwargs": {"use_reentrant": reentrant}}
        results = []
        for on in (False, True):
            cfg = SeqParConfig(sp_size=1, kernel="torch", activation_offload=on)
            model = copy.deepcopy(base)
            patch(model, cfg)
            model.gradient_checkpointing_enable(**kw)  # after patch: wrapped at the forward
            results.append(_run(model, _batch(cfg)))
        assert _same(results[0], results[1]), f"reentrant={reentrant}"
        off = get_activation_offload(model)
        assert (off.stats.packed, off.stats.fetched, off.stats.host_bytes) == (3, 3, 0)
        assert off.stats.host_peak_bytes == 3 * 2 * SEQ * 32 * 4  # 3 inputs of (2, 16, 32) fp32
        assert all(off.owns(layer._gradient_checkpointing_func)
                   for layer in decoder_layers(model))
    # the explicit tiled loss (hf_tiled) runs the decoder, not the LM wrapper: offloaded too
    from seqpar_ring.integrations.hf_tiled import tiled_causal_lm_loss, use_tiled_lm_head

    tiled = []
    for on in (False, True):
        tm = copy.deepcopy(base)
        use_tiled_lm_head(tm)
        patch(tm, SeqParConfig(sp_size=1, kernel="torch", activation_offload=on))
        tm.gradient_checkpointing_enable()
        loss = tiled_causal_lm_loss(tm, _batch(cfg), None)
        loss.backward()
        tiled.append((loss.detach(), [p.grad for p in tm.parameters()]))
    assert _same(tiled[0], tiled[1])
    assert get_activation_offload(tm).stats.packed == 3
    # switched off for an A/B run: a plain checkpoint, nothing moves
    off.enabled = False
    before = off.stats.packed
    assert _same(_run(model, _batch(cfg)), results[0]) and off.stats.packed == before
    off.enabled = True
    # patch with the key off again restores the layers' own checkpoint functions
    patch(model, SeqParConfig(sp_size=1, kernel="torch"))
    assert get_activation_offload(model) is None
    assert not any(hasattr(layer._gradient_checkpointing_func, "_seqpar_offload")
                   for layer in decoder_layers(model))
    # no checkpointing: an error naming the fix, not a silent no-op
    plain = copy.deepcopy(base)
    patch(plain, SeqParConfig(sp_size=1, kernel="torch", activation_offload=True))
    with pytest.raises(RuntimeError, match="gradient_checkpointing_enable"):
        plain(**_batch(cfg))
    with torch.no_grad():  # inference needs no checkpoint: allowed
        plain(**_batch(cfg))
    # another saved-tensor hook inside ours (what transformers' offload=True installs, around
    # the same checkpoint call; its pinned buffers need an accelerator): nothing reaches ours
    hf_off = copy.deepcopy(base)
    patch(hf_off, SeqParConfig(sp_size=1, kernel="torch", activation_offload=True))
    hf_off.gradient_checkpointing_enable()

    def inner_hooks(fn):
        def run(function, *args, **kwargs):
            with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
                return fn(function, *args, **kwargs)
        return run

    for layer in decoder_layers(hf_off):
        layer._gradient_checkpointing_func = inner_hooks(layer._gradient_checkpointing_func)
    with pytest.raises(RuntimeError, match="no input reached the offload hooks"):
        hf_off(**_batch(cfg))


def test_config_keys_and_flags():
    from seqpar_ring.integrations import deepspeed as sp_ds

    assert SeqParConfig().activation_offload is False and SeqParConfig().tiled_mlp is False
    for key in ("activation_offload", "tiled_mlp"):
        with pytest.raises(ValueError, match=rf"sequence_parallel\.{key}=1 must be true or false"):
            SeqParConfig(**{key: 1})
    cfg, ds = sp_ds.split_config({"sequence_parallel": {"size": 1, "activation_offload": True}})
    assert cfg.activation_offload and ds["sequence_parallel"]["tiled_mlp"] is False
    parser = sp_ds.add_argparse_args(argparse.ArgumentParser())
    args = parser.parse_args(["--sequence-parallel-activation-offload",
                              "--no-sequence-parallel-tiled-mlp"])
    cfg, _ = sp_ds.config_from_args(args, {"sequence_parallel": {"tiled_mlp": True}})
    assert cfg.activation_offload and not cfg.tiled_mlp  # flags override the JSON
    both = parser.parse_args(["--sequence-parallel-size", "2", "--ulysses-size", "2",
                              "--sequence-parallel-tiled-mlp", "--local_rank=1"])
    cfg, _ = sp_ds.config_from_args(both, {})  # reach flags next to main's ulysses/launcher flags
    assert (cfg.ulysses_size, cfg.tiled_mlp, cfg.activation_offload, both.local_rank) == (
        2, True, False, 1)
    assert sp_ds.config_from_args(parser.parse_args([]), {})[0] == SeqParConfig()
    from seqpar_ring.integrations import hf_reach

    for key in ("activation_offload", "tiled_mlp"):  # a model without HF decoder layers
        with pytest.raises(ValueError, match=f"{key}: .*set {key}=false"):
            hf_reach.apply(nn.Linear(2, 2), SeqParConfig(**{key: True}))
    for short in ("--offload", "--tiled-mlp", "--activation-offload"):
        with pytest.raises(SystemExit):  # never taken as a prefix of our flags
            parser.parse_args([short])


# --- two gloo ranks --------------------------------------------------------------------------
def _ds_config(extra):
    return {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
            "zero_allow_untested_optimizer": True, "steps_per_print": 1000,
            "optimizer": {"type": "SGD", "params": {"lr": 0.05, "momentum": 0.9}},
            "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
            "sequence_parallel": {"size": 2, "layout": "zigzag", "kernel": "torch", **extra}}


def _ds_train(extra, tile=None):
    import deepspeed

    from seqpar_ring.integrations import deepspeed as sp_ds
    from seqpar_ring.integrations.hf_reach import enable_tiled_mlp, get_activation_offload

    model = _tiny_llama(layers=2)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if tile:
        enable_tiled_mlp(model, tile)  # tiles of 3 tokens; initialize keeps the size
    engine, *_ = sp_ds.initialize(model=model, config=_ds_config(extra))
    cfg, rank = engine.seqpar_config, engine.seqpar_groups.sp_rank
    if tile:
        from deepspeed.utils import z3_leaf_module

        mlp = engine.module.model.layers[0].mlp
        assert mlp.forward.tile_size == tile and z3_leaf_module(mlp)
    losses = []
    for _ in range(2):
        loss = engine(**_batch(cfg, rank, seq=24)).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.detach())
    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params):
        out = (torch.stack(losses), [p.detach().clone() for p in params])
    off = get_activation_offload(engine.module)
    packed = off.stats.packed if off is not None else 0
    engine.destroy()
    return out, packed


def _two_rank_cases(rank, world):
    from seqpar_ring import groups as sp_groups
    from seqpar_ring.integrations.hf import patch

    groups = sp_groups.initialize(world)
    base = _tiny_llama()
    dil = dict(attention="dilated", layout="contiguous", segment_lengths=[8, 16],
               dilation_rates=[1, 2])
    for name, extra in (("ring", {"layout": "zigzag"}), ("dilated", dil)):
        results = {}
        for key, opts in (("off", {}), ("offload", {"activation_offload": True}),
                          ("tiled", {"tiled_mlp": True})):
            cfg = SeqParConfig(sp_size=world, kernel="torch", **extra, **opts)
            model = copy.deepcopy(base)
            patch(model, cfg, groups)
            model.gradient_checkpointing_enable()
            results[key] = _run(model, _batch(cfg, groups.sp_rank), groups.sp_group)
        assert _same(results["offload"], results["off"]), f"{name}: offload changed the result"
        assert _close(results["tiled"], results["off"], 1e-5), f"{name}: tiled MLP"
    # DeepSpeed ZeRO-3, SP = 2: offload alone is bit-identical; with the tiled MLP (3-token
    # tiles, weights gathered as one ZeRO-3 leaf) within fp32 rounding
    plain, _ = _ds_train({})
    offloaded, packed = _ds_train({"activation_offload": True})
    assert packed == 2 * 2, packed  # 2 layers x 2 steps
    both, _ = _ds_train({"activation_offload": True, "tiled_mlp": True}, tile=3)
    assert _same(offloaded, plain), "ZeRO-3: offload changed the result"
    assert _close(both, plain, 1e-5), "ZeRO-3: offload + tiled MLP"
    sp_groups.destroy()


def test_two_ranks_ring_dilated_zero3():
    run_distributed(_two_rank_cases, 2, timeout=240)


# --- CUDA (skipped on CPU): streams, pinned pieces, prefetch -----------------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bit_identical_with_streams_and_pinned_pieces():
    from transformers import LlamaConfig, LlamaForCausalLM

    from seqpar_ring.integrations.hf_reach import enable_activation_offload

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=1024, intermediate_size=2048,
                      num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=2,
                      max_position_embeddings=4096, attention_dropout=0.0)
    # eager attention: no atomics in its backward, so two runs can be compared bit for bit
    base = LlamaForCausalLM._from_config(cfg, attn_implementation="eager")
    base = base.to("cuda", torch.bfloat16).train()
    ids = torch.randint(0, 256, (1, 3000), device="cuda")  # 6,144,000 B per input: 3 pieces
    results = []
    for on in (False, True):
        model = copy.deepcopy(base)
        model.gradient_checkpointing_enable()
        off = enable_activation_offload(model) if on else None
        for _ in range(2):  # the second step reuses cached pinned blocks
            results.append(_run(model, {"input_ids": ids, "labels": ids}))
        torch.cuda.synchronize()
    assert _same(results[0], results[2]) and _same(results[1], results[3])
    s = off.stats
    assert (s.packed, s.fetched, s.prefetched, s.host_bytes) == (6, 6, 4, 0)
    assert s.host_peak_bytes == 3 * 3000 * 1024 * 2
    pieces = host_pieces(3000 * 1024 * 2)  # powers of two, largest first, then a short tail
    assert sum(pieces) == 3000 * 1024 * 2 and pieces[0] == 2**22
    assert all(p & (p - 1) == 0 for p in pieces[:-1]) and pieces[-1] < MIN_PIECE_BYTES
