"""Self-tests of tests/reference.py against second, differently written formulations."""

from __future__ import annotations

import math

import pytest
import torch
from reference import (
    dilated_reference,
    positions_reference,
    sdpa_reference,
    shard_reference,
    validate_dilated,
)

NEG_INF = float("-inf")


def _inputs(seed, batch, seq, heads, kv_heads, head_dim=8):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seq, heads, head_dim, generator=g, dtype=torch.float64)
    k = torch.randn(batch, seq, kv_heads, head_dim, generator=g, dtype=torch.float64)
    v = torch.randn(batch, seq, kv_heads, head_dim, generator=g, dtype=torch.float64)
    dout = torch.randn(batch, seq, heads, head_dim, generator=g, dtype=torch.float64)
    return q, k, v, dout


def _fwd_bwd(fn, q, k, v, dout):
    leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
    out = fn(*leaves)
    out.backward(dout)
    return [out.detach()] + [x.grad for x in leaves]


def _assert_close(got, want, atol, what):
    names = ("out", "dq", "dk", "dv")
    for name, a, b in zip(names, got, want):
        assert a.shape == b.shape, f"{what}: {name} shape {tuple(a.shape)} != {tuple(b.shape)}"
        assert torch.isfinite(a).all(), f"{what}: {name} has non-finite values"
        err = (a - b).abs().max().item()
        assert err <= atol, f"{what}: {name} max abs err {err:.3e} > {atol:.1e}"


def _loop_attention(q, k, v, causal, scale, doc_ids=None):
    """Per (batch, head, query) Python loop: the most literal softmax attention."""
    batch, seq, heads, _ = q.shape
    group = heads // k.shape[2]
    out = torch.zeros_like(q)
    for b in range(batch):
        for h in range(heads):
            for i in range(seq):
                keys = [
                    j
                    for j in range(seq)
                    if (not causal or j <= i)
                    and (doc_ids is None or (doc_ids[b, j] == doc_ids[b, i] and doc_ids[b, j] >= 0))
                ]
                if not keys:
                    continue
                kk = k[b, keys, h // group]
                w = torch.softmax(scale * (kk @ q[b, i, h]), dim=0)
                out[b, i, h] = w @ v[b, keys, h // group]
    return out


def _dilated_by_masks(q, k, v, segment_lengths, dilation_rates, causal, scale):
    """Whole-sequence boolean masks per branch, merged by a logsumexp over all branches' scores.

    mask_i[h, p, j] = (p % r == h % r) & (j % r == h % r) & (p // w' == j // w') & (j <= p).
    """
    batch, seq, heads, _ = q.shape
    kt = k.repeat_interleave(heads // k.shape[2], dim=2).transpose(1, 2)  # (B, H, S, D)
    vt = v.repeat_interleave(heads // v.shape[2], dim=2).transpose(1, 2)
    scores = scale * (q.transpose(1, 2) @ kt.transpose(-1, -2))  # (B, H, S, S)
    h_idx = torch.arange(heads)[:, None, None]
    p_idx = torch.arange(seq)[None, :, None]
    j_idx = torch.arange(seq)[None, None, :]
    masked = []
    for w, r in zip(segment_lengths, dilation_rates):
        w_eff = min(w, seq)
        mask = (
            (p_idx % r == h_idx % r) & (j_idx % r == h_idx % r) & (p_idx // w_eff == j_idx // w_eff)
        )
        if causal:
            mask = mask & (j_idx <= p_idx)
        masked.append(scores.masked_fill(~mask[None], NEG_INF))
    # logsumexp over the keys of every branch at once == logsumexp_i of per-branch lse_i
    merged = torch.logsumexp(torch.cat(masked, dim=-1), dim=-1)  # (B, H, S)
    safe = torch.where(torch.isfinite(merged), merged, torch.zeros_like(merged))[..., None]
    out = sum(torch.exp(s - safe) @ vt for s in masked)
    return out.transpose(1, 2), merged.transpose(1, 2)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2), (4, 1)])
def test_sdpa_reference_matches_loops(causal, heads, kv_heads):
    q, k, v, _ = _inputs(0, 2, 7, heads, kv_heads)
    scale = 0.37
    got = sdpa_reference(q, k, v, causal, scale=scale)
    want = _loop_attention(q, k, v, causal, scale)
    err = (got - want).abs().max().item()
    assert err < 1e-12, f"causal={causal} H={heads} Hkv={kv_heads}: max abs err {err:.3e}"
    # default scale is 1/sqrt(D)
    got = sdpa_reference(q, k, v, causal)
    want = _loop_attention(q, k, v, causal, 1 / math.sqrt(q.shape[-1]))
    assert (got - want).abs().max().item() < 1e-12


@pytest.mark.parametrize("causal", [True, False])
def test_sdpa_reference_doc_ids(causal):
    q, k, v, dout = _inputs(1, 2, 9, 8, 2)
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, -1, 2, 2, 2], [-1, 5, 5, 5, -1, -1, 6, 6, 6]])
    got = sdpa_reference(q, k, v, causal, doc_ids=doc_ids)
    want = _loop_attention(q, k, v, causal, 1 / math.sqrt(8), doc_ids=doc_ids)
    err = (got - want).abs().max().item()
    assert err < 1e-12, f"causal={causal}: max abs err {err:.3e}"
    pad = doc_ids < 0
    assert (got[pad] == 0).all(), "padding queries must give exactly 0"
    grads = _fwd_bwd(
        lambda a, b, c: sdpa_reference(a, b, c, causal, doc_ids=doc_ids), q, k, v, dout
    )
    assert all(torch.isfinite(g).all() for g in grads), "gradients must be finite"
    assert (grads[1][pad] == 0).all(), "dq of fully masked rows must be 0"
    # keys of padding tokens receive no gradient
    assert (grads[2][pad] == 0).all() and (grads[3][pad] == 0).all()
    # one document covering everything == the SDPA path
    ones = torch.zeros(2, 9, dtype=torch.long)
    _assert_close(
        _fwd_bwd(lambda a, b, c: sdpa_reference(a, b, c, causal, doc_ids=ones), q, k, v, dout),
        _fwd_bwd(lambda a, b, c: sdpa_reference(a, b, c, causal), q, k, v, dout),
        1e-12,
        f"single-document doc_ids causal={causal}",
    )


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2)])
@pytest.mark.parametrize("w", [16, 32, 100])
def test_dilated_dense_schedule_is_sdpa(causal, heads, kv_heads, w):
    seq = 16
    q, k, v, dout = _inputs(2, 2, seq, heads, kv_heads)
    got = _fwd_bwd(lambda a, b, c: dilated_reference(a, b, c, [w], [1], causal), q, k, v, dout)
    want = _fwd_bwd(lambda a, b, c: sdpa_reference(a, b, c, causal), q, k, v, dout)
    _assert_close(got, want, 1e-12, f"w={w} r=1 causal={causal} H={heads} Hkv={kv_heads}")


