"""A mistake on one rank is an error on every rank: no hangs, no killed processes, no silent
wrong results (multi-rank CPU tests, 2 and 4 gloo ranks).

Each case makes ONE rank's input or settings wrong; every rank must raise a Python exception
with our message within a few seconds (the spawn's timeout fails a hang), all ranks the same
message, and the process group must stay usable afterwards (a correct call follows).
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist
from _dist import run_distributed

import seqpar_ring
from seqpar_ring import SeqParConfig

pytest.importorskip("transformers")

TIMEOUT_S = 150.0
FAST_S = 5.0  # every error must surface within this on every rank


def _qkv(n: int, heads: int = 4, kv: int = 2, d: int = 8, dtype=torch.float32):
    g = torch.Generator().manual_seed(n * 100 + heads)
    q = torch.randn(2, n, heads, d, generator=g, dtype=dtype)
    k = torch.randn(2, n, kv, d, generator=g, dtype=dtype)
    return q, k, torch.randn_like(k)


def _raises(fn) -> tuple[str, float]:
    """Run ``fn``; it must raise our error. Returns (message, seconds it took)."""
    t0 = time.monotonic()
    try:
        fn()
    except (ValueError, RuntimeError) as err:
        return f"{type(err).__name__}: {err}", time.monotonic() - t0
    raise AssertionError("expected an error, nothing was raised")


def _healthy(group) -> None:
    """The group still works: a correct ring call and a barrier."""
    q, k, v = _qkv(8)
    seqpar_ring.ring_attention(q, k, v, group, causal=True, layout="zigzag", kernel="torch")
    dist.barrier(group)


def _attention_cases(rank: int, world: int) -> dict[str, tuple[str, float]]:
    group = dist.group.WORLD
    odd = rank == 1
    ring = seqpar_ring.ring_attention
    dil = seqpar_ring.dilated_attention
    cases = {
        # seq_local 8 on every rank but 7 on rank 1 (zigzag needs an even shard)
        "seq_local": lambda: ring(*_qkv(7 if odd else 8), group, layout="zigzag"),
        "heads_not_multiple": lambda: ring(*_qkv(8, heads=4, kv=3 if odd else 2), group),
        "doc_ids_shape": lambda: ring(*_qkv(8), group, doc_ids=torch.zeros(
            2, 7 if odd else 8, dtype=torch.long)),
        "dilated_schedule_invalid": lambda: dil(*_qkv(8), group, segment_lengths=[6 if odd
                                                else 8], dilation_rates=[4]),
        "dilated_rates_differ": lambda: dil(*_qkv(8), group, segment_lengths=[8, 8 * world],
                                            dilation_rates=[1, 4 if odd else 2]),
        "scale_differs": lambda: ring(*_qkv(8), group, scale=0.5 if odd else None),
        "bucket_size_differs": lambda: ring(*_qkv(8), group, kernel="torch",
                                            bucket_size=4 if odd else None),
        "requires_grad_differs": lambda: ring(*(x.requires_grad_(odd) for x in _qkv(8)), group),
        "dtype_differs": lambda: ring(*_qkv(8, dtype=torch.float64 if odd else torch.float32),
                                      group),
        "empty_shard": lambda: ring(*_qkv(0), group),
        "integer_inputs": lambda: ring(*(x.long() for x in _qkv(8)), group),
    }
    out = {}
    for name, fn in cases.items():
        out[name] = _raises(fn)
        _healthy(group)
    return out


def _hf_cases(rank: int, world: int) -> dict[str, tuple[str, float]]:
    from test_hf import make_batch, tiny_model

    from seqpar_ring import groups as sp_groups
    from seqpar_ring.integrations.hf import SPDataCollator, patch

    groups = sp_groups.initialize(world)
    cfg = SeqParConfig(sp_size=world, layout="zigzag")
    model = tiny_model("llama")
    patch(model, cfg, groups)
    collate = SPDataCollator(cfg, groups)
    ids = torch.randint(1, 100, (1, 36 if rank == 1 else 32))
    rows = collate.shard({"input_ids": ids, "labels": ids})
    padded = collate.shard(make_batch("pad"))
    no_pos = {k: v for k, v in padded.items() if k != "position_ids" or rank != 1}
    zig = SPDataCollator(cfg, groups).shard(make_batch("plain"))
    contiguous_model = tiny_model("llama")
    patch(contiguous_model, SeqParConfig(sp_size=world, layout="contiguous"), groups)
    out = {
        # unpadded rows of 32 tokens on rank 0 and 36 on rank 1 (the gloo SIGABRT of old)
        "row_lengths_differ": _raises(lambda: model(**rows)),
        # position_ids dropped on one rank from a padded batch (doc ids present)
        "position_ids_missing": _raises(lambda: model(**no_pos)),
        # collator zigzag, model contiguous
        "layout_mismatch": _raises(lambda: contiguous_model(**zig)),
    }
    model(**collate.shard(make_batch("plain"))).loss.backward()  # the group still works
    sp_groups.destroy()
    return out


def _worker(rank: int, world: int) -> dict:
    res = {"attention": _attention_cases(rank, world)}
    if world == 2:
        res["hf"] = _hf_cases(rank, world)
    return res


@pytest.mark.parametrize("world", [2, 4])
def test_one_bad_rank_fails_every_rank_fast(world):
    results = run_distributed(_worker, world, timeout=TIMEOUT_S)
    for part in results[0]:
        for name in results[0][part]:
            msgs = [r[part][name][0] for r in results]
            secs = max(r[part][name][1] for r in results)
            assert all(m == msgs[0] for m in msgs), f"{name}: ranks raised different errors {msgs}"
            assert secs < FAST_S, f"{name}: took {secs:.1f}s on the slowest rank"
            assert msgs[0].startswith("AgreementError: "), f"{name}: {msgs[0]}"
            assert "rank" in msgs[0], f"{name}: the message names no rank: {msgs[0]}"
    att = results[0]["attention"]
    assert "zigzag" in att["seq_local"][0] and "rank 1" in att["seq_local"][0]
    assert "kv_heads" in att["heads_not_multiple"][0]
    assert "doc_ids" in att["doc_ids_shape"][0]
    assert "multiple of its dilation rate" in att["dilated_schedule_invalid"][0]
    assert "dilation_rates" in att["dilated_rates_differ"][0]
    assert "scale" in att["scale_differs"][0]
    assert "bucket_size" in att["bucket_size_differs"][0]
    assert "backward" in att["requires_grad_differs"][0]
    assert "torch.float64" in att["dtype_differs"][0]  # names, not numeric codes
    assert "at least one token" in att["empty_shard"][0]
    assert "floating point" in att["integer_inputs"][0]
    if world == 2:
        hf = results[0]["hf"]
        assert "inputs" in hf["row_lengths_differ"][0]
        assert "position_ids" in hf["position_ids_missing"][0]
        assert "layout='zigzag'" in hf["layout_mismatch"][0]


def _skipped_backward(rank: int, world: int) -> str:
    """Rank 1 never calls backward: rank 0's ring backward times out with OUR message."""
    q, k, v = (x.requires_grad_(True) for x in _qkv(8))
    out = seqpar_ring.ring_attention(q, k, v, dist.group.WORLD, kernel="torch", timeout_s=3.0)
    if rank == 1:
        return "skipped"
    msg, secs = _raises(lambda: out.sum().backward())
    assert secs < 3.0 + FAST_S, secs
    return msg


