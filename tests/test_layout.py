"""Layouts: shard/unshard identity, zigzag chunk placement, shard_batch labels/positions/padding."""

import math

import pytest
import torch
import torch.distributed as dist

from seqpar_ring import layout as L
from tests._dist import run_distributed

LAYOUTS = ("contiguous", "zigzag")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_shard_unshard_identity(layout):
    for p in range(1, 5):
        div = L.seq_len_divisor(p, layout)
        assert div == (2 * p if layout == "zigzag" and p > 1 else p)  # p = 1: in order
        for bsz in (1, 3):
            for seq_len in (div, 3 * div):
                x = torch.randn(bsz, seq_len, 2, 5)
                shards = [L.shard(x, p, r, layout) for r in range(p)]
                assert all(s.shape == (bsz, seq_len // p, 2, 5) for s in shards)
                assert torch.equal(L.unshard(shards, layout), x)
                # every token exactly once, and positions agree with the sharded data
                pos = torch.cat([L.local_positions(seq_len, p, r, layout) for r in range(p)])
                assert sorted(pos.tolist()) == list(range(seq_len))
                for r in range(p):
                    idx = L.local_positions(seq_len, p, r, layout)
                    assert torch.equal(shards[r], x[:, idx])
                # other dims: (seq, batch) along dim 0 and negative dims
                y = x[0].transpose(0, 1)  # (2, seq, 5)
                ys = [L.shard(y, p, r, layout, dim=-2) for r in range(p)]
                assert torch.equal(L.unshard(ys, layout, dim=-2), y)


def test_zigzag_places_chunk_r_and_mirror():
    for p in range(2, 5):  # p = 1 holds the row in order: one range (test below)
        seq_len = 2 * p * 3
        x = torch.arange(seq_len).view(1, seq_len)
        chunks = x.view(2 * p, 3)
        for r in range(p):
            assert L.chunk_ranges(seq_len, p, r, "zigzag") == [(3 * r, 3), (3 * (2 * p - 1 - r), 3)]
            expect = torch.cat([chunks[r], chunks[2 * p - 1 - r]])
            assert torch.equal(L.shard(x, p, r, "zigzag")[0], expect)
            assert L.chunk_ranges(seq_len, p, r, "contiguous") == [(r * 2 * 3, 2 * 3)]


def test_indivisible_length_message():
    with pytest.raises(ValueError, match=r"seq_len=10 is not a multiple of 8.*pad_to_multiple_of"):
        L.shard(torch.zeros(1, 10), 4, 0, "zigzag")
    with pytest.raises(ValueError, match=r"seq_len=10 is not a multiple of 4.*pad_to_multiple_of"):
        L.shard_batch({"input_ids": torch.zeros(1, 10, dtype=torch.long)}, 2, 0, "zigzag")
    with pytest.raises(ValueError, match="layout"):
        L.seq_len_divisor(2, "striped")
    with pytest.raises(ValueError, match="sp_rank"):
        L.chunk_ranges(8, 2, 2, "contiguous")


def _reassemble(p, layout, batch, **kw):
    outs = [L.shard_batch(batch, p, r, layout, **kw) for r in range(p)]
    return outs, {k: L.unshard([o[k] for o in outs], layout) for k in outs[0]
                  if isinstance(outs[0][k], torch.Tensor) and outs[0][k].dim() >= 2}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_shard_batch_labels_positions(layout):
    torch.manual_seed(0)
    for p in range(1, 5):
        for bsz in (1, 3):
            seq_len = 2 * p * 2
            ids = torch.randint(1, 100, (bsz, seq_len))
            mask = torch.ones(bsz, seq_len, dtype=torch.long)
            mask[0, -3:] = 0  # right padding in row 0
            batch = {"input_ids": ids, "labels": ids.clone(), "attention_mask": mask, "tag": "x"}
            outs, full = _reassemble(p, layout, batch)
            assert outs[0]["labels"] is outs[0]["shift_labels"] and outs[0]["tag"] == "x"
            expect = torch.full_like(ids, -100)
            expect[:, :-1] = ids[:, 1:]
            expect[0, -4:] = -100  # the labels of padding tokens are ignored
            assert torch.equal(full["shift_labels"], expect)
            assert torch.equal(full["position_ids"], torch.arange(seq_len).expand(bsz, -1))
            assert torch.equal(full["input_ids"], ids) and torch.equal(full["attention_mask"], mask)
            for r, o in enumerate(outs):
                idx = L.local_positions(seq_len, p, r, layout)
                assert torch.equal(o["position_ids"], idx.expand(bsz, -1))  # global positions
                # the first label of every shard is kept: label of the token after it
                first = idx[0].item()
                assert torch.equal(o["shift_labels"][1:, 0], ids[1:, first + 1])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_shard_batch_padding(layout):
    for p in range(1, 5):
        div = L.seq_len_divisor(p, layout)
        for bsz, seq_len, mult in ((1, 5, None), (3, 7, 3), (2, div, None)):
            ids = torch.randint(1, 100, (bsz, seq_len))
            emb = torch.randn(bsz, seq_len, 4)
            batch = {"input_ids": ids, "labels": ids.clone(), "inputs_embeds": emb}
            outs, full = _reassemble(p, layout, batch, pad_to_multiple_of=mult or div,
                                     pad_token_id=7)
            m = math.lcm(div, mult or div)
            padded = -(-seq_len // m) * m
            assert full["input_ids"].shape == (bsz, padded)
            assert torch.equal(full["input_ids"][:, :seq_len], ids)
            assert (full["input_ids"][:, seq_len:] == 7).all()
            assert (full["inputs_embeds"][:, seq_len:] == 0).all()
            assert torch.equal(full["inputs_embeds"][:, :seq_len], emb)
            assert (full["shift_labels"][:, seq_len - 1:] == -100).all()
            assert torch.equal(full["shift_labels"][:, : seq_len - 1], ids[:, 1:])
            assert torch.equal(full["position_ids"], torch.arange(padded).expand(bsz, -1))


def test_shard_batch_keeps_given_positions_and_shift_labels():
    ids = torch.arange(8).view(1, 8)
    pos = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4]])  # packed documents
    sl = torch.tensor([[5, 5, 5, 5, 5, 5, 5, -100]])
    out = L.shard_batch({"input_ids": ids, "position_ids": pos, "shift_labels": sl,
                         "labels": ids}, 2, 1, "zigzag")
    assert torch.equal(out["position_ids"], L.shard(pos, 2, 1, "zigzag"))
    assert torch.equal(out["shift_labels"], L.shard(sl, 2, 1, "zigzag"))
    with pytest.raises(ValueError, match="attention_mask"):
        L.shard_batch({"input_ids": ids, "attention_mask": torch.ones(1, 1, 8, 8)}, 2, 0, "zigzag")


def _gather_body(rank, world):
    group = dist.new_group(list(range(world)))
    for layout in LAYOUTS:
        for bsz in (1, 3):
            x = torch.arange(bsz * 4 * world * 2.0).view(bsz, 4 * world, 2)
            got = L.gather(L.shard(x, world, rank, layout), group, layout)
            assert torch.equal(got, x)
    x = torch.randn(2, 6)
    assert L.gather(x, None, "zigzag") is x
    return True


def test_gather():
    assert run_distributed(_gather_body, 2, timeout=120) == [True, True]


def test_one_rank_holds_the_row_in_order_whatever_the_layout():
    for layout in LAYOUTS:
        assert L.seq_len_divisor(1, layout) == 1
        assert L.chunk_ranges(7, 1, 0, layout) == [(0, 7)]
        x = torch.arange(7).view(1, 7)
        assert torch.equal(L.shard(x, 1, 0, layout), x)
        assert torch.equal(L.unshard([x], layout), x)