SCHEDULES = [
    ([24], [1]),
    ([24], [2]),
    ([24], [4]),
    ([24], [3]),
    ([8], [2]),
    ([6], [3]),
    ([48], [8]),
    ([4, 8, 24], [1, 2, 4]),
    ([8, 12], [4, 3]),
    ([2, 24], [1, 24]),
]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2)])
@pytest.mark.parametrize("schedule", SCHEDULES, ids=str)
def test_dilated_matches_mask_formulation(causal, heads, kv_heads, schedule):
    seq, scale = 24, 0.41
    segs, rates = schedule
    q, k, v, dout = _inputs(3, 2, seq, heads, kv_heads)
    what = f"schedule={schedule} causal={causal} H={heads} Hkv={kv_heads}"

    out, lse = dilated_reference(q, k, v, segs, rates, causal, scale=scale, return_lse=True)
    out_m, lse_m = _dilated_by_masks(q, k, v, segs, rates, causal, scale)
    assert torch.equal(torch.isinf(lse), torch.isinf(lse_m)), f"{what}: -inf pattern of L"
    finite = torch.isfinite(lse)
    assert (lse[finite] - lse_m[finite]).abs().max().item() < 1e-12, f"{what}: L differs"
    assert (out[~finite] == 0).all(), f"{what}: unselected positions must give exactly 0"

    got = _fwd_bwd(
        lambda a, b, c: dilated_reference(a, b, c, segs, rates, causal, scale=scale), q, k, v, dout
    )
    want = _fwd_bwd(
        lambda a, b, c: _dilated_by_masks(a, b, c, segs, rates, causal, scale)[0], q, k, v, dout
    )
    _assert_close(got, want, 1e-12, what)


def test_dilated_single_branch_head_residues():
    """segment_lengths=[S], dilation_rates=[r]: head h attends among positions = h (mod r)."""
    seq, r, heads = 12, 3, 4
    q, k, v, _ = _inputs(4, 1, seq, heads, heads)
    out = dilated_reference(q, k, v, [seq], [r], causal=False)
    for h in range(heads):
        sel = [p for p in range(seq) if p % r == h % r]
        rest = [p for p in range(seq) if p % r != h % r]
        want = sdpa_reference(
            q[:, sel, h : h + 1], k[:, sel, h : h + 1], v[:, sel, h : h + 1], False
        )
        assert (out[:, sel, h : h + 1] - want).abs().max().item() < 1e-12, f"head {h}"
        assert (out[:, rest, h] == 0).all(), f"head {h}: unselected positions must be 0"


@pytest.mark.parametrize(
    "segs,rates,token",
    [
        ([], [], "[]"),
        ([8, 16], [1], "[8, 16]"),
        ([8], [0], "0"),
        ([-8], [1], "-8"),
        ([8], [-2], "-2"),
        ([10], [3], "10"),
        ([20], [1], "20"),
    ],
)
def test_dilated_reference_validation(segs, rates, token):
    q, k, v, _ = _inputs(5, 1, 48, 4, 4)
    with pytest.raises(ValueError) as info:
        dilated_reference(q, k, v, segs, rates, causal=True)
    assert token in str(info.value)
    with pytest.raises(ValueError):
        validate_dilated(48, segs, rates)


def test_dilated_reference_accepts_long_segment():
    validate_dilated(48, [96, 48], [2, 4])  # w' = min(w, S)


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_shard_reference_partitions(layout):
    seq = 24
    for p in (1, 2, 3, 4):
        pos = torch.cat([positions_reference(seq, p, r, layout) for r in range(p)])
        assert sorted(pos.tolist()) == list(range(seq)), f"p={p}: not a partition"
        x = torch.arange(seq)[None, :, None]
        for r in range(p):
            assert torch.equal(
                shard_reference(x, p, r, layout)[0, :, 0], positions_reference(seq, p, r, layout)
            )
    assert positions_reference(8, 2, 0, "zigzag").tolist() == [0, 1, 6, 7]
    assert positions_reference(8, 2, 1, "zigzag").tolist() == [2, 3, 4, 5]
