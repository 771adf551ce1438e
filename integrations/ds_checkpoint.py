"""DeepSpeed checkpoints that remember their sequence-parallel settings.

`save_checkpoint` calls ``engine.save_checkpoint`` with the SP settings added to
``client_state`` (key ``"seqpar_ring"``) and writes them to ``<dir>/<tag>/seqpar_ring.json`` too,
so `load_checkpoint` can check them BEFORE DeepSpeed reads any tensor:

* same world size, other SP size: loads. Parameters are replicated over the SP ranks and ZeRO
  partitions them over all sp x dp ranks, so the files do not depend on the SP size; only the
  data-parallel size, and with it the global batch, changes (logged).
* other world size with ZeRO optimizer states: RuntimeError naming the ways out (same world
  size, ``load_optimizer_states=False``, or DeepSpeed's universal checkpoint).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import torch.distributed as dist

from seqpar_ring.config import SeqParConfig

__all__ = ["STATE_KEY", "SIDE_FILE", "sp_state", "save_checkpoint", "load_checkpoint"]

logger = logging.getLogger(__name__)

STATE_KEY = "seqpar_ring"
SIDE_FILE = "seqpar_ring.json"


def _sp(engine: Any) -> tuple[SeqParConfig, Any]:
    cfg = getattr(engine, "seqpar_config", None)
    groups = getattr(engine, "seqpar_groups", None)
    if cfg is None or groups is None:
        raise ValueError(
            "this engine was not made by seqpar_ring.integrations.deepspeed.initialize(): "
            "use it, or call engine.save_checkpoint / load_checkpoint directly"
        )
    return cfg, groups


def sp_state(engine: Any) -> dict[str, Any]:
    """The SP settings of a run, JSON-ready."""
    cfg, groups = _sp(engine)
    return {
        "sequence_parallel": cfg.to_dict(),
        "sp_size": groups.sp_size,
        "dp_size": groups.dp_size,
        "world_size": groups.sp_size * groups.dp_size,
        "zero_stage": int(engine.zero_optimization_stage()),
    }


def save_checkpoint(
    engine: Any, save_dir: str, tag: str | None = None, client_state: dict | None = None,
    **kwargs: Any,
) -> bool:
    """``engine.save_checkpoint`` plus the SP settings (call on every rank, like DeepSpeed's)."""
    state = sp_state(engine)
    client_state = {**(client_state or {}), STATE_KEY: state}
    if tag is None:  # DeepSpeed's own default, resolved here to know where the side file goes
        tag = f"global_step{engine.global_steps}"
    ok = engine.save_checkpoint(save_dir, tag=tag, client_state=client_state, **kwargs)
    if dist.get_rank() == 0:
        with open(os.path.join(save_dir, str(tag), SIDE_FILE), "w") as f:
            json.dump(state, f, indent=2)
    dist.barrier()  # the side file exists on every rank's return
    return ok


def _read_side(load_dir: str, tag: str | None) -> dict[str, Any] | None:
    if tag is None:
        latest = os.path.join(load_dir, "latest")
        if not os.path.isfile(latest):
            return None
        with open(latest) as f:
            tag = f.read().strip()
    path = os.path.join(load_dir, str(tag), SIDE_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def _check(saved: dict[str, Any], now: dict[str, Any], optimizer_states: bool) -> None:
    if saved["world_size"] != now["world_size"] and saved["zero_stage"] > 0 and optimizer_states:
        raise RuntimeError(
            f"the checkpoint was saved on world_size {saved['world_size']} (sp {saved['sp_size']} "
            f"x dp {saved['dp_size']}, ZeRO-{saved['zero_stage']}) and this run has "
            f"world_size {now['world_size']} (sp {now['sp_size']} x dp {now['dp_size']}): ZeRO "
            "partitions the optimizer state over all sp x dp ranks, so keep world_size "
            f"{saved['world_size']} (any sequence_parallel.size dividing it works), pass "
            "load_optimizer_states=False, or convert it with DeepSpeed's universal checkpoint"
        )
    if saved["sp_size"] != now["sp_size"]:
        logger.warning(
            "resuming a checkpoint saved with sequence_parallel.size=%d (dp %d) under size %d "
            "(dp %d): parameters are replicated over SP ranks so they load unchanged, but the "
            "global batch is now micro * grad_acc * %d",
            saved["sp_size"], saved["dp_size"], now["sp_size"], now["dp_size"], now["dp_size"],
        )
    a, b = saved["sequence_parallel"]["attention"], now["sequence_parallel"]["attention"]
    if a != b:
        logger.warning("checkpoint trained with attention=%r, resumed with %r", a, b)


def load_checkpoint(
    engine: Any, load_dir: str, tag: str | None = None, **kwargs: Any
) -> tuple[str | None, dict | None]:
    """``engine.load_checkpoint`` after checking the saved SP settings against this run."""
    now = sp_state(engine)
    optimizer_states = kwargs.get("load_optimizer_states", True) and not kwargs.get(
        "load_module_only", False
    )
    saved = _read_side(load_dir, tag)
    if saved is not None:
        _check(saved, now, optimizer_states)
    path, client_state = engine.load_checkpoint(load_dir, tag=tag, **kwargs)
    if saved is None and client_state and STATE_KEY in client_state:
        _check(client_state[STATE_KEY], now, optimizer_states)  # after the fact, still says why
    return path, client_state