def test_backward_on_one_rank_only_times_out_with_our_message():
    msgs = run_distributed(_skipped_backward, 2, timeout=60.0)
    assert msgs[1] == "skipped"
    assert "seqpar_ring: ring exchange" in msgs[0]
    # rank 1 has returned: its process may already be gone (gloo then reports the closed
    # connection) or still idle (the 3 s bound ends the wait)
    assert "did not complete within 3s" in msgs[0] or "closed its connection" in msgs[0]
    assert "skipped backward" in msgs[0]


def _shard_batch_contiguous_packed(rank: int, world: int) -> float:
    """contiguous layout, batch 2, packed + padded rows sharded with shard_batch (document ids
    derived inside the model): trains and equals the single-process loss."""
    from test_hf import loss_and_grads, make_batch, tiny_model

    from seqpar_ring import groups as sp_groups
    from seqpar_ring.integrations.hf import patch
    from seqpar_ring.layout import shard_batch

    groups = sp_groups.initialize(world)
    base = tiny_model("llama")
    losses = []
    for kind in ("packed", "pad"):
        batch = make_batch(kind)
        ref, _ = loss_and_grads(base, batch)
        model = tiny_model("llama")
        patch(model, SeqParConfig(sp_size=world, layout="contiguous"), groups)
        local = shard_batch(batch, world, rank, "contiguous", pad_to_multiple_of=world)
        assert "labels" in local  # a transformers model computes its loss only with labels
        loss, _ = loss_and_grads(model, local, groups.sp_group)
        assert abs(loss - ref) <= 1e-5 * abs(ref), (kind, loss, ref)
        losses.append(loss)
    sp_groups.destroy()
    return losses[0]


def test_shard_batch_contiguous_packed_batch_of_two():
    run_distributed(_shard_batch_contiguous_packed, 2, timeout=90.0)


def test_config_and_launcher_mistakes_name_the_fix():
    with pytest.raises(ValueError, match="contiguous layout only"):
        SeqParConfig(attention="dilated", layout="zigzag", segment_lengths=[8],
                     dilation_rates=[1])
    assert SeqParConfig(attention="dilated", segment_lengths=[8],
                        dilation_rates=[1]).layout == "contiguous"
    from seqpar_ring.integrations.ds_config import refuse_auto

    with pytest.raises(ValueError, match="train_micro_batch_size_per_gpu=\"auto\""):
        refuse_auto({"train_micro_batch_size_per_gpu": "auto"})
