"""Ulysses x ring: config, token placement, the 'auto' rule, and exactness on 2 and 4 gloo ranks.

The placement is checked against a naive definition written here (ring layout over r ranks from
tests/reference.py, cut into u consecutive pieces), including through the real all-to-all. The
attention (u x r = 2x1, 1x2, 3x1, 2x2, 4x1, and 2x1 inside sp=2 x dp=2) is compared with the fp64
full-sequence references on forward and every gradient, causal and not, MHA / GQA / MQA
(K/V heads < u and not dividing u), packed documents, both comms, fp32 and fp64; then a tiny HF
Llama through `patch` (loss and every parameter gradient) against a single-process run. One
spawned group per world size runs all of its cases.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import re

import pytest
import torch
import torch.distributed as dist
from _dist import run_distributed
from _exact import DENSE_TOL, DILATED_TOL, assert_close, make_inputs, reference_fwd_bwd
from reference import dilated_reference, positions_reference, sdpa_reference, shard_reference

from seqpar_ring import SeqParConfig
from seqpar_ring import groups as G
from seqpar_ring.layout import chunk_ranges, local_positions, shard, shard_batch, unshard

BATCH, SEQ, HEAD_DIM = 2, 48, 8  # 48: a multiple of 2p for p = 1..4
DTYPES = (torch.float32, torch.float64)
TIMEOUT_S = 240.0


def naive_shard(x: torch.Tensor, p: int, u: int, sp_rank: int, layout: str) -> torch.Tensor:
    """Piece j of u of ring rank i's tokens (ring layout over r = p/u ranks), sp_rank = i·u + j."""
    i, j = divmod(sp_rank, u)
    ring = shard_reference(x, p // u, i, layout, dim=1)
    return ring.chunk(u, dim=1)[j]


# ---------------------------------------------------------------- config, layout, flags

def test_config_factors():
    for p, u in ((4, 1), (4, 2), (4, 4), (6, 3), (8, 2)):
        cfg = SeqParConfig(sp_size=p, ulysses_size=u)
        assert cfg.ring_size == p // u
        assert SeqParConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match=r"ulysses_size\(3\) does not divide sp_size\(4\)"):
        SeqParConfig(sp_size=4, ulysses_size=3)
    for bad in (0, -1, True, 2.0, "two"):
        with pytest.raises(ValueError, match="sequence_parallel.ulysses_size"):
            SeqParConfig(sp_size=4, ulysses_size=bad)
    assert SeqParConfig(sp_size=1, ulysses_size="auto").ulysses_size == 1  # nothing to choose
    auto = SeqParConfig(sp_size=4, ulysses_size="auto")
    with pytest.raises(ValueError, match="resolve_ulysses_size"):
        auto.ring_size
    assert SeqParConfig(sp_size=4, layout="zigzag", ulysses_size=2).seq_len_divisor == 8


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_placement_matches_naive_reference(layout):
    seq = 48
    x = torch.arange(seq)[None]
    for p, u in ((1, 1), (2, 1), (2, 2), (3, 3), (4, 1), (4, 2), (4, 4), (6, 2), (6, 3)):
        r = p // u
        for s in range(p):
            want = naive_shard(x, p, u, s, layout)[0]
            assert torch.equal(local_positions(seq, p, s, layout, u), want), (p, u, s)
            assert torch.equal(shard(x, p, s, layout, ulysses_size=u)[0], want)
            assert sum(n for _, n in chunk_ranges(seq, p, s, layout, u)) == seq // p
        for i in range(r):  # the all-to-all concatenates a Ulysses group's pieces in order
            pieces = [local_positions(seq, p, i * u + j, layout, u) for j in range(u)]
            assert torch.equal(torch.cat(pieces), positions_reference(seq, r, i, layout))
        shards = [shard(x, p, s, layout, ulysses_size=u) for s in range(p)]
        assert torch.equal(unshard(shards, layout, ulysses_size=u), x)
        if u == 1:  # u = 1 is the plain layout
            assert all(torch.equal(a, shard(x, p, s, layout)) for s, a in enumerate(shards))


