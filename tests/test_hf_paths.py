"""Ordinary Hugging Face calls outside the collator route: exact, or a clear error on every rank.

Each exact case compares a patched tiny Llama (fp64) with the UNPATCHED model (SDPA attention)
run on one process: the loss, and every parameter gradient (summed over the SP ranks). Packed
rows are referenced by running each document as its own row, so the reference never relies on
a packed mask. Tolerances, fp64: loss 1e-10 relative, gradients 1e-9 of the largest gradient.
Error cases check that every rank raises the same error within seconds (no killed process).
"""

from __future__ import annotations

import copy
import dataclasses
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from _dist import run_distributed

pytest.importorskip("transformers")

from test_hf import VOCAB, tiny_model  # noqa: E402
from test_reliability import _raises  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from seqpar_ring import SeqParConfig, groups as sp_groups, shard_batch  # noqa: E402
from seqpar_ring.integrations.hf import (  # noqa: E402
    ATTN_NAME,
    DOC_IDS_KEY,
    SPDataCollator,
    patch,
    register,
    sync_sp_gradients,
)

LOSS_RTOL, GRAD_RTOL = 1e-10, 1e-9
TIMEOUT_S = 400.0
FAST_S = 20.0


def model64(**kw):
    return tiny_model("llama", **kw).double()


def unpatched(model):
    """The unpatched model with transformers' SDPA attention: exact in fp64 on CPU (its eager
    attention takes the softmax in fp32, and gives NaN rows under left padding)."""
    ref = copy.deepcopy(model)
    ref.set_attn_implementation("sdpa")
    return ref


def rows(seed: int, lens: list[list[int]], pad_left: int = 0, pad_right: int = 0) -> dict:
    """Full rows of packed documents (position_ids restart), optional padding (mask 0)."""
    g = torch.Generator().manual_seed(seed)
    n = sum(lens[0])
    ids = torch.randint(1, VOCAB, (len(lens), n + pad_left + pad_right), generator=g)
    pos = torch.stack([torch.cat([torch.zeros(pad_left, dtype=torch.long)] +
                                 [torch.arange(m) for m in row] +
                                 [torch.arange(pad_right)]) for row in lens])
    mask = torch.ones_like(ids)
    mask[:, :pad_left] = 0
    mask[:, ids.shape[1] - pad_right:] = 0
    labels = ids.masked_fill((pos == 0) | (mask == 0), -100)
    out = dict(input_ids=ids, position_ids=pos, labels=labels)
    if pad_left or pad_right:
        out["attention_mask"] = mask
    return out


