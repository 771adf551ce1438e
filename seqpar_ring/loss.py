"""Token-weighted cross entropy over the tokens of a whole SP group.

Every rank holds the logits of its own tokens. The loss of the sample is the mean over ALL
valid labels of the SP group: sum of per-token losses / global count of valid labels. Taking
the mean of each rank's local mean instead is wrong whenever ranks hold different numbers of
valid labels (padding, prompt masking), and divides by zero on a rank with none.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from . import comm as C
from .kernels import xent

__all__ = ["sp_cross_entropy"]


# Logits are upcast a slice of rows at a time: at 32K tokens x 32K vocab a whole fp32 copy is
# 4 GiB and the softmax of the backward another, more than the rest of a checkpointed step.
CHUNK_ELEMENTS = 1 << 26  # 64M logits: 256 MiB of fp32 per slice


def _slices(n: int, vocab: int) -> list[slice]:
    step = max(1, CHUNK_ELEMENTS // max(vocab, 1))
    return [slice(s, min(s + step, n)) for s in range(0, n, step)]


class _SPCrossEntropy(torch.autograd.Function):
    """Forward: one all-reduce of (loss sum, valid count). Backward: local only.

    The global mean depends on this rank's logits only through its own tokens' terms, so
    d(loss)/d(local logits) = (softmax - onehot) / global_count on valid tokens: no
    communication. Summed over SP ranks, the parameter gradients are the true gradient.
    Both passes work on slices of rows (`CHUNK_ELEMENTS`), or on GPU in one Triton pass each
    (`kernels.xent`): the only full-size tensor they allocate is the logits' gradient, in the
    logits' dtype.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor, group, ignore_index: int) -> Tensor:
        # fp32 for half-precision logits, fp64 kept (reference runs stay exact)
        cd = _compute_dtype(logits)
        x = logits.reshape(-1, logits.shape[-1])
        y = labels.reshape(-1)
        valid = y != ignore_index
        safe_y = torch.where(valid, y, torch.zeros_like(y))  # ignored tokens index class 0
        if xent.available(x):  # GPU: one read of the logits (kernels/xent.py)
            lse = xent.row_lse(x)
        else:
            lse = torch.empty(x.shape[0], dtype=cd, device=x.device)
            for s in _slices(*x.shape):
                lse[s] = torch.logsumexp(x[s].to(cd), dim=-1)
        picked = x.gather(1, safe_y.unsqueeze(1)).squeeze(1).to(cd)
        tok_loss = torch.where(valid, lse - picked, torch.zeros_like(lse))
        # float64 keeps the count exact beyond 2**24 tokens and the sum free of rounding drift
        stats = torch.stack([tok_loss.sum().double(), valid.sum().double()])
        if group is not None and dist.get_world_size(group) > 1:
            C.all_reduce(stats, group, what="loss statistics all-reduce")
        count = stats[1].clamp(min=1.0)  # no valid label anywhere: loss 0, gradient 0
        ctx.save_for_backward(logits, safe_y, valid, lse, count)
        return (stats[0] / count).to(cd)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        logits, safe_y, valid, lse, count = ctx.saved_tensors
        x = logits.reshape(-1, logits.shape[-1])
        scale = (grad_out.double() / count).to(lse.dtype)
        weight = (valid.to(lse.dtype) * scale).unsqueeze(1)
        if xent.available(x):
            grad = xent.row_grad(x, safe_y, lse, weight.squeeze(1))
        else:
            grad = torch.empty_like(x)
            for s in _slices(*x.shape):
                g = torch.exp(x[s].to(lse.dtype) - lse[s].unsqueeze(1))  # softmax, recomputed
                g.scatter_add_(1, safe_y[s].unsqueeze(1),
                               torch.full_like(lse[s], -1.0).unsqueeze(1))
                grad[s] = g.mul_(weight[s])
        return grad.view(logits.shape), None, None, None


def _compute_dtype(logits: Tensor) -> torch.dtype:
    return torch.promote_types(logits.dtype, torch.float32)


def sp_cross_entropy(
    logits: Tensor,
    shift_labels: Tensor,
    group: dist.ProcessGroup | None = None,
    ignore_index: int = -100,
) -> Tensor:
    """Mean cross entropy over every valid label of the SP group (same value on every rank).

    Args:
        logits: ``(batch, seq_local, vocab)``, any float dtype (computed in fp32; fp64 logits
            in fp64).
        shift_labels: ``(batch, seq_local)`` already shifted over the whole row before sharding
            (`seqpar_ring.layout.shard_batch`); ``ignore_index`` marks tokens without a label.
        group: the SP group; None or size 1 = this rank's tokens only.
    Returns:
        fp32 scalar. 0 (with zero gradient) when no rank has a valid label.
    """
    if logits.shape[:-1] != shift_labels.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} and shift_labels {tuple(shift_labels.shape)} do not "
            "match: expected logits (batch, seq_local, vocab) and labels (batch, seq_local) "
            "sharded the same way"
        )
    if shift_labels.dtype.is_floating_point:
        raise ValueError(f"shift_labels must be an integer tensor, got {shift_labels.dtype}")
    return _SPCrossEntropy.apply(logits, shift_labels.long(), group, ignore_index)
