"""Tiled LM head + cross entropy: the (seq_local x vocab) logits are never materialised.

At long context the logits dominate memory: 512K tokens x 32K vocab is 32 GiB in bf16, twice
that once upcast to fp32 for the loss, and again for its gradient. ``tiled_lm_loss`` projects
``tile_size`` tokens at a time, keeps only a per-token log-sum-exp (4 bytes/token), and in
backward recomputes each tile's logits to form its gradient. The value and gradients are those
of ``sp_cross_entropy(F.linear(hidden, weight, bias), shift_labels, group)`` — token-weighted
over the whole SP group.

The loss is one explicit call, never a side effect of a model's forward:

* ``tiled_lm_loss(hidden, weight, shift_labels, group)``: the function, for your own loop;
* ``TiledLMHead``: an ``nn.Linear`` stand-in owning the head's Parameters; ``head(hidden)``
  returns logits, ``head(hidden, shift_labels, group)`` the tiled loss. Under DeepSpeed ZeRO-3
  the loss must run inside the head module's forward (ZeRO-3 gathers the weight there, and
  again before its backward), which this gives;
* for transformers models, ``seqpar_ring.integrations.hf_tiled`` installs the head and makes
  the step's call (decoder forward, then the head with the labels).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from . import comm as C

__all__ = ["tiled_lm_loss", "default_tile_size", "TiledLMHead"]

# Elements of one tile's logits: 2**26 fp32 = 256 MiB, so a tile's working set (logits in the
# model dtype, fp32 copy, fp32 gradient, gradient in the model dtype) stays under ~1 GiB.
TILE_ELEMENTS = 2**26


def default_tile_size(vocab_size: int) -> int:
    """Tokens per tile so one tile holds about ``TILE_ELEMENTS`` logits (at least 64 tokens)."""
    return max(64, TILE_ELEMENTS // max(1, vocab_size))


def _group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _tile_logits(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    # Same op and dtype as the model's lm_head (F.linear), then fp32 as transformers' loss does,
    # so the tiled loss matches the plain one bit for bit up to matmul blocking.
    return F.linear(x, weight, bias).float()


class _TiledLMLoss(torch.autograd.Function):
    """Forward: per tile logits -> (lse, picked logit); one all-reduce of (loss sum, count).

    Backward (local, like ``sp_cross_entropy``): per tile, recompute logits, form
    (softmax - onehot) * valid / count, then dX_tile = G @ W and dW += G^T @ X_tile (fp32).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, group, tile, ignore_index, num_items):
        x = hidden.reshape(-1, hidden.shape[-1])
        y = labels.reshape(-1)
        valid = y != ignore_index
        safe_y = torch.where(valid, y, torch.zeros_like(y))  # ignored tokens index class 0
        lse = torch.empty(y.shape, dtype=torch.float32, device=x.device)
        total = torch.zeros((), dtype=torch.float64, device=x.device)
        for s in range(0, x.shape[0], tile):
            logits = _tile_logits(x[s:s + tile], weight, bias)
            lse[s:s + tile] = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, safe_y[s:s + tile].unsqueeze(1)).squeeze(1)
            tok = torch.where(valid[s:s + tile], lse[s:s + tile] - picked, 0.0)
            total += tok.sum(dtype=torch.float64)
            del logits, picked, tok
        # float64 keeps the count exact beyond 2**24 tokens and the sum free of rounding drift
        stats = torch.stack([total, valid.sum().double()])
        if _group_size(group) > 1:
            C.all_reduce(stats, group, what="tiled loss statistics all-reduce")
        count = stats[1] if num_items is None else torch.as_tensor(
            num_items, dtype=torch.float64, device=x.device).reshape(())
        count = count.clamp(min=1.0)  # no valid label anywhere: loss 0, gradient 0
        ctx.save_for_backward(hidden, weight, bias, safe_y, valid, lse, count)
        ctx.tile = tile
        return (stats[0] / count).float()

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias, safe_y, valid, lse, count = ctx.saved_tensors
        tile = ctx.tile
        x = hidden.reshape(-1, hidden.shape[-1])
        scale = (grad_out.double() / count).float()
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dx = torch.empty_like(x) if need_x else None
        # fp32 accumulator across tiles: each tile's G^T X is rounded once, never re-added in bf16
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=x.device) if need_w else None
        db = torch.zeros(bias.shape, dtype=torch.float32, device=x.device) if need_b else None
        for s in range(0, x.shape[0], tile):
            xt = x[s:s + tile]
            g = torch.exp(_tile_logits(xt, weight, bias).sub_(lse[s:s + tile].unsqueeze(1)))
            g.scatter_add_(1, safe_y[s:s + tile].unsqueeze(1),
                           torch.full_like(g[:, :1], -1.0))
            g.mul_(valid[s:s + tile].unsqueeze(1).to(g.dtype) * scale)
            if need_b:
                db += g.sum(0)
            g = g.to(x.dtype)  # the model's lm_head backward runs in its own dtype too
            if need_x:
                dx[s:s + tile] = g @ weight
            if need_w:
                dw += (g.t() @ xt).float()
            del g
        return (None if dx is None else dx.view(hidden.shape),
                None if dw is None else dw.to(weight.dtype),
                None if db is None else db.to(bias.dtype), None, None, None, None, None)


