"""Checks of the examples' command lines, run in the launching process before any process is
spawned or any model or engine is built: a bad value fails in about a second, with one line
that names the flag and the fix, instead of after process start-up under a spawn traceback.

Used by finetune.py, finetune_trainer.py and train_deepspeed.py.
"""

from __future__ import annotations

import os
from typing import NoReturn

from seqpar_ring.config import SeqParConfig


def fail(message: str) -> NoReturn:
    """Stop with ``error: message`` on stderr and exit status 1 (argparse's style)."""
    raise SystemExit(f"error: {message}")


def at_least(values: dict[str, tuple[int | float | None, int]]) -> None:
    """``{flag: (value, minimum)}``: every given value must be >= its minimum (None: unset)."""
    for flag, (value, low) in values.items():
        if value is not None and value < low:
            what = "a positive number" if low == 1 else f">= {low}"
            fail(f"{flag} {value} must be {what}")


def world_size(nproc: int) -> tuple[int, str]:
    """How many processes the run will have, and where that number comes from (for errors):
    the launcher's ``WORLD_SIZE``, else the processes the script spawns itself."""
    if "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"]), "WORLD_SIZE, set by the launcher"
    return nproc, f"--nproc {nproc}"


def sp_config(args, ds_config) -> tuple[SeqParConfig, dict]:
    """The SP settings of the DeepSpeed JSON (a path or dict) with the flags applied."""
    from seqpar_ring.integrations.ds_config import config_from_args

    try:
        return config_from_args(args, ds_config)
    except ValueError as e:
        fail(str(e))


def check_world(cfg: SeqParConfig, world: int, source: str, ds: dict | None = None,
                flag: str = "--sequence-parallel-size") -> None:
    """The SP size (set by ``flag``) must divide the number of processes; with ``ds``,
    DeepSpeed's batch keys must agree with world / sp."""
    if cfg.sp_size > world or world % cfg.sp_size:
        ok = [d for d in range(1, world + 1) if world % d == 0]
        fail(f"{flag} {cfg.sp_size} does not divide the {world} processes "
             f"({source}): choose one of {ok}, or run a multiple of {cfg.sp_size} processes")
    if ds is not None:
        from seqpar_ring.integrations.ds_config import validate_for_world

        try:
            validate_for_world(cfg, ds, world)
        except ValueError as e:
            fail(str(e))


def check_row_len(flag: str, n: int, cfg: SeqParConfig) -> None:
    """A row length must be a positive multiple of the layout's divisor."""
    d = cfg.seq_len_divisor
    if n < 1 or n % d:
        why = f"{cfg.sp_size} SP ranks" + (" x 2 for the zigzag layout" if cfg.layout == "zigzag"
                                          else "")
        if cfg.seq_len_divisor != cfg.sp_size * (2 if cfg.layout == "zigzag" else 1):
            why += " x lcm(dilation_rates)"
        fail(f"{flag} {n} must be a positive multiple of {d} ({why}): use "
             f"{max(d, -(-n // d) * d)}")


def check_passkey_len(flag: str, n: int, need: int, hint: str = "") -> None:
    """Passkey rows must hold the needle and the question."""
    if n < need:
        fail(f"{flag}: rows of {n} tokens cannot hold a passkey row, which needs at least "
             f"{need}{hint}")
