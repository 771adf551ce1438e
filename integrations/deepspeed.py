"""DeepSpeed integration: one `initialize` that sets up sequence parallelism, then DeepSpeed.

```python
parser = add_argparse_args(deepspeed.add_config_arguments(argparse.ArgumentParser()))
args = parser.parse_args()      # deepspeed train.py --deepspeed --deepspeed_config cfg.json \
                                #                    --sequence-parallel-size 4
model = AutoModelForCausalLM.from_pretrained(...)
engine, optimizer, _, _ = initialize(model=model, args=args, model_parameters=model.parameters())
for batch in loader:            # batches sharded by SPDataCollator(engine.seqpar_config, ...)
    engine.backward(engine(**batch).loss)
    engine.step()
```

Gradient bookkeeping. The SP loss gives each rank the gradient of its own tokens' share, so a
sample's true gradient is the SUM over its SP group; replicas (dp = world / sp) are AVERAGED.
DeepSpeed 0.19.8 with our ``mpu`` (`seqpar_ring.groups.SPGroups`) does exactly that in ZeRO
0/1/2: it all-reduces over ``get_sequence_data_parallel_group()`` (every rank: parameters are
replicated over SP and DP) and divides by ``world / sp``. Its ZeRO-3 needs two corrections,
both applied here and both tested against a single-process run:

* ZeRO-3 converts a model to partitioned parameters over ``mpu.get_data_parallel_group()``
  (the DP group only), while its optimizer reduces over the SP x DP group. Parameters would
  then be partitioned, gathered and reduced among DP replicas only and never summed over SP
  ranks (each SP rank kept its own half gradient, times sp). We convert the model ourselves
  over the SP x DP group (``deepspeed.zero.Init(module=..., data_parallel_group=...)``)
  before DeepSpeed does, and check models already built under ``zero.Init``.
* ZeRO-3's reduce-scatter path (``reduce_scatter`` true, its default) divides gradients by
  sp x dp, not dp like every other path. Gradient hooks multiply each parameter's gradient by
  sp before it is reduced (exact for powers of two); ``reduce_scatter: false`` is refused
  because that setting mixes both paths depending on bucket fill.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
from typing import Any, Mapping

import torch
import torch.distributed as dist
from torch import nn

from seqpar_ring import groups as sp_groups
from seqpar_ring.config import SeqParConfig
from seqpar_ring.groups import SPGroups

from .ds_checkpoint import load_checkpoint, save_checkpoint
from .hf_grads import mark_reduced_by
from .ds_config import (
    DS_SIZE_KEY,
    SECTION,
    add_argparse_args,
    config_from_args,
    load_ds_config,
    refuse_auto,
    split_config,
    validate_for_world,
)

__all__ = [
    "initialize",
    "prepare_model_for_zero3",
    "add_argparse_args",
    "config_from_args",
    "split_config",
    "load_ds_config",
    "validate_for_world",
    "save_checkpoint",
    "load_checkpoint",
    "SECTION",
    "DS_SIZE_KEY",
]

logger = logging.getLogger(__name__)

_ZERO3_HOOKS_ATTR = "_seqpar_ring_zero3_grad_hooks"
_LAUNCHER_WORLD_VARS = ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")


def _world_size_before_init() -> int | None:
    """World size without a collective: the process group if up, else the launcher's env."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    for var in _LAUNCHER_WORLD_VARS:
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return None


def _zero_stage(ds: Mapping[str, Any]) -> int:
    return int((ds.get("zero_optimization") or {}).get("stage", 0))


def _param_dtype(ds: Mapping[str, Any]) -> torch.dtype | None:
    """The dtype DeepSpeed casts parameters to (None: keep them as they are)."""
    if (ds.get("bf16") or ds.get("bfloat16") or {}).get("enabled"):
        return torch.bfloat16
    if (ds.get("fp16") or {}).get("enabled"):
        return torch.float16
    return None


