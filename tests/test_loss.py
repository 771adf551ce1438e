"""sp_cross_entropy equals single-process cross entropy; each rank gets its tokens' gradient."""

import pytest
import torch
import torch.nn.functional as F

from seqpar_ring import groups as G
from seqpar_ring.layout import shard
from seqpar_ring.loss import sp_cross_entropy
from tests._dist import run_distributed

TOL = dict(atol=1e-6, rtol=0)


def _cases(p: int):
    """(name, logits (B, S, V), labels (B, S)) built identically on every rank."""
    gen = torch.Generator().manual_seed(1234 + p)
    bsz, seq_len, vocab = 3, 4 * p, 11
    logits = torch.randn(bsz, seq_len, vocab, generator=gen, dtype=torch.float64).float()
    labels = torch.randint(0, vocab, (bsz, seq_len), generator=gen)
    labels[0, :3] = -100
    yield "random", logits, labels
    one_rank_empty = labels.clone()
    for layout in ("contiguous", "zigzag") if p > 1 else ():  # sp_rank 1: only ignored labels
        idx = torch.arange(seq_len)
        mine = shard(idx.view(1, -1), p, 1, layout)[0]
        lab = one_rank_empty.clone()
        lab[:, mine] = -100
        yield f"rank1-empty-{layout}", logits, lab
    yield "all-ignored", logits, torch.full_like(labels, -100)
    yield "bf16", logits.bfloat16(), labels


def _reference(logits, labels):
    x = logits.detach().float().requires_grad_(True)
    if (labels != -100).any():
        loss = F.cross_entropy(x.flatten(0, 1), labels.flatten(), ignore_index=-100)
    else:
        loss = (x * 0).sum()  # torch gives NaN here; ours is defined as 0 with zero gradient
    loss.backward()
    return loss.detach(), x.grad


def _check_group(group, p, sp_rank):
    for name, logits, labels in _cases(p):
        ref_loss, ref_grad = _reference(logits, labels)
        for layout in ("contiguous", "zigzag"):
            x = shard(logits, p, sp_rank, layout).clone().requires_grad_(True)
            loss = sp_cross_entropy(x, shard(labels, p, sp_rank, layout), group)
            loss.backward()
            assert loss.dtype == torch.float32 and torch.isfinite(loss), name
            assert x.grad.dtype == logits.dtype and torch.isfinite(x.grad).all(), name
            tol = TOL if logits.dtype == torch.float32 else dict(atol=1e-2, rtol=0)
            torch.testing.assert_close(loss, ref_loss, **TOL, msg=f"{name} {layout} loss")
            want = shard(ref_grad, p, sp_rank, layout).to(logits.dtype)
            torch.testing.assert_close(x.grad, want, **tol, msg=f"{name} {layout} grad")
            if name == "all-ignored":
                assert loss.item() == 0.0 and (x.grad == 0).all()


def _body(rank, world, sp_sizes):
    for sp in sp_sizes:
        g = G.initialize(sp)
        _check_group(g.sp_group, sp, g.sp_rank)
        G.destroy()
    return True


def test_loss_sp3():
    assert all(run_distributed(_body, 3, (3,), timeout=120))


def test_loss_sp2_and_sp4():
    # world 4 runs sp=4 (the whole world) and sp=2 (two groups: sp_size < world_size)
    assert all(run_distributed(_body, 4, (4, 2), timeout=120))


@pytest.mark.parametrize("chunk", [None, 11, 55])
def test_loss_local(monkeypatch, chunk):
    # group None and a single-rank run: plain token mean, no communication. ``chunk``: logits
    # per slice (11: one row of the 11-word vocab at a time; 55: 5 rows, the last slice partial)
    if chunk is not None:
        monkeypatch.setattr("seqpar_ring.loss.CHUNK_ELEMENTS", chunk)
    for name, logits, labels in _cases(1):
        ref_loss, ref_grad = _reference(logits, labels)
        x = logits.clone().requires_grad_(True)
        loss = sp_cross_entropy(x, labels)
        loss.backward()
        torch.testing.assert_close(loss, ref_loss, **TOL)
        tol = TOL if logits.dtype == torch.float32 else dict(atol=1e-2, rtol=0)
        torch.testing.assert_close(x.grad, ref_grad.to(logits.dtype), **tol)


def test_shape_mismatch_message():
    with pytest.raises(ValueError, match="shift_labels"):
        sp_cross_entropy(torch.zeros(2, 4, 5), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        sp_cross_entropy(torch.zeros(2, 4, 5), torch.zeros(2, 4))