def test_shard_batch_keeps_global_positions_and_labels():
    ids = torch.arange(100, 116)[None]
    for s in range(4):
        b = shard_batch({"input_ids": ids, "labels": ids}, 4, s, "zigzag", ulysses_size=2)
        pos = local_positions(16, 4, s, "zigzag", 2)
        assert torch.equal(b["position_ids"][0], pos)
        assert torch.equal(b["input_ids"][0], ids[0, pos])
        want = torch.where(pos + 1 < 16, 100 + pos + 1, torch.full_like(pos, -100))
        assert torch.equal(b["shift_labels"][0], want)  # shifted over the whole row first
    with pytest.raises(ValueError, match="resolve_ulysses_size"):
        shard_batch({"input_ids": ids}, 4, 0, "zigzag", ulysses_size="auto")


def test_flags_and_json_section():
    from seqpar_ring.integrations.ds_config import (
        _FLAGS,
        add_argparse_args,
        config_from_args,
        section_fields,
        split_config,
    )

    parser = add_argparse_args(argparse.ArgumentParser())
    for value, want in (("2", 2), ("auto", "auto")):
        args = parser.parse_args(["--sequence-parallel-size", "4", "--ulysses-size", value])
        assert config_from_args(args, {})[0].ulysses_size == want
    with pytest.raises(SystemExit):
        parser.parse_args(["--ulysses-size", "two"])
    flags = list(_FLAGS)  # argparse takes unambiguous prefixes: no flag may prefix another
    assert not [(a, b) for a in flags for b in flags if a != b and b.startswith(a)]
    assert "ulysses_size" in section_fields()
    cfg, ds = split_config({"sequence_parallel": {"size": 4, "ulysses_size": 2}})
    assert cfg.ulysses_size == 2 and ds["sequence_parallel"]["ulysses_size"] == 2
    with pytest.raises(ValueError, match=r"ulysses_size\(3\) does not divide sp_size\(4\)"):
        split_config({"sequence_parallel": {"size": 4, "ulysses_size": 3}})


def test_bench_and_plan_arguments():
    from seqpar_ring.tools import plan
    from seqpar_ring.tools.bench import e2e, ring

    a = e2e.build_parser().parse_args(["--model", "tiny", "--seq", "256", "--ulysses-size", "2"])
    assert a.ulysses_size == 2
    assert e2e.build_parser().parse_args(["--ulysses-size", "auto"]).ulysses_size == "auto"
    assert ring.build_parser().parse_args(["--ulysses-sizes", "2", "4"]).ulysses_sizes == [2, 4]
    p = plan.build_parser().parse_args(["--gpus", "4", "--ulysses-size", "2"])
    m, o = plan.PRESETS["llama-8b"], plan.options_from_args(p)
    assert o.ulysses_size == 2
    # the attention working set counts the all-to-all buffers (per token, bf16)
    assert plan._attention_backward(m, 2, o) > plan._attention_backward(m, 2, plan.PlanOptions())


def test_auto_rule():
    from transformers import LlamaConfig

    from seqpar_ring.tools.plan import Hardware, choose_ulysses_size, resolve_ulysses_size
    from seqpar_ring.tools.plan_ulysses import ulysses_candidates

    # the documented examples (modelled): 1.1B shape (32 / 4 heads, d 64) on 2 GPUs
    assert choose_ulysses_size(32, 4, 64, 65536, 2)[0] == 2
    assert choose_ulysses_size(32, 4, 64, 262144, 2)[0] == 1
    assert choose_ulysses_size(32, 8, 128, 65536, 8)[0] == 8
    # candidates: divide sp and heads, stay inside a node, dilated rates fit the local heads
    assert ulysses_candidates(12, 8, gpus_per_node=8) == [1, 2, 4]
    assert ulysses_candidates(32, 16, gpus_per_node=8) == [1, 2, 4, 8]
    assert ulysses_candidates(8, 4, gpus_per_node=8, dilation_rates=(1, 4)) == [1, 2]
    u, costs = choose_ulysses_size(32, 4, 64, 65536, 4, hw=Hardware(gpus_per_node=2))
    assert set(costs) == {1, 2} and u in costs
    model_cfg = LlamaConfig(hidden_size=2048, num_attention_heads=32, num_key_value_heads=4)
    cfg = SeqParConfig(sp_size=2, ulysses_size="auto")
    assert resolve_ulysses_size(cfg, model_cfg, 65536, gpus_per_node=8).ulysses_size == 2
    assert resolve_ulysses_size(cfg, model_cfg, 262144, gpus_per_node=8).ulysses_size == 1
    from seqpar_ring.integrations.deepspeed import _resolve_auto

    ds = {"sequence_parallel": {"size": 2, "ulysses_size": "auto"}}
    resolved = _resolve_auto(cfg, ds, model_cfg, 65536)  # what initialize(seq_len=) does
    assert resolved.ulysses_size == 2 and ds["sequence_parallel"]["ulysses_size"] == 2
    fixed = SeqParConfig(sp_size=2, ulysses_size=2)
    assert resolve_ulysses_size(fixed, None, None) is fixed
    with pytest.raises(ValueError, match="seq_len"):
        resolve_ulysses_size(cfg, model_cfg, None)


