"""State lives with the model; the hot path has no per-call agreement; a layer compiles.

* Two models patched with different configs in one process (ring zigzag and dilated) each
  compute their own function, interleaved, on 2 gloo ranks: loss and gradients match their
  references (the unpatched model / a one-process dilated run).
* A training step through the HF adapter makes exactly ONE agreement exchange (the decoder's
  pre-forward hook), however many layers, with gradient checkpointing recomputing them.
* A patched decoder layer traces as one graph (``torch.compile(fullgraph=True)``) at world 1.
"""

from __future__ import annotations

import copy

import pytest
import torch
from _dist import run_distributed

pytest.importorskip("transformers")

from seqpar_ring import SeqParConfig  # noqa: E402
from seqpar_ring import agreement  # noqa: E402


def _two_models(rank: int, world: int) -> int:
    from test_hf import assert_match, loss_and_grads, make_batch, tiny_model

    from seqpar_ring import groups as sp_groups
    from seqpar_ring.integrations.hf import SPDataCollator, patch

    groups = sp_groups.initialize(world)
    base = tiny_model("llama")
    ring_cfg = SeqParConfig(sp_size=world, layout="zigzag")
    dil = dict(attention="dilated", segment_lengths=[8, 16], dilation_rates=[1, 2])
    dil_cfg = SeqParConfig(sp_size=world, **dil)
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    patch(a, ring_cfg, groups)
    patch(b, dil_cfg, groups)  # must not change a's attention
    ref_dilated = copy.deepcopy(base)
    patch(ref_dilated, SeqParConfig(sp_size=1, **dil), None)
    batch = make_batch("plain")
    want_a = loss_and_grads(copy.deepcopy(base), batch)
    want_b = loss_and_grads(ref_dilated, batch)
    local_a = SPDataCollator(ring_cfg, groups).shard(dict(batch))
    local_b = SPDataCollator(dil_cfg, groups).shard(dict(batch))
    for _ in range(2):  # interleaved: each model keeps its own settings
        assert_match("model a (ring)", *loss_and_grads(a, local_a, groups.sp_group), *want_a)
        assert_match("model b (dilated)", *loss_and_grads(b, local_b, groups.sp_group), *want_b)
    assert abs(want_a[0] - want_b[0]) > 1e-4  # the two functions really differ

    # one agreement per step: a 4-layer model with gradient checkpointing
    deep = tiny_model("llama", num_hidden_layers=4)
    deep.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    deep.train()
    patch(deep, ring_cfg, groups)
    local = SPDataCollator(ring_cfg, groups).shard(make_batch("packed"))
    agreement.stats.reset()
    deep(**local).loss.backward()
    exchanges = agreement.stats.exchanges
    sp_groups.destroy()
    return exchanges


def test_two_models_one_process_and_one_agreement_per_step():
    assert run_distributed(_two_models, 2, timeout=150.0) == [1, 1]


def test_patched_decoder_layer_compiles_fullgraph():
    from test_hf import tiny_model

    from seqpar_ring.integrations.hf import patch

    model = tiny_model("llama")
    patch(model, SeqParConfig(sp_size=1))
    layer = model.model.layers[0]
    hidden = torch.randn(1, 16, 32, requires_grad=True)
    pos = torch.arange(16)[None]
    pe = model.model.rotary_emb(hidden, pos)
    # What the decoder's hook adds to every layer call of a forward (the ranks agreed; plain rows)
    from seqpar_ring.integrations.hf_batch import AGREED_KEY, DOC_IDS_KEY

    hooked = {DOC_IDS_KEY: None, AGREED_KEY: True}

    def run(h):
        out = layer(h, attention_mask=None, position_ids=pos, position_embeddings=pe, **hooked)
        return out[0] if isinstance(out, tuple) else out

    eager = run(hidden)
    fn = torch.compile(run, fullgraph=True, backend="aot_eager")
    with torch._dynamo.config.patch(recompile_limit=1):  # later calls reuse the one graph
        for _ in range(3):
            compiled = fn(hidden)
            torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
            compiled.sum().backward()
    assert hidden.grad is not None and torch.isfinite(hidden.grad).all()
