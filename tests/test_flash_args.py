"""The FlashAttention-2 window arguments (`kernels.sdpa.flash_varlen_args`) against the band
they stand for, through a CPU model of how the op reads them.

The model (`tests/_fused_like.flash_op_visible`) follows the op's source. The GPU suite runs the
op itself; this pins the argument mapping on CPU, where a wrong one (an open right side on a
sequence with more queries than keys) left rows empty and NaN on the GPU.
"""

from __future__ import annotations

import itertools

import torch
from _fused_like import band_visible
from _fused_like import flash_op_visible as op_visible

from seqpar_ring.kernels.sdpa import flash_varlen_args


def test_window_arguments_mean_the_band():
    bands = [None] + [(left, right) for left in (0, 1, 3, 7, 20) for right in (None, 0, 2)]
    for nq, nk, band, extra_q, extra_k in itertools.product(
            range(1, 14), range(1, 14), bands, (0, 5), (0, 9)):
        # the call's bounds cover this sequence and maybe longer ones of the same call
        max_q, max_k, window = flash_varlen_args(band, nq + extra_q, nk + extra_k)
        assert max_q >= max(nq, 2) and max_k >= nk
        want = band_visible(nq, nk, False, band)
        got = op_visible(nq, nk, max_k, False, window)
        assert torch.equal(got, want), (nq, nk, band, extra_q, extra_k, window)


def test_no_window_keeps_the_bounds():
    assert flash_varlen_args(None, 7, 9) == (7, 9, {})
    assert flash_varlen_args(None, 1, 9) == (2, 9, {})  # see the docstring: GQA, one query
    for n in (1, 5, 12):  # diagonal causal calls: the op's own causal mask
        assert torch.equal(op_visible(n, n, n, True, {}), band_visible(n, n, True, None))


def test_open_right_side_with_more_queries_than_keys():
    """The case seen on the GPU: a 299 x 45 trimmed rectangle with band (0, None)."""
    max_q, max_k, window = flash_varlen_args((0, None), 299, 45)
    vis = op_visible(299, 45, max_k, False, window)
    assert vis.any(1).all() and torch.equal(vis, band_visible(299, 45, False, (0, None)))
    old = op_visible(299, 45, 45, False, dict(window_size_left=0, window_size_right=-1))
    assert not old.any(1).all()  # the former mapping left the first rows without a key
