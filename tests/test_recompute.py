"""Attention kept across gradient checkpointing (`seqpar_ring.recompute`,
``SeqParConfig(recompute_attention=False)``): the same gradients as recomputing, one attention
forward per layer and step instead of two, every checkpointed call with its own results.

fp64 on CPU: kept and recomputed gradients are compared bitwise (the kept values are what the
recomputation computes), the HF model against the unpatched one within the 1e-10 / 1e-9 rule
of tests/test_hf_paths.py. The multi-rank cases (SP = 2 and 3, both layouts, two forwards
before one backward) are in `test_hf_paths._exact_cases`.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from test_hf_paths import assert_match, grads_of, model64, ref_step, rows
from torch.utils.checkpoint import checkpoint

from seqpar_ring import SeqParConfig, dilated_attention, ring
from seqpar_ring.integrations.hf import patch
from seqpar_ring.recompute import keep_attention

B, S, E, H, HKV, D = 2, 24, 16, 4, 2, 8


@pytest.fixture
def count(monkeypatch):
    """Counts the ring passes' forwards (every attention computation goes through one)."""
    calls = {"n": 0}
    inner = ring.ring_forward

    def counted(*a, **kw):
        calls["n"] += 1
        return inner(*a, **kw)

    monkeypatch.setattr(ring, "ring_forward", counted)
    import seqpar_ring.dilated as dilated_mod
    monkeypatch.setattr(dilated_mod, "ring_forward", counted)
    return calls


def _weights(seed: int):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(E, n, generator=g, dtype=torch.float64) / 4).requires_grad_(True)
            for n in (H * D, HKV * D, HKV * D)] + [
        (torch.randn(H * D, E, generator=g, dtype=torch.float64) / 4).requires_grad_(True),
        torch.randn(H, generator=g, dtype=torch.float64).requires_grad_(True)]


def _layer(kind: str, x, wq, wk, wv, wo, sinks):
    q, k, v = ((x @ w).view(B, S, -1, D) for w in (wq, wk, wv))
    if kind == "dilated":
        o = dilated_attention(q, k, v, None, segment_lengths=(8, 24), dilation_rates=(1, 2),
                              kernel="torch")
    else:
        o = ring.ring_attention(q, k, v, None, window=5 if kind == "window" else None,
                                sinks=sinks if kind == "window" else None, kernel="torch")
    return o.reshape(B, S, H * D) @ wo


def _grads(kind: str, ckpt, xs, w):
    """Two forwards (two inputs) through two layers each, then one backward."""
    loss = 0.0
    for x in xs:
        h = x
        for _ in range(2):
            h = h + (ckpt(functools.partial(_layer, kind), h, *w) if ckpt else
                     _layer(kind, h, *w))
        loss = loss + (h ** 2).sum()
    leaves = [*xs, *w]
    for t in leaves:
        t.grad = None
    loss.backward()  # not autograd.grad: reentrant checkpointing refuses it
    return [t.grad for t in leaves]


@pytest.mark.parametrize("kind", ["dense", "window", "dilated"])
def test_kept_attention_gives_the_recomputed_gradients(kind, count):
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(B, S, E, generator=g, dtype=torch.float64).requires_grad_(True)
          for _ in range(2)]
    w = _weights(2)
    plain = _grads(kind, None, xs, w)
    runs = {}
    for reentrant in (False, True):
        ckpt = functools.partial(checkpoint, use_reentrant=reentrant)
        for name, fn in ((f"recompute {reentrant}", ckpt),
                         (f"kept {reentrant}", keep_attention(ckpt))):
            count["n"] = 0
            runs[name] = _grads(kind, fn, xs, w)
            runs[name + " passes"] = count["n"]
    passes = {"dense": 1, "window": 1, "dilated": 2}[kind]  # ring passes per attention call
    for reentrant in (False, True):  # 2 inputs x 2 layers, each twice / once
        assert runs[f"recompute {reentrant} passes"] == 2 * 4 * passes
        assert runs[f"kept {reentrant} passes"] == 4 * passes
        # bitwise against recomputing with the same checkpoint kind (the two kinds accumulate
        # the weights' gradients in different orders)
        for a, b, c in zip(runs[f"kept {reentrant}"], runs[f"recompute {reentrant}"], plain):
            if b is None:
                assert a is None and c is None
                continue
            assert torch.equal(a, b), f"{kind}/reentrant={reentrant}: not the recomputed grad"
            assert (a - c).abs().max().item() <= 1e-10 * max(c.abs().max().item(), 1.0)


