"""Tiled LM head + cross entropy: the (seq_local x vocab) logits are never materialised.

At long context the logits dominate memory: 512K tokens x 32K vocab is 32 GiB in bf16, twice
that once upcast to fp32 for the loss, and again for its gradient. ``tiled_lm_loss`` projects
``tile_size`` tokens at a time, keeps only a per-token log-sum-exp (4 bytes/token), and in
backward recomputes each tile's logits to form its gradient. The value and gradients are those
of ``sp_cross_entropy(F.linear(hidden, weight, bias), shift_labels, group)`` — token-weighted
over the whole SP group.

HF models plug it in with :func:`enable_tiled_loss` (see its docstring for the mechanism).
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

log = logging.getLogger("seqpar_ring")

__all__ = ["tiled_lm_loss", "default_tile_size", "TiledLMHead", "enable_tiled_loss"]

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
            dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=group)
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
                         "call this inside the lm_head module's forward, see TiledLMHead)")
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
    """Drop-in for a model's ``lm_head`` (nn.Linear) that can return the tiled loss instead.

    It adopts the head's ``weight`` (and ``bias``) Parameter objects as its own, so state-dict
    keys, weight tying and optimizer entries are unchanged, and — the point under ZeRO-3 —
    DeepSpeed gathers them around THIS module's forward (and again before its backward), which
    is where the whole tiled loss runs. With no labels pending it is a plain linear layer.
    """

    def __init__(self, head: nn.Linear, *, group=None, tile_size: int | None = None,
                 ignore_index: int = -100):
        super().__init__()
        self.in_features, self.out_features = head.in_features, head.out_features
        self.weight = head.weight
        self.bias = head.bias
        self.group, self.tile_size, self.ignore_index = group, tile_size, ignore_index
        self._pending: tuple[Tensor, object] | None = None  # (shift_labels, num_items), 1 call
        self._last_loss: Tensor | None = None

    def forward(self, hidden: Tensor) -> Tensor:
        pending, self._pending = self._pending, None
        if pending is None or pending[0].shape != hidden.shape[:2]:
            if pending is not None:  # e.g. logits_to_keep sliced the hidden states
                log.warning("tiled loss skipped: labels %s do not match hidden %s",
                            tuple(pending[0].shape), tuple(hidden.shape))
            return F.linear(hidden, self.weight, self.bias)
        loss = tiled_lm_loss(hidden, self.weight, pending[0], self.group, bias=self.bias,
                             tile_size=self.tile_size, ignore_index=self.ignore_index,
                             num_items=pending[1])
        self._last_loss = loss
        return loss

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, tile_size={self.tile_size}")


_UNSUPPORTED = ("final_logit_softcapping", "logit_scale", "output_multiplier_scale")


def _sp_group(group):
    return getattr(group, "sp_group", group)  # accept SPGroups as well as a ProcessGroup


def enable_tiled_loss(model: nn.Module, tile_size: int | None = None, group=None) -> TiledLMHead:
    """Make ``model(..., labels=..)`` / ``model(..., shift_labels=..)`` use the tiled loss.

    Mechanism (public APIs only, transformers 5.17-5.23): an HF ``*ForCausalLM.forward``
    computes ``logits = self.lm_head(hidden)`` then ``self.loss_function(logits=logits, ...)``.

    1. ``model.set_output_embeddings(TiledLMHead(old_head))`` replaces the head module.
    2. A forward pre-hook (``register_forward_pre_hook(with_kwargs=True)``) on ``model`` hands
       the call's ``shift_labels`` (or ``labels`` shifted by one, as transformers does) to the
       head, and sets ``labels`` when only ``shift_labels`` was given so the loss is computed.
    3. The head returns the tiled loss (computed inside its forward: ZeRO-3 gathers the weight
       there) and ``model.loss_function = ...`` (its public setter) returns that tensor as the
       loss. Calls without labels, or with ``logits_to_keep`` slicing, get real logits and the
       model's original loss function.

    ``num_items_in_batch`` (HF Trainer) follows ``integrations.hf_loss``: each SP rank returns
    the group's loss sum / (sp * num_items_in_batch). Call before or after
    ``integrations.hf.patch``: whichever loss_function is installed besides ours becomes the
    fallback for calls that produce real logits.

    Consequence: when the tiled loss is used, ``outputs.logits`` holds the loss scalar, not
    logits (that is the memory saved). Call before ``deepspeed.initialize`` (ZeRO-3 hooks are
    attached to the modules present then). Models that transform logits after the head
    (soft-capping, logit scale) are refused. Under SP pass ``shift_labels`` from
    ``shard_batch``; ``group`` (ProcessGroup or SPGroups) is the SP group.
    """
    head = model.get_output_embeddings()
    if isinstance(head, TiledLMHead):
        head.tile_size, head.group = tile_size, _sp_group(group)
        return head
    if not isinstance(head, nn.Linear):
        raise ValueError(f"enable_tiled_loss needs an nn.Linear output embedding, got "
                         f"{type(head).__name__}; use tiled_lm_loss directly")
    cfg = getattr(model, "config", None)
    text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    for key in _UNSUPPORTED:
        if getattr(text_cfg, key, None) not in (None, 1.0):
            raise ValueError(f"{type(model).__name__} applies `{key}` to the logits after the "
                             "LM head; the tiled loss would skip it. Use sp_cross_entropy")
    new = TiledLMHead(head, group=_sp_group(group), tile_size=tile_size)
    model.set_output_embeddings(new)
    sp_size = _group_size(new.group)
    fallback = [model.loss_function]  # the loss used when the head returned real logits

    def pre_hook(module, args, kwargs):
        new._last_loss = None
        if module.loss_function is not loss_function:
            # something (e.g. integrations.hf.patch) installed its loss after us: keep it as
            # the fallback and put ours back in front, so the call order does not matter
            fallback[0] = module.loss_function
            module.loss_function = loss_function
        shift, labels = kwargs.get("shift_labels"), kwargs.get("labels")
        if shift is None and labels is not None:
            if sp_size > 1:
                raise ValueError("under sequence parallelism pass shift_labels (shifted over "
                                 "the whole row before sharding, see shard_batch), not labels")
            shift = F.pad(labels, (0, 1), value=new.ignore_index)[..., 1:]
        if shift is not None and kwargs.get("logits_to_keep", 0) in (0, None):
            # transformers' num_items_in_batch counts labels over ALL ranks; each SP rank returns
            # group_sum / (sp * N) as integrations.hf_loss does
            items = kwargs.get("num_items_in_batch")
            new._pending = (shift, None if items is None else items * sp_size)
            if labels is None:
                kwargs = {**kwargs, "labels": shift}  # transformers computes loss only if set
            return args, kwargs
        new._pending = None
        return None

    def loss_function(logits, labels, vocab_size=None, **kwargs):
        # Identity is not checked: ZeRO-3 re-wraps module outputs for its backward hooks.
        if new._last_loss is not None and logits.dim() == 0:
            new._last_loss = None
            return logits
        return fallback[0](logits=logits, labels=labels, vocab_size=vocab_size, **kwargs)

    model.register_forward_pre_hook(pre_hook, with_kwargs=True)
    model.loss_function = loss_function
    return new