def prepare_model_for_zero3(model: nn.Module, ds: Mapping[str, Any], groups: SPGroups) -> None:
    """Partition the parameters over the SP x DP group and correct the ZeRO-3 gradient scale.

    Call before DeepSpeed sees the model (`initialize` and the accelerate helper do). ``ds``:
    the DeepSpeed config dict (for the parameter dtype and ZeRO settings).
    """
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    replicas = groups.sp_size * groups.dp_size
    params = list(model.parameters())
    done = [p for p in params if hasattr(p, "ds_id")]
    for p in done:
        size = dist.get_world_size(p.ds_process_group)
        if size != replicas:
            raise RuntimeError(
                f"the model was built under deepspeed.zero.Init partitioned over {size} ranks, "
                f"but its parameters are replicated on all {replicas} SP x DP ranks ({groups}): "
                "build it under deepspeed.zero.Init(data_parallel_group="
                "groups.sp_dp_group) (the default world group also works), or without zero.Init"
            )
    rest = [p for p in params if not hasattr(p, "ds_id")]
    if rest:
        # What DeepSpeed would do before converting: move to this rank's device (the one
        # zero.Init and the engine use: LOCAL_RANK), cast parameters only.
        model.to(get_accelerator().device_name(int(os.environ.get("LOCAL_RANK", "0"))))
        dtype = _param_dtype(ds)
        if dtype is not None:
            for p in rest:
                if p.is_floating_point() and p.dtype != dtype:
                    p.data = p.data.to(dtype)
        if done:
            done[0].convert_to_zero_parameters(param_list=rest)
        else:
            deepspeed.zero.Init(
                module=model,
                data_parallel_group=groups.sp_dp_group,
                config_dict_or_path=ds,
                mpu=groups,
            )
    for handle in getattr(model, _ZERO3_HOOKS_ATTR, ()):
        handle.remove()
    hooks = ()
    if groups.sp_size > 1:
        sp = float(groups.sp_size)
        hooks = tuple(
            p.register_hook(lambda g, sp=sp: g * sp) for p in params if p.requires_grad
        )
    object.__setattr__(model, _ZERO3_HOOKS_ATTR, hooks)


def shared_gpu_device() -> int | None:
    """This rank's CUDA device when its host runs more ranks than it has GPUs (ranks sharing a
    GPU: docs/shared-gpu.md), from torchrun's LOCAL_RANK / LOCAL_WORLD_SIZE; else None."""
    if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
        return None
    gpus = torch.cuda.device_count()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    per_host = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return local % gpus if max(per_host, local + 1) > gpus else None


def _use_shared_gpu(index: int) -> None:
    """Put this rank on ``cuda:index`` for torch and for DeepSpeed.

    DeepSpeed takes ``cuda:$LOCAL_RANK`` as a rank's device — in its engine, ``zero.Init`` and
    ZeRO-3's runtime checks — and that device does not exist when ranks share a GPU (rank 1 of
    2 on one GPU: "invalid device ordinal"). So LOCAL_RANK is set to the device index for the
    rest of the process; RANK and WORLD_SIZE are untouched.
    """
    torch.cuda.set_device(index)
    if os.environ.get("LOCAL_RANK") != str(index):
        logger.info("ranks share GPUs: LOCAL_RANK %s -> %d (DeepSpeed's device index)",
                    os.environ.get("LOCAL_RANK"), index)
        os.environ["LOCAL_RANK"] = str(index)


def _init_distributed(dist_backend: str | None) -> None:
    """DeepSpeed's communication backend over the process group (started here if needed)."""
    import deepspeed

    shared = shared_gpu_device()
    if shared is not None:
        _use_shared_gpu(shared)
        if dist_backend is None and not dist.is_initialized():
            # NCCL refuses two ranks on one GPU; gloo runs them and our transport stages CUDA
            # tensors through host memory
            logger.info("more ranks than GPUs on this host: process group on gloo, cuda:%d",
                        shared)
            dist_backend = "gloo"
    # DeepSpeed picks the accelerator's backend (nccl on CUDA, gloo on CPU) when None; over an
    # existing torch.distributed group it only wraps it.
    deepspeed.init_distributed(dist_backend=dist_backend)
    prefer_current_collectives()


def prefer_current_collectives() -> None:
    """Point DeepSpeed's torch backend at torch's current collective names.

    DeepSpeed 0.19.8 binds ``torch.distributed.all_gather_into_tensor`` and
    ``reduce_scatter_tensor``, which torch 2.13 deprecates in favour of ``all_gather_single`` /
    ``reduce_scatter_single`` (same arguments, same result): every rank printed a FutureWarning
    at its first ZeRO step. Only the exact deprecated functions are replaced.
    """
    from deepspeed import comm as ds_comm

    cdb = getattr(ds_comm.comm, "cdb", None)
    for attr, old, new in (("all_gather_function", "all_gather_into_tensor", "all_gather_single"),
                           ("reduce_scatter_function", "reduce_scatter_tensor",
                            "reduce_scatter_single")):
        current, replacement = getattr(dist, old, None), getattr(dist, new, None)
        if cdb is not None and replacement is not None and current is not None \
                and getattr(cdb, attr, None) is current:
            setattr(cdb, attr, replacement)