def test_backward_twice_through_a_kept_call_is_refused():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(B, S, E, generator=g, dtype=torch.float64).requires_grad_(True)
    w = _weights(4)
    ckpt = keep_attention(functools.partial(checkpoint, use_reentrant=False))
    loss = ckpt(functools.partial(_layer, "dense"), x, *w).sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="recomputed twice.*recompute_attention=True"):
        loss.backward()


def test_hf_model_keeps_attention_and_stays_exact(count):
    """sp = 1, two forwards with different documents before one backward, under checkpointing:
    loss and every gradient as the unpatched model; one attention pass per layer and forward."""
    base = model64()
    layers = base.config.num_hidden_layers
    a, b = rows(2, [[5, 7, 4], [9, 7]]), rows(3, [[16], [16]])
    (ra, rb), rg = ref_step(base, a, b)
    for recompute in (True, False):
        model = copy.deepcopy(base)
        patch(model, SeqParConfig(sp_size=1, recompute_attention=recompute))
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        count["n"] = 0
        la, lb = model(**a).loss, model(**b).loss
        (la + lb).backward()
        assert count["n"] == 2 * layers * (2 if recompute else 1), (recompute, count["n"])
        assert_match(f"recompute_attention={recompute}", la + lb, grads_of(model), ra + rb, rg)


def test_hf_option_without_checkpointing_is_an_error():
    model = model64()
    patch(model, SeqParConfig(sp_size=1, recompute_attention=False))
    model.train()
    with pytest.raises(RuntimeError, match="checkpointing is off.*gradient_checkpointing_enable"):
        model(**rows(2, [[8], [8]]))
    with torch.no_grad():  # evaluation needs no checkpointing
        model(**rows(2, [[8], [8]]))
    patch(model, SeqParConfig(sp_size=1))  # turned off again: no error
    model(**rows(2, [[8], [8]])).loss.backward()


def test_config_field():
    assert SeqParConfig().recompute_attention is True
    with pytest.raises(ValueError, match="recompute_attention"):
        SeqParConfig(recompute_attention="no")


def test_register_path_keeps_attention_and_stays_exact(count, monkeypatch):
    """register(config) + attn_implementation="seqpar_ring": patched at the first forward, the
    option applied there too (two forwards before one backward, under checkpointing)."""
    from transformers import AutoModelForCausalLM

    from seqpar_ring.integrations import hf as hf_mod
    from seqpar_ring.integrations.hf import ATTN_NAME, register

    monkeypatch.setattr(hf_mod, "_REGISTERED", [])  # this test's registration ends with it
    base = model64()
    a, b = rows(4, [[6, 10], [16]]), rows(5, [[9, 7], [4, 12]])
    (ra, rb), rg = ref_step(base, a, b)
    register(SeqParConfig(sp_size=1, recompute_attention=False))
    model = AutoModelForCausalLM.from_config(copy.deepcopy(base.config),
                                             attn_implementation=ATTN_NAME).double()
    model.load_state_dict(base.state_dict())
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    count["n"] = 0
    la, lb = model(**a).loss, model(**b).loss
    (la + lb).backward()
    assert count["n"] == 2 * base.config.num_hidden_layers  # once per layer and forward
    assert_match("register, recompute_attention=False", la + lb, grads_of(model), ra + rb, rg)
