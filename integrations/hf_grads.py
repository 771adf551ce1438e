"""Gradients under SP without DeepSpeed: the sum over SP ranks, and a check that it happened.

Each SP rank's backward gives the gradient of ITS tokens' share of the loss
(`seqpar_ring.loss.sp_cross_entropy`), so the true gradient is the SUM over the ranks of an SP
group (and the MEAN over data-parallel replicas). Who adds them up depends on the loop:

* DeepSpeed (`seqpar_ring.integrations.deepspeed.initialize`, accelerate's
  `setup_sequence_parallel`): DeepSpeed itself, through our groups as its ``mpu``;
* plain DDP (and `SPTrainer`): DDP, with the comm hook of `register_sp_ddp_hook`;
* a plain loop: `sync_sp_gradients(model)` after the last backward of a step, before gradient
  clipping and ``optimizer.step()``.

`patch` tracks the model (`track`): any backward through its decoder's output (whatever loss
was formed from it) marks the step's gradients as pending, the sum (either of the last two)
clears the mark, and every ``torch.optim`` optimizer step over the model's parameters checks
the mark first: a step on gradients that were never summed raises on every rank instead of
training silently wrong (the ranks' weights would drift apart). Under DeepSpeed the model is
marked as reduced by DeepSpeed and not checked here.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from seqpar_ring import comm as C
from seqpar_ring.agreement import agree
from seqpar_ring.groups import SPGroups

__all__ = ["sync_sp_gradients", "track", "mark_reduced_by", "grad_state", "GradState"]

_STATE_ATTR = "_seqpar_ring_grad_state"
_HOOK_ATTR = "_seqpar_ring_grad_hook"
_BUCKET_NUMEL = 1 << 25  # elements per flattened all-reduce (128 MiB in fp32)
_REDUCERS = ("deepspeed", "ddp")

_TRACKED: weakref.WeakSet = weakref.WeakSet()  # GradState of every tracked model
_OPTIM_HOOKS: list = []


@dataclass(eq=False)
class GradState:
    """Per-model bookkeeping. ``reducer``: None (the loop sums, `sync_sp_gradients`), "ddp"
    (`register_sp_ddp_hook`) or "deepspeed" (DeepSpeed's mpu)."""

    groups: SPGroups
    reducer: str | None = None
    pending: bool = False  # a backward added unsummed gradients since the last sum
    summed: bool = False  # sync_sp_gradients ran since the last optimizer step
    model: Any = field(default=None, repr=False)  # weakref to the tracked module

    def module(self) -> nn.Module | None:
        return None if self.model is None else self.model()


def grad_state(model: nn.Module) -> GradState | None:
    """The `GradState` of ``model`` or of the tracked module inside it (PEFT, DDP wrappers)."""
    for sub in model.modules():
        state = getattr(sub, _STATE_ATTR, None)
        if state is not None:
            return state
    return None


def _mark_pending(state: GradState) -> None:
    """Runs first in every backward through the model's decoder: records a pending sum."""
    if state.summed:
        # The previous sum is only right if this backward starts from zeroed gradients.
        module = state.module()
        if module is not None and _has_nonzero_grads(module):
            raise RuntimeError(
                "backward is adding to gradients that sync_sp_gradients already summed over "
                "the SP ranks; they would be summed twice. Call sync_sp_gradients once per "
                "optimizer step, after the LAST backward of a gradient-accumulation cycle, "
                "and zero the gradients after optimizer.step()"
            )
        state.summed = False
    state.pending = True


def _has_nonzero_grads(module: nn.Module) -> bool:
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads:
        return False
    return bool(torch.stack([g.detach().abs().amax().float() for g in grads]).amax() > 0)


def _mark_output(state: GradState, key: str, check: bool):
    # Tensor hooks, not autograd ops: the output stays the same tensor (no view that later
    # in-place ops, e.g. the Trainer's ``loss *= ...``, would trip over). On the logits the hook
    # runs before any parameter's gradient of the backward exists, so it can also check that
    # the previous sum was followed by zeroed gradients; on the decoder's output (which every
    # loss flows through: a custom one from ``out.logits``, the explicit tiled loss that calls
    # the decoder directly) it only records the pending sum.
    def on_grad(grad: torch.Tensor) -> None:
        if check:
            _mark_pending(state)
        else:
            state.pending = True

    def hook(module: nn.Module, args: tuple, output: Any):
        if state.reducer == "deepspeed" or not torch.is_grad_enabled():
            return None
        value = output.get(key) if hasattr(output, "get") else None
        if value is None and isinstance(output, (tuple, list, torch.Tensor)):
            value = output if isinstance(output, torch.Tensor) else output[0]
        if isinstance(value, torch.Tensor) and value.requires_grad:
            value.register_hook(on_grad)
        return None

    return hook


class _Handles(tuple):
    def remove(self) -> None:
        for handle in self:
            handle.remove()


def track(model: nn.Module, groups: SPGroups | None) -> GradState | None:
    """Check that ``model``'s SP gradients are summed before each optimizer step (`patch` calls
    it on the transformers model). Idempotent; keeps a reducer set by `mark_reduced_by`.
    ``groups`` None or sp_size 1: nothing to sum, the model is not tracked."""
    old = getattr(model, _STATE_ATTR, None)
    handle = getattr(model, _HOOK_ATTR, None)
    if handle is not None:
        handle.remove()
    if groups is None or groups.sp_size == 1:
        if old is not None:
            _TRACKED.discard(old)
            object.__setattr__(model, _STATE_ATTR, None)
        return None
    state = GradState(groups=groups, reducer=None if old is None else old.reducer,
                      model=weakref.ref(model))
    object.__setattr__(model, _STATE_ATTR, state)
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    object.__setattr__(model, _HOOK_ATTR, _Handles((
        model.register_forward_hook(_mark_output(state, "logits", check=True)),
        decoder.register_forward_hook(_mark_output(state, "last_hidden_state", check=False)))))
    _TRACKED.add(state)
    _install_optimizer_hooks()
    return state


def mark_reduced_by(model: nn.Module, reducer: str, groups: SPGroups | None = None) -> None:
    """Record that ``reducer`` ("deepspeed" or "ddp") sums ``model``'s gradients over SP.

    Sticky: a later `patch` keeps it, and `sync_sp_gradients` refuses to sum a second time.
    """
    if reducer not in _REDUCERS:
        raise ValueError(f"reducer must be one of {_REDUCERS}, got {reducer!r}")
    state = grad_state(model)
    if state is None:
        if groups is None or groups.sp_size == 1:
            return
        state = GradState(groups=groups, model=weakref.ref(model))
        object.__setattr__(model, _STATE_ATTR, state)  # untracked: only the reducer is recorded
    state.reducer = reducer
    state.pending = False


def sync_sp_gradients(model: nn.Module, groups: SPGroups | None = None) -> None:
    """Sum ``model``'s gradients over the SP ranks (and average over DP replicas) in place.

    For plain loops without DDP or DeepSpeed: call once per optimizer step, after the last
    backward (of a gradient-accumulation cycle) and before gradient clipping and
    ``optimizer.step()``; every rank of the SP x DP grid must call it. ``model``: the patched
    model (PEFT-wrapped or not; only parameters with ``requires_grad`` are reduced), ``groups``:
    default the ones `patch` recorded. Afterwards every rank holds the gradient of the whole
    batch, as a single process would. Under DDP use `register_sp_ddp_hook`; under DeepSpeed
    nothing (its mpu sums).
    """
    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise ValueError(
            "sync_sp_gradients got a DistributedDataParallel model: DDP reduces its gradients "
            "itself; call register_sp_ddp_hook(ddp_model, groups) once before the first backward "
            "so that DDP sums over the SP ranks instead"
        )
    state = grad_state(model)
    if state is not None and state.reducer is not None:
        who = ("DeepSpeed (its mpu)" if state.reducer == "deepspeed"
               else "DDP (register_sp_ddp_hook)")
        raise RuntimeError(
            f"this model's gradients are already summed over the SP ranks by {who}; calling "
            "sync_sp_gradients as well would sum them twice: remove the call"
        )
    if state is not None and state.summed and not state.pending:
        raise RuntimeError(
            "sync_sp_gradients was called twice without a backward in between: the gradients "
            "would be summed twice. Call it once per optimizer step"
        )
    groups = groups if groups is not None else (state.groups if state is not None else None)
    if groups is None:
        raise ValueError("sync_sp_gradients(model, groups): this model was not patched; pass "
                         "the SPGroups that seqpar_ring.groups.initialize returned")
    if groups.sp_size * groups.dp_size > 1:
        _all_reduce_mean_over_dp(
            [p for p in model.parameters() if p.requires_grad], groups)
    if state is not None:
        state.pending, state.summed = False, True


def _all_reduce_mean_over_dp(params: list[nn.Parameter], groups: SPGroups) -> None:
    """grad <- (sum over all sp*dp ranks of grad) / dp: SP shares add up, replicas average."""
    group = groups.sp_dp_group
    agree(group, "sync_sp_gradients", {"trainable_params": len(params)})
    if not params:
        return
    # A parameter unused on some rank (no grad there) still takes part, as zeros.
    device = next((p.grad.device for p in params if p.grad is not None), params[0].device)
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.uint8, device=device)
    # through the transport: bounded waits, staged when gloo carries CUDA tensors (shared GPU)
    C.all_reduce(has, group, op=dist.ReduceOp.MAX, what="gradient presence all-reduce")
    for p, flag in zip(params, has.tolist()):
        if flag and p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params if p.grad is not None]
    buckets: dict[tuple, list[list[torch.Tensor]]] = {}
    for g in grads:
        chain = buckets.setdefault((g.dtype, g.device), [[]])
        if chain[-1] and sum(t.numel() for t in chain[-1]) + g.numel() > _BUCKET_NUMEL:
            chain.append([])
        chain[-1].append(g)
    for chain in buckets.values():
        for bucket in chain:
            flat = torch.cat([g.detach().reshape(-1) for g in bucket])
            C.all_reduce(flat, group, what="SP gradient all-reduce")
            if groups.dp_size > 1:
                flat.div_(groups.dp_size)
            offset = 0
            for g in bucket:
                g.detach().copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()