def initialize(
    model: nn.Module | None = None,
    config: str | os.PathLike | Mapping[str, Any] | None = None,
    model_parameters: Any = None,
    args: argparse.Namespace | None = None,
    optimizer: Any = None,
    lr_scheduler: Any = None,
    training_data: Any = None,
    *,
    patch_model: bool = True,
    dist_backend: str | None = None,
    seq_len: int | None = None,
    **kwargs: Any,
) -> tuple:
    """`deepspeed.initialize` with sequence parallelism; returns what DeepSpeed returns.

    ``config``: DeepSpeed JSON path or dict with a ``"sequence_parallel"`` section (default:
    ``args.deepspeed_config``); ``--sequence-parallel-*`` flags in ``args`` override it.
    Steps: check every setting against the world size (before any collective), initialise
    torch.distributed if needed, build the SP x DP groups, patch the HF model's attention and
    loss (``patch_model=False`` for a model that calls `seqpar_ring.modules.sp_attention`
    itself), prepare ZeRO-3, and call DeepSpeed with ``mpu=<the SPGroups>`` so its data
    parallel size is world / sp. The engine gets ``seqpar_config`` and ``seqpar_groups``.
    ``seq_len`` (total tokens per sample) is needed only by ``ulysses_size="auto"``, which is
    resolved here from the model's head counts (`seqpar_ring.tools.plan.resolve_ulysses_size`).
    Other keyword arguments go to `deepspeed.initialize`.
    """
    if model is None:
        raise ValueError("initialize() needs model=<the transformers model>")
    if config is None and args is not None:
        config = getattr(args, "deepspeed_config", None)
    sp_cfg, ds = config_from_args(args, config)
    refuse_auto(ds)  # before any group exists: nothing to tear down
    world = _world_size_before_init()
    if world is not None:
        validate_for_world(sp_cfg, ds, world)
    _init_distributed(dist_backend)
    if world is None:
        validate_for_world(sp_cfg, ds, dist.get_world_size())
    # DeepSpeed builds its own (data, sequence) mesh when it sees data_parallel_size next to
    # sequence_parallel_size; our mpu is the grid, so only the checked value may be dropped.
    ds.pop("data_parallel_size", None)

    sp_cfg = _resolve_auto(sp_cfg, ds, model, seq_len)
    groups = sp_groups.initialize(sp_cfg.sp_size, ulysses_size=sp_cfg.ulysses_size)
    if patch_model:
        from .hf import patch

        patch(model, sp_cfg, groups)
    elif sp_cfg.activation_offload or sp_cfg.tiled_mlp:  # not silently ignored without patch()
        from .hf_reach import apply as apply_reach

        apply_reach(model, sp_cfg)
    mark_reduced_by(model, "deepspeed", groups)  # its mpu sums over SP: no second sum, no check
    if args is not None:  # the config is passed resolved; DeepSpeed refuses both
        args = copy.copy(args)
        for name in ("deepspeed_config", "deepscale_config"):
            if getattr(args, name, None) is not None:
                setattr(args, name, None)
        if shared_gpu_device() is not None and getattr(args, "local_rank", -1) not in (None, -1):
            args.local_rank = int(os.environ["LOCAL_RANK"])  # DeepSpeed checks it against env
    if _zero_stage(ds) == 3:
        prepare_model_for_zero3(model, ds, groups)
    out = _deepspeed_initialize(
        args=args,
        model=model,
        optimizer=optimizer,
        model_parameters=model_parameters,
        training_data=training_data,
        lr_scheduler=lr_scheduler,
        mpu=groups,
        config=ds,
        **kwargs,
    )
    engine = out[0]
    _check_engine(engine, sp_cfg, groups)
    engine.seqpar_config = sp_cfg
    engine.seqpar_groups = groups
    return out


def _resolve_auto(cfg: SeqParConfig, ds: dict[str, Any], model: nn.Module,
                  seq_len: int | None) -> SeqParConfig:
    """Resolve ulysses_size='auto' (planner) and record the choice in the DeepSpeed dict."""
    from seqpar_ring.tools.plan import resolve_ulysses_size

    resolved = resolve_ulysses_size(cfg, model, seq_len)
    if resolved is not cfg:
        logger.info("ulysses_size='auto' -> %d for %s tokens", resolved.ulysses_size, seq_len)
        ds[SECTION] = {**ds.get(SECTION, {}), "ulysses_size": resolved.ulysses_size}
    return resolved


def _deepspeed_initialize(**kwargs: Any) -> tuple:
    import deepspeed

    return tuple(deepspeed.initialize(**kwargs))


def _check_engine(engine: Any, cfg: SeqParConfig, groups: SPGroups) -> None:
    """DeepSpeed must see dp = world / sp and reduce over every replica (guards API drift)."""
    got = (engine.dp_world_size, engine.seq_dp_world_size)
    want = (groups.dp_size, groups.sp_size * groups.dp_size)
    if got != want:
        raise RuntimeError(
            f"DeepSpeed took (dp, sp*dp) = {got} from the mpu, expected {want} for {groups}: "
            "this DeepSpeed version reads the mpu differently; please report it"
        )
    logger.info("DeepSpeed engine with %s, %s", groups, cfg)
