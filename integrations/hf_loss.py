"""The SP causal-LM loss installed as ``model.loss_function``, and the DDP gradient scale.

Gradient bookkeeping. `seqpar_ring.loss.sp_cross_entropy` gives each SP rank the gradient of
ITS tokens' share, so the true gradient is the SUM over the SP ranks of a group and the MEAN
over DP replicas. DeepSpeed with our ``mpu`` reduces exactly like that; plain DDP averages over
all sp*dp ranks (a factor sp too small), which `register_sp_ddp_hook` corrects; plain loops call
`seqpar_ring.integrations.hf_grads.sync_sp_gradients`.

Two calling conventions, as in transformers:

* ``num_items_in_batch`` None (plain loops, eval): the loss is the mean over every valid label
  of the SP group, the same value on each of its ranks.
* ``num_items_in_batch`` given (HF Trainer with ``average_tokens_across_devices``): it is the
  valid-label count over ALL ranks and accumulation steps, and every rank returns its share,
  which the Trainer multiplies by the number of processes and averages when logging. The SP
  group's sum is split evenly over its ``sp`` ranks (``group_sum / (sp * N)``) — dividing the
  count by sp instead inflated loss and gradients by sp (transformers PR #46775).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from seqpar_ring import comm as C
from seqpar_ring.groups import SPGroups
from seqpar_ring.loss import sp_cross_entropy

from .hf_grads import grad_state, mark_reduced_by

__all__ = ["SPCausalLMLoss", "register_sp_ddp_hook"]


class SPCausalLMLoss:
    """Drop-in for transformers' ``ForCausalLMLoss`` under SP (``model.loss_function = ...``).

    logits: (batch, seq_local, vocab); shift_labels: (batch, seq_local), shifted over the whole
    row BEFORE sharding (SPDataCollator / shard_batch). ``labels`` is only used (shifted
    locally) when there is no sharding.
    """

    def __init__(self, groups: SPGroups | None):
        self.groups = groups

    def __call__(self, logits, labels=None, vocab_size=None, num_items_in_batch=None,
                 ignore_index: int = -100, shift_labels=None, **kwargs) -> torch.Tensor:
        p = 1 if self.groups is None else self.groups.sp_size
        group = None if p == 1 else self.groups.sp_group
        if shift_labels is None:
            if p > 1:
                raise ValueError(
                    "under sequence parallelism labels must be shifted over the whole row before "
                    "sharding: pass batches through SPDataCollator or shard_batch, which give "
                    "shift_labels"
                )
            shift_labels = F.pad(labels[:, 1:], (0, 1), value=ignore_index)
        shift_labels = shift_labels.to(logits.device)
        mean = sp_cross_entropy(logits, shift_labels, group, ignore_index)
        if num_items_in_batch is None:
            return mean
        count = (shift_labels != ignore_index).sum().double()
        if group is not None:
            C.all_reduce(count, group, what="label count all-reduce")  # staged on gloo+CUDA
        total = torch.as_tensor(num_items_in_batch, dtype=torch.float64, device=count.device)
        return mean * (count / (p * total)).float()


def register_sp_ddp_hook(ddp_model: torch.nn.parallel.DistributedDataParallel,
                         groups: SPGroups) -> None:
    """Make DDP sum gradients over SP ranks and average over DP (not average over sp*dp).

    The hook all-reduces each gradient bucket over DDP's process group (all sp*dp ranks, which
    must be the SP x DP world of ``groups``) after dividing by dp_size instead of world size.
    Call once, before the first backward. The model's gradients then count as summed after
    each synchronised backward (`sync_sp_gradients` would refuse to sum them again).
    """
    world = dist.get_world_size(ddp_model.process_group)
    if world != groups.sp_size * groups.dp_size:
        raise ValueError(
            f"DDP reduces over {world} ranks but the SP x DP grid {groups} has "
            f"{groups.sp_size * groups.dp_size}: wrap the model in DDP over the SP x DP world"
        )

    mark_reduced_by(ddp_model.module, "ddp", groups)
    state = grad_state(ddp_model.module)

    # no annotations: DDP inspects them and postponed (string) annotations fail its check
    def hook(dp_size, bucket):
        if state is not None:
            state.pending = False  # runs after the loss's backward mark of this step
        grads = bucket.buffer().div_(dp_size)
        work = dist.all_reduce(grads, group=ddp_model.process_group, async_op=True)
        return work.get_future().then(lambda fut: fut.value()[0])

    ddp_model.register_comm_hook(groups.dp_size, hook)
