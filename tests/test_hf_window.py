"""Sliding-window and sink models patched for SP vs the same model with transformers' eager
attention: Mistral, Qwen2 (use_sliding_window), Qwen3 and Gemma 3 (layer_types), Gemma 2
(soft-capping off) and gpt-oss (sinks) at SP = 1, 2, 3; contiguous and zigzag; plain, packed and
padded rows; windows smaller than a shard, larger than a shard and larger than the sequence.

Tiny random fp32 models (no downloads). Loss within 1e-5 relative, every parameter gradient
(sinks included) within 1e-5 of its largest entry. One spawned group per world size runs all.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from _dist import run_distributed

pytest.importorskip("transformers")

from transformers import (  # noqa: E402
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GptOssConfig,
    GptOssForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from seqpar_ring import SeqParConfig, groups as sp_groups  # noqa: E402
from seqpar_ring.integrations.hf import SPDataCollator, patch  # noqa: E402
from seqpar_ring.integrations.hf_window import layer_kinds  # noqa: E402

VOCAB, SEQ = 96, 24
LOSS_RTOL, GRAD_RTOL = 1e-5, 1e-5
TIMEOUT_S = 400.0
COMMON = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=8, vocab_size=VOCAB, attention_dropout=0.0,
              max_position_embeddings=64)
TYPES = ["sliding_attention", "full_attention"]


def tiny(name: str, window: int, seed: int = 0):
    """A tiny random model of family ``name`` whose sliding layers have ``window``."""
    kw = dict(COMMON, sliding_window=window)
    if name == "mistral":
        cls, cfg = MistralForCausalLM, MistralConfig(**kw)
    elif name == "qwen2":  # layers >= max_window_layers slide
        cls, cfg = Qwen2ForCausalLM, Qwen2Config(use_sliding_window=True, max_window_layers=1,
                                                   **kw)
    elif name == "qwen3":
        cls, cfg = Qwen3ForCausalLM, Qwen3Config(layer_types=TYPES, use_sliding_window=True,
                                                   **kw)
    elif name == "gemma2":
        cls, cfg = Gemma2ForCausalLM, Gemma2Config(layer_types=TYPES, query_pre_attn_scalar=8,
                                                   attn_logit_softcapping=None,
                                                   final_logit_softcapping=None, **kw)
    elif name == "gemma3":
        cls, cfg = Gemma3ForCausalLM, Gemma3TextConfig(layer_types=TYPES, query_pre_attn_scalar=8,
                                                       **kw)
    elif name == "gpt_oss":
        cls, cfg = GptOssForCausalLM, GptOssConfig(layer_types=TYPES, num_local_experts=2,
                                                   num_experts_per_tok=1, **kw)
    else:
        raise ValueError(name)
    torch.manual_seed(seed)
    model = cls(cfg).float()
    with torch.no_grad():  # sinks start at zero-ish; make them matter
        for m in model.modules():
            if isinstance(getattr(m, "sinks", None), torch.nn.Parameter):
                m.sinks.normal_(0.0, 1.0)
    model.config.use_cache = False
    return model


FAMILIES = ("mistral", "qwen2", "qwen3", "gemma2", "gemma3", "gpt_oss")


def make_batch(kind: str, seed: int = 1) -> dict:
    """Full rows: 'plain', 'packed' (documents of 5, 11, 8 and 13, 11) or 'pad' (22 tokens,
    right padding in row 0, left padding in row 1)."""
    g = torch.Generator().manual_seed(seed)
    n = 22 if kind == "pad" else SEQ
    ids = torch.randint(1, VOCAB, (2, n), generator=g)
    pos = torch.arange(n).expand(2, n).clone()
    labels = ids.clone()
    batch = dict(input_ids=ids, position_ids=pos, labels=labels)
    if kind == "pad":
        mask = torch.ones_like(ids)
        mask[0, -4:] = 0
        mask[1, :3] = 0
        labels = ids.masked_fill(mask == 0, -100)
        labels[1, 3] = -100  # predicted from a padding position: its output is unspecified
        batch.update(attention_mask=mask, labels=labels)
    if kind == "packed":
        for r, lens in enumerate([[5, 11, 8], [13, 11]]):
            pos[r] = torch.cat([torch.arange(k) for k in lens])
        batch["labels"] = labels.masked_fill(pos == 0, -100)
    return batch


def loss_and_grads(model, batch, group=None):
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    grads = {}
    for name, p in model.named_parameters():
        g = p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
        if group is not None:
            dist.all_reduce(g, group=group)
        grads[name] = g
    return loss.item(), grads


def _per_document(model, batch):
    """Loss and gradients of packed rows, one document per forward: gpt-oss builds its masks
    without position_ids (transformers 5.24), so its eager path cannot see packed documents."""
    model.zero_grad(set_to_none=True)
    total, count = 0.0, 0
    for ids, pos, labels in zip(batch["input_ids"], batch["position_ids"], batch["labels"]):
        starts = [*(pos == 0).nonzero().flatten().tolist(), len(pos)]
        for a, b in zip(starts, starts[1:]):
            n = int((labels[a + 1:b] != -100).sum())  # predictions inside the document
            out = model(input_ids=ids[None, a:b], labels=labels[None, a:b])
            total = total + out.loss * n
            count += n
    loss = total / count
    loss.backward()
    grads = {n: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
             for n, p in model.named_parameters()}
    return loss.item(), grads


def _check(what, model, cfg, groups, batch, per_document=False):
    ref_model = copy.deepcopy(model)
    ref_model.set_attn_implementation("eager")
    ref_loss, ref_grads = (_per_document if per_document else loss_and_grads)(ref_model, batch)
    patch(model, cfg, groups)
    local = SPDataCollator(cfg, groups).shard(dict(batch))
    loss, grads = loss_and_grads(model, local, groups.sp_group if groups.sp_size > 1 else None)
    assert abs(loss - ref_loss) <= LOSS_RTOL * abs(ref_loss), f"{what}: loss {loss} vs {ref_loss}"
    for name, ref in ref_grads.items():
        err = (grads[name] - ref).abs().max().item()
        scale = ref.abs().max().item()
        assert err <= GRAD_RTOL * scale + 1e-9, f"{what}: grad {name} err {err:.3e} ({scale:.3e})"


def _cases(rank: int, world: int) -> int:
    torch.set_num_threads(1)
    groups = sp_groups.initialize(world)
    n = 0
    windows = (3, 10, 40)  # < a shard (SP 2, 3), > a shard, > the sequence
    for f, name in enumerate(FAMILIES):
        for layout in ("contiguous", "zigzag"):
            cfg = SeqParConfig(sp_size=world, layout=layout)
            for i, kind in enumerate(("plain", "packed", "pad")):
                w = windows[(f + i + (layout == "zigzag")) % 3]
                _check(f"{name}/W{w}/{layout}/{kind}/sp{world}", tiny(name, w), cfg, groups,
                       make_batch(kind), per_document=name == "gpt_oss" and kind == "packed")
                n += 1
    sp_groups.destroy()
    return n


@pytest.mark.parametrize("world", [1, 2, 3])
def test_window_models_match_eager(world):
    assert run_distributed(_cases, world, timeout=TIMEOUT_S) == [36] * world


def test_layer_kinds_and_softcap_refused():
    kinds = {name: layer_kinds(tiny(name, 5)) for name in FAMILIES}
    assert [k.window for k in kinds["mistral"]] == [5, 5]
    assert [k.window for k in kinds["qwen2"]] == [None, 5]
    for name in ("qwen3", "gemma2", "gemma3", "gpt_oss"):
        assert [k.window for k in kinds[name]] == [5, None], name
    assert [k.sinks for k in kinds["gpt_oss"]] == [True, True]
    assert not any(k.sinks for k in kinds["mistral"])
    capped = tiny("gemma2", 5)
    capped.config.attn_logit_softcapping = 50.0
    for m in capped.modules():
        if hasattr(m, "attn_logit_softcapping"):
            m.attn_logit_softcapping = 50.0
    with pytest.raises(ValueError, match="attn_logit_softcapping"):
        patch(capped, SeqParConfig(sp_size=1))