# ---------------------------------------------------------------- distributed: attention

def _heads_for(u: int) -> list[tuple[int, int]]:
    """MHA, GQA dividing u, K/V heads < u, MQA, and K/V heads that neither divide nor are
    divided by u (replicated to lcm)."""
    if u == 4:
        return [(8, 8), (8, 4), (8, 2), (8, 1), (12, 6)]
    if u == 3:
        return [(6, 6), (6, 3), (6, 2), (6, 1)]
    if u == 2:
        return [(4, 4), (8, 2), (4, 1), (6, 3)]
    return [(4, 4), (8, 2)]


def _loss_free(doc_ids: torch.Tensor, causal: bool) -> torch.Tensor:
    from test_ring import _loss_free as rows

    return rows(doc_ids, causal)


def _doc_ids() -> torch.Tensor:
    """Packed documents with padding (-1) at the end, in the middle and at the start."""
    row0 = [0] * 11 + [1] * 17 + [2] * 14 + [-1] * 6
    row1 = [-1] * 3 + [7] * 20 + [-1] * 2 + [8] * 23
    return torch.tensor([row0, row1])


def _run(fn, data, p, u, sp_rank, layout, dtype, doc=None):
    """Shard with the naive placement, run fn(q, k, v, doc) and backward; out + grads."""
    def local(t):
        return naive_shard(t.to(dtype), p, u, sp_rank, layout).contiguous()

    q, k, v = (local(data[n]).requires_grad_(True) for n in "qkv")
    doc_l = None if doc is None else naive_shard(doc, p, u, sp_rank, layout).contiguous()
    out = fn(q, k, v, doc_l)
    out.backward(local(data["dout"]))
    return [out.detach(), q.grad, k.grad, v.grad]


def _expected(ref, p, u, sp_rank, layout):
    return [naive_shard(ref[n], p, u, sp_rank, layout) for n in ("out", "dq", "dk", "dv")]


def _attention_cases(groups, tag: str) -> int:
    from seqpar_ring.comm_a2a import a2a_stats
    from seqpar_ring.ulysses import ulysses_ring_attention

    p, u, s = groups.sp_size, groups.ulysses_size, groups.sp_rank
    comms = ("ring", "allgather") if groups.ring_size > 1 else ("ring",)
    n = 0
    docs = _doc_ids()
    for (hi, (h, hkv)), causal, with_docs in itertools.product(
            enumerate(_heads_for(u)), (True, False), (False, True)):
        if with_docs and hi not in (1, 2):
            continue  # packed documents: GQA and K/V heads < u (or MQA)
        data = make_inputs(10 * hi + causal + 100 * with_docs, BATCH, SEQ, h, hkv, HEAD_DIM)
        doc = docs if with_docs else None
        free = _loss_free(docs, causal) if with_docs else torch.zeros(BATCH, SEQ, dtype=bool)
        # trailing padding under causal: unspecified output, no loss (dout 0) — as in test_ring
        data["dout"] = data["dout"].masked_fill(free[:, :, None, None], 0.0)
        ref = reference_fwd_bwd(lambda q, k, v: sdpa_reference(q, k, v, causal, doc_ids=doc),
                                data)
        for layout, comm, dtype in itertools.product(("contiguous", "zigzag"), comms, DTYPES):
            ctx = (f"{tag} u={u} r={groups.ring_size} sp_rank={s} H={h}:{hkv} causal={causal} "
                   f"docs={with_docs} {layout} {comm} {dtype}")
            a2a_stats.reset()
            got = _run(lambda q, k, v, d: ulysses_ring_attention(
                q, k, v, groups, causal=causal, layout=layout, comm=comm, kernel="torch",
                doc_ids=d), data, p, u, s, layout, dtype, doc)
            want_rows = _expected(ref, p, u, s, layout)
            mask = naive_shard(free, p, u, s, layout)[:, :, None, None]
            got[0], want_rows[0] = got[0].masked_fill(mask, 0), want_rows[0].masked_fill(mask, 0)
            assert_close(got, want_rows, [DENSE_TOL[dtype]], ctx, dtype)
            if u > 1:  # traffic: what the planner's all-to-all term counts, nothing hidden
                hk = torch.lcm(torch.tensor(hkv), torch.tensor(u)).item()
                elt = torch.finfo(dtype).bits // 8
                tokens = BATCH * SEQ // p
                want = 2 * tokens * (2 * h + 2 * hk) * HEAD_DIM * elt * (u - 1) // u
                want += tokens * 8 * (u - 1) if with_docs else 0  # doc ids: one all-gather
                assert a2a_stats.bytes_sent == want, (ctx, a2a_stats, want)
                rep = 2 * tokens * (hk - hkv) * HEAD_DIM * elt * (u - 1) // u
                assert a2a_stats.replicated_bytes == rep, (ctx, a2a_stats, rep)
            n += 1
    return n