def _states_of(optimizer: torch.optim.Optimizer) -> list[GradState]:
    ids = {id(p) for group in optimizer.param_groups for p in group["params"]}
    out = []
    for state in list(_TRACKED):
        module = state.module()
        if module is not None and any(id(p) in ids for p in module.parameters()):
            out.append(state)
    return out


def _before_step(optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
    for state in _states_of(optimizer):
        if state.pending and state.reducer != "deepspeed":
            raise RuntimeError(
                "optimizer.step() on sequence-parallel gradients that were never summed over the "
                f"SP ranks ({state.groups}): each rank holds only its own tokens' share, so the "
                "ranks would train apart. In a plain loop call "
                "seqpar_ring.integrations.hf.sync_sp_gradients(model) after the last backward "
                "and before clipping/step; under DDP call register_sp_ddp_hook(ddp_model, groups) "
                "before the first backward; with DeepSpeed use "
                "seqpar_ring.integrations.deepspeed.initialize"
            )
    return None


def _after_step(optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
    for state in _states_of(optimizer):
        state.summed = False
    return None


def _install_optimizer_hooks() -> None:
    if not _OPTIM_HOOKS:
        from torch.optim.optimizer import (
            register_optimizer_step_post_hook,
            register_optimizer_step_pre_hook,
        )

        _OPTIM_HOOKS.append(register_optimizer_step_pre_hook(_before_step))
        _OPTIM_HOOKS.append(register_optimizer_step_post_hook(_after_step))