def tiled_lm_loss(
    hidden: Tensor,
    weight: Tensor,
    shift_labels: Tensor,
    group: dist.ProcessGroup | None = None,
    *,
    bias: Tensor | None = None,
    tile_size: int | None = None,
    ignore_index: int = -100,
    num_items: float | Tensor | None = None,
) -> Tensor:
    """LM head + cross entropy over sequence tiles, token-weighted across the SP group.

    Args:
        hidden: ``(batch, seq_local, hidden)`` final hidden states of this rank's tokens.
        weight: ``(vocab, hidden)`` LM head weight (``lm_head.weight``); ``bias`` ``(vocab,)``.
        shift_labels: ``(batch, seq_local)`` labels shifted over the whole row before sharding
            (`seqpar_ring.layout.shard_batch`); ``ignore_index`` marks tokens without a label.
        group: the SP group; None or size 1 = this rank's tokens only.
        tile_size: tokens per tile (rows of the flattened batch); None = ``default_tile_size``.
            Results do not depend on it beyond matmul rounding.
        num_items: optional denominator instead of the group's valid-label count (e.g. HF
            Trainer's ``num_items_in_batch`` when it counts the SP group's labels).
    Returns:
        fp32 scalar, the same on every rank of ``group``: sum of token losses / count. Its
        backward gives this rank's share (sum over SP ranks = true gradient), as
        ``sp_cross_entropy``. 0 with zero gradients when no rank has a valid label.
    """
    if hidden.dim() != 3 or hidden.shape[:2] != shift_labels.shape:
        raise ValueError(
            f"hidden {tuple(hidden.shape)} and shift_labels {tuple(shift_labels.shape)} do not "
            "match: expected hidden (batch, seq_local, hidden) and labels (batch, seq_local)")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[2]:
        raise ValueError(f"weight must be (vocab, hidden={hidden.shape[2]}), got "
                         f"{tuple(weight.shape)}; pass lm_head.weight (gathered under ZeRO-3: "
                         "call it through TiledLMHead, inside the module's forward)")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must be (vocab={weight.shape[0]},), got {tuple(bias.shape)}")
    if shift_labels.dtype.is_floating_point:
        raise ValueError(f"shift_labels must be an integer tensor, got {shift_labels.dtype}")
    tile = tile_size or default_tile_size(weight.shape[0])
    if tile < 1:
        raise ValueError(f"tile_size must be >= 1, got {tile_size}")
    return _TiledLMLoss.apply(hidden, weight, bias, shift_labels.long(), group, int(tile),
                              ignore_index, num_items)


class TiledLMHead(nn.Module):
    """Drop-in for a model's ``lm_head`` (nn.Linear) with the tiled loss as an explicit call.

    ``head(hidden)`` -> logits ``(batch, seq, vocab)``, exactly the linear layer it replaces (the
    model's own forward, generation and evaluation call it so). ``head(hidden, shift_labels,
    group)`` -> the fp32 scalar of `tiled_lm_loss` over the SP ``group`` (``num_items`` as
    there); the logits are never materialised. The arguments alone select between the two: no
    state, no hook.

    It adopts the head's ``weight`` (and ``bias``) Parameter objects as its own, so state-dict
    keys, weight tying and optimizer entries are unchanged, and — the point under ZeRO-3 —
    DeepSpeed gathers them around THIS module's forward (and again before its backward), which
    is where the whole tiled loss runs. Replace the head before ``deepspeed.initialize``.
    """

    def __init__(self, head: nn.Linear, *, tile_size: int | None = None,
                 ignore_index: int = -100):
        super().__init__()
        if not isinstance(head, nn.Linear):
            raise ValueError(f"TiledLMHead replaces an nn.Linear LM head, got "
                             f"{type(head).__name__}; call tiled_lm_loss with its weight instead")
        self.in_features, self.out_features = head.in_features, head.out_features
        self.weight = head.weight
        self.bias = head.bias
        self.tile_size, self.ignore_index = tile_size, ignore_index

    def forward(self, hidden: Tensor, shift_labels: Tensor | None = None,
                group: dist.ProcessGroup | None = None, *,
                num_items: float | Tensor | None = None) -> Tensor:
        if shift_labels is None:
            return F.linear(hidden, self.weight, self.bias)
        return tiled_lm_loss(hidden, self.weight, shift_labels, group, bias=self.bias,
                             tile_size=self.tile_size, ignore_index=self.ignore_index,
                             num_items=num_items)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, tile_size={self.tile_size}")
