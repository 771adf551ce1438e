"""Sequence-tiled gated MLP against the plain HF module: forward and every gradient.

fp32 <= 1e-5 and fp64 <= 1e-10 (relative to the largest value), tiles that do not divide the
token count, batch > 1, biases, frozen weights; hooks on the weights fire once per backward
(what DeepSpeed's gradient hooks need); the model-level switch and its refusals.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

from transformers import (  # noqa: E402
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    Qwen2Config,
)
from transformers.models.llama.modeling_llama import LlamaMLP  # noqa: E402
from transformers.models.mistral.modeling_mistral import MistralMLP  # noqa: E402
from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP  # noqa: E402

from seqpar_ring.integrations import hf_reach  # noqa: E402
from seqpar_ring.tiled_mlp import (  # noqa: E402
    is_gated_mlp,
    is_tiled,
    tile_gated_mlp,
    tiled_gated_mlp,
    untile,
)

TOL = {torch.float32: 1e-5, torch.float64: 1e-10}


def _mlp(kind: str, dtype, bias: bool = False) -> nn.Module:
    torch.manual_seed(0)
    kw = dict(hidden_size=24, intermediate_size=56, num_attention_heads=4, num_key_value_heads=2)
    if kind == "llama":
        return LlamaMLP(LlamaConfig(**kw, mlp_bias=bias)).to(dtype)
    if kind == "mistral":
        return MistralMLP(MistralConfig(**kw)).to(dtype)
    return Qwen2MLP(Qwen2Config(**kw)).to(dtype)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_plain_module(dtype):
    cases = [("llama", False, 7), ("llama", True, 5), ("mistral", False, 64), ("qwen2", False, 1)]
    for kind, bias, tile in cases:
        plain = _mlp(kind, dtype, bias)
        tiled = tile_gated_mlp(copy.deepcopy(plain), tile)
        assert is_tiled(tiled) and not is_tiled(plain)
        x = torch.randn(2, 37, 24, dtype=dtype, requires_grad=True)  # 74 rows: tiles don't divide
        xt = x.detach().clone().requires_grad_()
        y, yt = plain(x), tiled(xt)
        dy = torch.randn_like(y)
        y.backward(dy)
        yt.backward(dy)
        what = f"{kind} bias={bias} tile={tile} {dtype}"
        assert yt.shape == y.shape and yt.dtype == y.dtype
        assert _rel(yt, y) <= TOL[dtype], what
        assert _rel(xt.grad, x.grad) <= TOL[dtype], what
        for (n, p), q in zip(plain.named_parameters(), tiled.parameters()):
            assert _rel(q.grad, p.grad) <= TOL[dtype], f"{what}: {n}"


def test_frozen_weights_hooks_once_and_untile():
    plain = _mlp("llama", torch.float32, bias=True)
    tiled = tile_gated_mlp(copy.deepcopy(plain), 4)
    for m in (plain, tiled):
        m.up_proj.weight.requires_grad_(False)
        m.down_proj.bias.requires_grad_(False)
    calls = []
    for n, p in tiled.named_parameters():
        if p.requires_grad:
            p.register_hook(lambda g, n=n: calls.append(n) or g)
    x = torch.randn(1, 18, 24)
    plain(x).sum().backward()
    tiled(x).sum().backward()
    assert tiled.up_proj.weight.grad is None and tiled.down_proj.bias.grad is None
    for (n, p), q in zip(plain.named_parameters(), tiled.parameters()):
        if p.requires_grad:
            assert _rel(q.grad, p.grad) <= 1e-5, n
    # one gradient per weight per backward, not one per tile (5 tiles here)
    assert sorted(calls) == sorted(n for n, p in tiled.named_parameters() if p.requires_grad)
    untile(tiled)
    assert not is_tiled(tiled) and "forward" not in tiled.__dict__
    assert torch.equal(tiled(x), plain(x))


def test_autocast_dtype_follows_plain_module():
    plain = _mlp("llama", torch.float32)
    tiled = tile_gated_mlp(copy.deepcopy(plain), 8)
    x = torch.randn(1, 20, 24, requires_grad=True)
    xt = x.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, yt = plain(x), tiled(xt)
    assert yt.dtype == y.dtype == torch.bfloat16
    y.float().sum().backward()
    yt.float().sum().backward()
    assert xt.grad.dtype == torch.float32 and tiled.gate_proj.weight.grad.dtype == torch.float32
    assert _rel(xt.grad, x.grad) <= 2e-2  # bf16 compute on both sides


def test_refusals():
    class Swapped(LlamaMLP):  # act on the up branch: not the expression that is tiled
        def forward(self, x):
            return self.down_proj(self.gate_proj(x) * self.act_fn(self.up_proj(x)))

    with pytest.raises(ValueError, match="is not down"):
        tile_gated_mlp(Swapped(LlamaConfig(hidden_size=16, intermediate_size=32,
                                           num_attention_heads=4)))
    drop = _mlp("llama", torch.float32)
    drop.dropout = nn.Dropout(0.1)
    assert not is_gated_mlp(drop)
    adapted = _mlp("llama", torch.float32)
    adapted.gate_proj = nn.Sequential(nn.Linear(24, 56))  # e.g. an adapter wrapper
    assert not is_gated_mlp(adapted)
    with pytest.raises(ValueError, match="not a plain gated MLP"):
        tile_gated_mlp(adapted)
    with pytest.raises(ValueError, match="tile_size"):
        m = _mlp("llama", torch.float32)
        tiled_gated_mlp(torch.ones(1, 2, 24), m.gate_proj, m.up_proj, m.down_proj, m.act_fn, -1)


def test_model_switch_keeps_state_and_rng():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).float()
    keys = list(model.state_dict())
    torch.manual_seed(5)
    want = torch.rand(3)
    torch.manual_seed(5)
    assert hf_reach.enable_tiled_mlp(model, tile_size=3) == 2
    assert torch.equal(torch.rand(3), want)  # the expression check uses its own generator
    assert list(model.state_dict()) == keys
    assert all(is_tiled(layer.mlp) for layer in model.model.layers)
    hf_reach.enable_tiled_mlp(model)  # again, no tile size: keeps 3
    assert model.model.layers[0].mlp.forward.tile_size == 3
    hf_reach.disable_tiled_mlp(model)
    assert not any(is_tiled(layer.mlp) for layer in model.model.layers)
    bad = LlamaForCausalLM(cfg)
    bad.model.layers[1].mlp.dropout = nn.Dropout(0.5)
    with pytest.raises(ValueError, match="not plain gated MLPs"):
        hf_reach.enable_tiled_mlp(bad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16_close_to_plain():
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_attention_heads=8)
    plain = LlamaMLP(cfg).to("cuda", torch.bfloat16)
    tiled = tile_gated_mlp(copy.deepcopy(plain), 1000)
    x = torch.randn(1, 4096, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    xt = x.detach().clone().requires_grad_()
    y, yt = plain(x), tiled(xt)
    dy = torch.randn_like(y)
    y.backward(dy)
    yt.backward(dy)
    assert _rel(yt.float(), y.float()) <= 1e-2 and _rel(xt.grad.float(), x.grad.float()) <= 2e-2
    for p, q in zip(plain.parameters(), tiled.parameters()):
        assert _rel(q.grad.float(), p.grad.float()) <= 2e-2