def _module_and_dispatch_cases(groups) -> int:
    """sp_attention / RingDilatedMultiheadAttention route to the hybrid on config.ulysses_size."""
    from seqpar_ring.modules import RingDilatedMultiheadAttention, reference_forward, sp_attention

    p, u, s = groups.sp_size, groups.ulysses_size, groups.sp_rank
    h = 6 if u == 3 else 8
    n = 0
    for causal, layout in itertools.product((True, False), ("contiguous", "zigzag")):
        cfg = SeqParConfig(sp_size=p, ulysses_size=u, layout=layout, kernel="torch")
        data = make_inputs(7 + causal, BATCH, SEQ, h, 2, HEAD_DIM)
        ref = reference_fwd_bwd(lambda q, k, v: sdpa_reference(q, k, v, causal), data)
        got = _run(lambda q, k, v, d: sp_attention(q, k, v, cfg, groups, causal=causal), data,
                   p, u, s, layout, torch.float64)
        assert_close(got, _expected(ref, p, u, s, layout), [DENSE_TOL[torch.float64]],
                     f"sp_attention u={u} {layout} causal={causal}")
        torch.manual_seed(3)
        mha = RingDilatedMultiheadAttention(h * 4, h, kv_heads=2, config=cfg, group=groups,
                                            causal=causal, dtype=torch.float64)
        x = torch.randn(BATCH, SEQ, h * 4, dtype=torch.float64, generator=torch.Generator()
                        .manual_seed(5))
        y, _ = mha(naive_shard(x, p, u, s, layout))
        want = naive_shard(reference_forward(mha, x), p, u, s, layout)
        assert_close([y.detach()], [want], [DENSE_TOL[torch.float64]], "module", names=("y",))
        n += 2
    if groups.ring_size == 1:  # pure Ulysses: one full-length kernel call, not zigzag's three
        import seqpar_ring.ulysses as U

        seen, real = [], U.ring_attention
        U.ring_attention = lambda *a, **kw: seen.append(kw["layout"]) or real(*a, **kw)
        try:
            data = make_inputs(9, 1, SEQ, h, 2, HEAD_DIM)
            _run(lambda q, k, v, d: U.ulysses_ring_attention(q, k, v, groups, layout="zigzag"),
                 data, p, u, s, "zigzag", torch.float64)
        finally:
            U.ring_attention = real
        assert seen == ["contiguous"], seen
    if u > 1:
        cfg = SeqParConfig(sp_size=p, ulysses_size=u, kernel="torch")
        q = torch.zeros(1, SEQ // p, h, HEAD_DIM)
        with pytest.raises(ValueError, match="needs the rank's SPGroups"):
            sp_attention(q, q[:, :, :2], q[:, :, :2], cfg, groups.sp_group)
        odd = torch.zeros(1, SEQ // p, u + 1, HEAD_DIM)  # heads not divisible by u
        with pytest.raises(ValueError, match=rf"ulysses_size\({u}\) does not divide the number"):
            sp_attention(odd, odd, odd, cfg, groups)
    return n


def _dilated_cases(groups) -> int:
    """LongNet dilated attention with u > 1: exact when lcm(rates) divides heads/u, else an
    error naming the working ulysses sizes."""
    from seqpar_ring.ulysses import ulysses_dilated_attention

    p, u, s = groups.sp_size, groups.ulysses_size, groups.sp_rank
    ws, rs = [SEQ // 2, SEQ], [1, 2]
    n = 0
    for causal, (h, hkv) in itertools.product((True, False), ((2 * u, 2 * u), (2 * u, 1))):
        data = make_inputs(40 + causal + h, 1, SEQ, h, hkv, HEAD_DIM)
        ref = reference_fwd_bwd(lambda q, k, v: dilated_reference(q, k, v, ws, rs, causal),
                                data)
        for dtype in DTYPES:
            got = _run(lambda q, k, v, d: ulysses_dilated_attention(
                q, k, v, groups, segment_lengths=ws, dilation_rates=rs, causal=causal,
                kernel="torch"), data, p, u, s, "contiguous", dtype)
            assert_close(got, _expected(ref, p, u, s, "contiguous"), DILATED_TOL[dtype],
                         f"dilated u={u} H={h}:{hkv} causal={causal} {dtype}", dtype)
            n += 1
    q = torch.zeros(1, SEQ // p, u, HEAD_DIM)  # one head per rank: rate 2 cannot work
    ok = [1] + [d for d in range(2, p + 1) if p % d == 0 and u % d == 0 and (u // d) % 2 == 0]
    with pytest.raises(ValueError, match=rf"Working ulysses_size .*: {re.escape(str(ok))} \(1 a"):
        ulysses_dilated_attention(q, q, q, groups, segment_lengths=ws, dilation_rates=rs)
    return n


def _a2a_placement_case(groups) -> None:
    """Through the real all-to-all: each rank ends with its ring-layout positions."""
    from seqpar_ring.ulysses import seq_to_heads

    p, u = groups.sp_size, groups.ulysses_size
    for layout in ("contiguous", "zigzag"):
        pos = torch.arange(SEQ, dtype=torch.float64)[None, :, None, None].expand(1, SEQ, u, 1)
        local = naive_shard(pos, p, u, groups.sp_rank, layout).contiguous()
        got = seq_to_heads([local], groups.ulysses_group, 30.0)[0]
        want = positions_reference(SEQ, p // u, groups.ring_rank, layout).double()
        assert torch.equal(got[0, :, 0, 0], want), (layout, got[0, :, 0, 0], want)


# ---------------------------------------------------------------- distributed: HF model

VOCAB, HF_SEQ = 128, 16
# fp64 weights, but transformers' Llama computes RMSNorm and RoPE in fp32: fp32-level bounds
HF_LOSS_RTOL, HF_GRAD_RTOL = 1e-6, 1e-5


def _tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                      vocab_size=VOCAB, attention_dropout=0.0, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).double()
    model.config.use_cache = False
    return model


def _hf_batch(kind: str) -> dict:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (2, HF_SEQ), generator=g)
    pos = torch.arange(HF_SEQ).expand(2, HF_SEQ).clone()
    labels = ids.clone()
    mask = None
    if kind == "packed":  # documents of 5, 7, 4 and 9, 7 tokens
        for r, lens in enumerate([[5, 7, 4], [9, 7]]):
            pos[r] = torch.cat([torch.arange(m) for m in lens])
        labels = labels.masked_fill(pos == 0, -100)
    if kind == "pad":
        mask = torch.ones_like(ids)
        mask[0, -3:] = 0
        mask[1, :2] = 0
        labels = labels.masked_fill(mask == 0, -100)
    out = dict(input_ids=ids, position_ids=pos, labels=labels)
    return out if mask is None else dict(out, attention_mask=mask)


def _loss_grads(model, batch, group=None):
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    grads = {}
    for name, prm in model.named_parameters():
        g = prm.grad.detach().clone() if prm.grad is not None else torch.zeros_like(prm)
        if group is not None:  # each SP rank holds its tokens' share: the sum is the gradient
            dist.all_reduce(g, group=group)
        grads[name] = g
    return loss.item(), grads


def _hf_cases(groups) -> int:
    from seqpar_ring.integrations.hf import DOC_IDS_KEY, SPDataCollator, patch

    base = _tiny_llama()
    n = 0
    for layout, kind in itertools.product(("contiguous", "zigzag"), ("plain", "pad", "packed")):
        cfg = SeqParConfig(sp_size=groups.sp_size, ulysses_size=groups.ulysses_size,
                           layout=layout, kernel="torch")
        batch = _hf_batch(kind)
        ref_loss, ref_grads = _loss_grads(copy.deepcopy(base), batch)
        model = copy.deepcopy(base)
        patch(model, cfg, groups)
        local = SPDataCollator(cfg, groups).shard(dict(batch))
        assert torch.equal(local["position_ids"],
                           naive_shard(batch["position_ids"], groups.sp_size,
                                       groups.ulysses_size, groups.sp_rank, layout))
        for derive in (False, True) if kind != "plain" else (False,):
            if derive:  # no sp_doc_ids: attention derives them from the gathered positions
                local = {k: v for k, v in local.items() if k != DOC_IDS_KEY}
            loss, grads = _loss_grads(model, local, groups.sp_group)
            what = f"hf u={groups.ulysses_size} {layout} {kind} derive={derive}"
            assert abs(loss - ref_loss) <= HF_LOSS_RTOL * abs(ref_loss), (what, loss, ref_loss)
            for name, ref in ref_grads.items():
                err = (grads[name] - ref).abs().max().item()
                assert err <= HF_GRAD_RTOL * ref.abs().max().item(), (what, name, err)
            n += 1
    return n


# ---------------------------------------------------------------- the spawned bodies

def _grid(sp: int, u: int, tag: str, hf: bool = True) -> int:
    groups = G.initialize(sp, ulysses_size=u)
    try:
        assert (groups.ulysses_size, groups.ring_size) == (u, sp // u)
        if u > 1:
            assert f"U{u}xR{sp // u}" in str(groups) and "all-to-all with" in groups.describe()
            _a2a_placement_case(groups)
        n = _attention_cases(groups, tag) + _module_and_dispatch_cases(groups)
        n += _dilated_cases(groups) if u > 1 else 0
        n += _hf_cases(groups) if hf else 0
        return n
    finally:
        G.destroy()


def _check_grid_ranks(rank: int, world: int, sp: int, u: int) -> None:
    g = G.initialize(sp, ulysses_size=u)
    base = rank - rank % sp  # first global rank of this SP group
    i, j = divmod(rank - base, u)
    assert (g.ring_rank, g.ulysses_rank) == (i, j)
    assert g.ulysses_ranks == tuple(base + i * u + m for m in range(u))  # adjacent ranks
    assert g.ring_ranks == tuple(base + m * u + j for m in range(sp // u))
    assert tuple(dist.get_process_group_ranks(g.ulysses_group)) == g.ulysses_ranks
    assert tuple(dist.get_process_group_ranks(g.ring_group)) == g.ring_ranks
    assert g.get_sequence_parallel_world_size() == sp  # the DeepSpeed mpu is unchanged
    assert g.get_data_parallel_world_size() == world // sp
    G.destroy()


def _world2(rank: int, world: int) -> int:
    torch.set_num_threads(1)
    _check_grid_ranks(rank, world, 2, 2)
    return _grid(2, 2, "2x1") + _grid(2, 1, "1x2", hf=False)


def _world4(rank: int, world: int) -> int:
    torch.set_num_threads(1)
    for sp, u in ((4, 2), (4, 4), (2, 2)):
        _check_grid_ranks(rank, world, sp, u)
    n = _grid(4, 2, "2x2") + _grid(4, 4, "4x1")
    return n + _grid(2, 2, "2x1 in sp2 x dp2", hf=False)  # sub-groups: group != global ranks


def _world3(rank: int, world: int) -> int:
    torch.set_num_threads(1)
    _check_grid_ranks(rank, world, 3, 3)
    return _grid(3, 3, "3x1", hf=False)


@pytest.mark.parametrize("world", [2, 3, 4])
def test_hybrid_exact(world):
    body = {2: _world2, 3: _world3, 4: _world4}[world]
    counts = run_distributed(body, world, timeout=TIMEOUT_S)
    assert len(set(counts)) == 1 and counts[0] > 0