def reference(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of every real token with each document run alone; the token-mean loss."""
    ids, pos = batch["input_ids"], batch["position_ids"]
    mask = batch.get("attention_mask", torch.ones_like(ids))
    logits = torch.zeros(*ids.shape, VOCAB, dtype=torch.float64)
    for r in range(ids.shape[0]):
        real = (mask[r] == 1).nonzero().flatten()
        starts = [int(i) for i in real if pos[r, i] == 0 or i == real[0]] + [int(real[-1]) + 1]
        for a, b in zip(starts[:-1], starts[1:]):
            logits[r, a:b] = model(input_ids=ids[r:r + 1, a:b]).logits[0]
    shift = F.pad(batch["labels"][:, 1:], (0, 1), value=-100)
    loss = F.cross_entropy(logits.flatten(0, 1), shift.flatten(), ignore_index=-100)
    return loss, logits


def grads_of(model, group=None) -> dict:
    out = {}
    for n, p in model.named_parameters():
        g = torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
        if group is not None:
            dist.all_reduce(g, group=group)
        out[n] = g
    model.zero_grad(set_to_none=True)
    return out


def assert_match(what, loss, grads, ref_loss, ref_grads) -> None:
    assert abs(float(loss) - float(ref_loss)) <= LOSS_RTOL * abs(float(ref_loss)), (
        f"{what}: loss {float(loss)!r} vs {float(ref_loss)!r}")
    top = max(g.abs().max().item() for g in ref_grads.values())
    for n, ref in ref_grads.items():
        err = (grads[n] - ref).abs().max().item()
        assert err <= GRAD_RTOL * top, f"{what}: grad {n} err {err:.3e} (largest {top:.3e})"


def ref_step(base, *batches) -> tuple[float, dict]:
    ref = unpatched(base)
    losses = [reference(ref, b)[0] for b in batches]
    sum(losses).backward()
    losses = [x.detach() for x in losses]
    return [x.item() for x in losses], grads_of(ref)


# ---------------------------------------------------------------- one process (sp = 1)

def test_sp1_mask_without_positions_left_padding():
    base = model64()
    batch = rows(1, [[12], [12]], pad_left=4)
    batch["attention_mask"][1, :4] = 1  # row 1: no padding
    batch["labels"][1, :4] = batch["input_ids"][1, :4]
    batch["position_ids"][1] = torch.arange(16)
    model = copy.deepcopy(base)
    patch(model, SeqParConfig(sp_size=1))
    plain = unpatched(base)
    call = {k: batch[k] for k in ("input_ids", "attention_mask")}  # no position_ids
    got, want = model(**call).logits, plain(**call).logits
    real = batch["attention_mask"].bool()
    assert (got[real] - want[real]).abs().max().item() < 1e-10


def test_sp1_mask_changed_in_place_and_two_forwards_under_checkpointing():
    base = model64()
    model = copy.deepcopy(base)
    patch(model, SeqParConfig(sp_size=1))
    model.gradient_checkpointing_enable()
    model.train()
    a = rows(2, [[5, 7, 4], [9, 7]])
    b = rows(3, [[16], [16]])
    ids, mask = a["input_ids"], torch.ones_like(a["input_ids"])
    out1 = model(input_ids=ids, attention_mask=mask).logits
    mask[:, -5:] = 0  # in place: the same tensor object, new padding
    out2 = model(input_ids=ids, attention_mask=mask).logits
    ref = unpatched(base)
    assert (out1 - ref(input_ids=ids).logits).abs().max() < 1e-10
    keep = mask.bool()  # right padding: each row's first 11 tokens alone
    assert (out2[keep] - ref(input_ids=ids[:, :-5]).logits.flatten(0, 1)).abs().max() < 1e-10
    # two forwards with different documents, then one backward: each recomputation sees its own
    la, lb = model(**a).loss, model(**b).loss
    (la + lb).backward()
    (ra, rb), rg = ref_step(base, a, b)
    assert_match("sp1 two forwards", la + lb, grads_of(model), ra + rb, rg)


def test_sp1_flattened_batches_cu_seq_lens_and_seq_idx():
    base = model64()
    model = copy.deepcopy(base)
    patch(model, SeqParConfig(sp_size=1))
    a = rows(4, [[6, 1, 9]])
    ids, lens = a["input_ids"], [0, 6, 7, 16]
    cu = torch.tensor(lens, dtype=torch.int32)
    want = reference(unpatched(base), a)[1]
    got = model(input_ids=ids, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=9,
                max_length_k=9).logits
    # The model ropes positions 0..15 here (no position_ids), the reference 0..n-1 per document:
    # equal relative positions, but transformers builds its cos/sin tables in fp32, hence 1e-9.
    tol = 2e-9
    assert (got - want).abs().max() < tol
    seq_idx = torch.tensor([[0] * 6 + [1] + [2] * 9])
    assert (model(input_ids=ids, seq_idx=seq_idx).logits - want).abs().max() < tol
    with pytest.raises(ValueError, match="cu_seq_lens_q and cu_seq_lens_k must both"):
        model(input_ids=ids, cu_seq_lens_q=cu)


def test_sp1_autocast_on_an_fp32_model_matches_sdpa():
    base = tiny_model("llama")
    model = copy.deepcopy(base)
    patch(model, SeqParConfig(sp_size=1))
    ref = copy.deepcopy(base)
    ref.set_attn_implementation("sdpa")
    batch = rows(5, [[16], [16]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = model(**batch)
        want = ref(**batch)
    got.loss.backward()
    scale = want.logits.float().abs().max().item()
    assert (got.logits.float() - want.logits.float()).abs().max().item() <= 0.02 * scale
    assert abs(got.loss.item() - want.loss.item()) <= 0.01 * want.loss.item()


def test_sp1_generate_matches_the_unpatched_model():
    base = model64()
    model = copy.deepcopy(base)
    patch(model, SeqParConfig(sp_size=1))
    model.config.use_cache = True
    ref = unpatched(base)
    ref.config.use_cache = True
    ids = torch.randint(1, VOCAB, (2, 7), generator=torch.Generator().manual_seed(6))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding, as generate wants it
    kw = dict(max_new_tokens=5, do_sample=False, output_scores=True, return_dict_in_generate=True,
              pad_token_id=0)
    got = model.generate(input_ids=ids, attention_mask=mask, **kw)
    want = ref.generate(input_ids=ids, attention_mask=mask, **kw)
    assert torch.equal(got.sequences, want.sequences)
    for s, t in zip(got.scores, want.scores):  # generate hands out scores in fp32
        assert (s - t).abs().max().item() < 1e-6


def test_sp1_mistakes_get_clear_errors():
    model = model64()
    patch(model, SeqParConfig(sp_size=1, layout="zigzag"))
    ids = torch.randint(1, VOCAB, (1, 7))
    model(input_ids=ids)  # odd length at sp = 1: the layout is the identity there
    with pytest.raises(ValueError, match="2D .batch, seq. mask"):
        model(input_ids=ids, attention_mask=torch.ones(1, 1, 7, 7))
    with pytest.raises(ValueError, match="integer document ids"):
        model(input_ids=ids, **{DOC_IDS_KEY: torch.zeros(1, 7)})


# ---------------------------------------------------------------- SP groups

def _exact_cases(rank: int, world: int) -> None:
    groups = sp_groups.initialize(world)
    g = groups.sp_group
    base = model64()
    div = 2 * world
    a = rows(7, [[5 * world, 4 * world, 3 * world], [12 * world]])
    b = rows(8, [[2 * world, 10 * world], [3 * world, 1, 9 * world - 1]], pad_right=0)
    for layout in ("contiguous", "zigzag"):
        cfg = SeqParConfig(sp_size=world, layout=layout)
        (ra, rb), rg = ref_step(base, a, b)
        # recompute_attention=False: attention kept across the recomputation (recompute.py)
        for route, recompute in (("shard_batch", True), ("derived", True),
                                 ("derived", False)):
            # two forwards (different documents) before one backward, under checkpointing
            model = copy.deepcopy(base)
            patch(model, dataclasses.replace(cfg, recompute_attention=recompute), groups)
            model.gradient_checkpointing_enable()
            model.train()
            sa, sb = (shard_batch(x, world, groups.sp_rank, layout, pad_to_multiple_of=div)
                      for x in (a, b))
            if route == "derived":  # no ids given: the hook derives them from the positions
                sa.pop(DOC_IDS_KEY), sb.pop(DOC_IDS_KEY)
            la, lb = model(**sa).loss, model(**sb).loss
            (la + lb).backward()
            assert_match(f"{layout}/{route}/recompute={recompute}/two forwards", la + lb,
                         grads_of(model, g), ra + rb, rg)
        # a padding mask changed in place between two calls (same tensor objects)
        model = copy.deepcopy(base)
        patch(model, cfg, groups)
        full = rows(9, [[8 * world], [8 * world]])
        sh = shard_batch(dict(full, attention_mask=torch.ones_like(full["input_ids"])), world,
                         groups.sp_rank, layout)
        sh.pop(DOC_IDS_KEY, None)
        model(**sh).loss.backward()
        model.zero_grad(set_to_none=True)
        pad = torch.zeros_like(full["input_ids"])
        pad[:, -3 * world:] = 1
        sh["attention_mask"].copy_(1 - shard_batch({"x": pad}, world, groups.sp_rank,
                                                   layout)["x"])
        full = dict(full, attention_mask=1 - pad, labels=full["labels"].masked_fill(pad == 1,
                                                                                    -100))
        sh["labels"] = sh["shift_labels"] = shard_batch(full, world, groups.sp_rank,
                                                        layout)["shift_labels"]
        loss = model(**sh).loss
        loss.backward()
        (rl,), rg = ref_step(base, full)
        assert_match(f"{layout}/mask changed in place", loss, grads_of(model, g), rl, rg)
        # documents exactly one shard long (contiguous): ids come with shard_batch
        one = rows(10, [[div] * world])
        sh = shard_batch(one, world, groups.sp_rank, layout)
        model = copy.deepcopy(base)
        patch(model, cfg, groups)
        loss = model(**sh).loss
        loss.backward()
        (rl,), rg = ref_step(base, one)
        assert_match(f"{layout}/documents one shard long", loss, grads_of(model, g), rl, rg)
    # register(config) + attn_implementation: the SP loss, the guard, both layouts
    for layout in ("contiguous", "zigzag"):
        cfg = SeqParConfig(sp_size=world, layout=layout)
        register(cfg, groups)
        loaded = AutoModelForCausalLM.from_config(copy.deepcopy(base.config),
                                                  attn_implementation=ATTN_NAME).double()
        loaded.load_state_dict(base.state_dict())
        loss = loaded(**SPDataCollator(cfg, groups).shard(dict(a))).loss
        loss.backward()
        (rl,), rg = ref_step(base, a)
        assert_match(f"register/{layout}", loss, grads_of(loaded, g), rl, rg)
        loaded(**SPDataCollator(cfg, groups).shard(dict(a))).loss.backward()
        opt = torch.optim.SGD(loaded.parameters(), lr=0.1)
        with pytest.raises(RuntimeError, match="never summed"):
            opt.step()
        sync_sp_gradients(loaded)
        opt.step()
    sp_groups.destroy()


@pytest.mark.parametrize("world", [2, 3])
def test_exact_outside_the_collator_route(world):
    run_distributed(_exact_cases, world, timeout=TIMEOUT_S)


def _guard_and_error_cases(rank: int, world: int) -> dict:
    from seqpar_ring.integrations.hf_tiled import tiled_causal_lm_loss, use_tiled_lm_head

    groups = sp_groups.initialize(world)
    cfg = SeqParConfig(sp_size=world, layout="zigzag")
    collate = SPDataCollator(cfg, groups)
    batch = collate.shard(rows(11, [[8, 8], [16]]))
    out = {}
    # the gradient guard cannot be bypassed: tiled loss in a plain loop, a custom logits loss
    model = model64()
    patch(model, cfg, groups)
    use_tiled_lm_head(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tiled_causal_lm_loss(model, batch, groups).backward()
    out["tiled_loss_no_sync"] = _raises(opt.step)
    model.zero_grad(set_to_none=True)
    logits = model(**batch).logits  # labels passed too: the model's loss is ignored
    (logits.double().pow(2).mean()).backward()
    out["custom_logits_loss_no_sync"] = _raises(opt.step)
    model.zero_grad(set_to_none=True)
    # mistakes on one rank: an error on every rank, in seconds
    model = model64()
    patch(model, cfg, groups)
    other = model64()
    patch(other, cfg, groups)
    if rank == 1:
        other.float()
    out["model_dtype_differs"] = _raises(lambda: other(**batch))
    ids = dict(batch, **{DOC_IDS_KEY: batch[DOC_IDS_KEY].int()}) if rank == 1 else batch
    out["doc_ids_dtype_differs"] = _raises(lambda: model(**ids))
    flt = dict(batch, **{DOC_IDS_KEY: batch[DOC_IDS_KEY].float()}) if rank == 1 else batch
    out["doc_ids_float"] = _raises(lambda: model(**flt))
    nolab = {k: v for k, v in batch.items() if k != "labels" or rank != 1}
    out["labels_missing"] = _raises(lambda: model(**nolab))
    four = dict(batch, attention_mask=torch.ones(2, 1, 8, 8)) if rank == 1 else batch
    out["mask_4d"] = _raises(lambda: model(**four))
    cu = torch.tensor([0, 8], dtype=torch.int32)
    out["cu_seq_lens_under_sp"] = _raises(lambda: model(**batch, cu_seq_lens_q=cu,
                                                        cu_seq_lens_k=cu))
    out["generate_under_sp"] = _raises(lambda: model.generate(
        input_ids=batch["input_ids"][:, :2], max_new_tokens=2, do_sample=False))
    size = world if rank == 0 else 1
    out["patch_sp_size_differs"] = _raises(
        lambda: patch(model64(), SeqParConfig(sp_size=size), groups if size > 1 else None))
    model(**batch).loss.backward()  # the group still works
    sp_groups.destroy()
    out["init_sp_size_differs"] = _raises(lambda: sp_groups.initialize(world if rank else 1))
    return out


def test_guard_and_mistakes_on_one_rank():
    results = run_distributed(_guard_and_error_cases, 2, timeout=TIMEOUT_S)
    for name in results[0]:
        msgs = [r[name][0] for r in results]
        secs = max(r[name][1] for r in results)
        assert secs < FAST_S, f"{name}: took {secs:.1f}s"
        if name.endswith("no_sync"):
            assert all("never summed" in m for m in msgs), f"{name}: {msgs}"
            continue
        assert all(m == msgs[0] for m in msgs), f"{name}: ranks raised different errors {msgs}"
    r = results[0]
    assert "dtypes" in r["model_dtype_differs"][0] and "float64" in r["model_dtype_differs"][0]
    assert "dtypes" in r["doc_ids_dtype_differs"][0] and "int32" in r["doc_ids_dtype_differs"][0]
    assert "integer document ids" in r["doc_ids_float"][0]
    assert "labels" in r["labels_missing"][0]
    assert "2D (batch, seq) mask" in r["mask_4d"][0]
    assert "shard the flattened batch" in r["cu_seq_lens_under_sp"][0]
    assert "cached decoding" in r["generate_under_sp"][0] or "use_cache" in r[
        "generate_under_sp"][0]
    assert r["patch_sp_size_differs"][0].startswith("AgreementError: patch")
    assert "sp_size" in r["init_sp_size_differs"][0]
