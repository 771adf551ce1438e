"""The ``"sequence_parallel"`` section of a DeepSpeed JSON, and the launcher flags over it.

```json
{
  "train_micro_batch_size_per_gpu": 1,
  "sequence_parallel_size": 4,
  "sequence_parallel": {"size": 4, "attention": "ring", "layout": "zigzag", "comm": "ring",
                        "ulysses_size": 1},
  "zero_optimization": {"stage": 3}
}
```

``sequence_parallel.size`` and DeepSpeed's own top-level ``sequence_parallel_size`` are the same
number: give either (the other is filled in) or both equal; a conflict is an error naming both.
DeepSpeed 0.19.8 ignores the unknown ``"sequence_parallel"`` key (checked by the tests), so the
same file also works where DeepSpeed reads it directly (accelerate, HF Trainer), and it is saved
with every checkpoint. Nothing here needs torch.distributed: it all runs before any collective.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
from dataclasses import fields
from typing import Any, Mapping

from seqpar_ring.config import SeqParConfig

__all__ = [
    "SECTION",
    "DS_SIZE_KEY",
    "load_ds_config",
    "split_config",
    "add_argparse_args",
    "overrides_from_args",
    "config_from_args",
    "validate_for_world",
]

SECTION = "sequence_parallel"
DS_SIZE_KEY = "sequence_parallel_size"  # DeepSpeed's own key (mesh / HF zero.Init world size)

def int_or_auto(text: str) -> int | str:
    """argparse type of --ulysses-size: a positive integer or 'auto'."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither an integer nor 'auto'") from None


# flag -> SeqParConfig field; the JSON section uses the same names except "size" for sp_size.
# Names are chosen so that no flag is a prefix of another (argparse accepts prefixes).
_FLAGS: dict[str, tuple[str, Any, str]] = {
    "--sequence-parallel-size": ("sp_size", int, "ranks that share one sample's tokens"),
    "--sequence-parallel-attention": ("attention", str, "ring | dilated"),
    "--sequence-parallel-layout": ("layout", str, "contiguous | zigzag"),
    "--sequence-parallel-comm": ("comm", str, "ring | allgather"),
    "--segment-lengths": ("segment_lengths", int, "dilated: segment lengths, e.g. 2048 4096"),
    "--dilation-rates": ("dilation_rates", int, "dilated: one rate per segment, e.g. 1 2"),
    "--sequence-parallel-bucket-size": ("bucket_size", int, "torch kernel tile in tokens"),
    "--sequence-parallel-kernel": ("kernel", str, "auto | torch | cudnn | flash"),
    "--ulysses-size": ("ulysses_size", int_or_auto,
                       "Ulysses x ring: all-to-all factor u of the SP size (p = u x r), or auto"),
    # booleans: --X / --no-X. Named with the common prefix, so a short form such as
    # "--offload" or "--tiled" is never taken by argparse's prefix matching for these flags
    "--sequence-parallel-activation-offload": (
        "activation_offload", bool, "checkpointed layer inputs in pinned host memory"),
    "--sequence-parallel-tiled-mlp": ("tiled_mlp", bool, "decoder MLPs over sequence tiles"),
    "--sequence-parallel-recompute-attention": (
        "recompute_attention", bool, "attention again in backward under checkpointing"),
}
_LIST_FIELDS = ("segment_lengths", "dilation_rates")
_LAUNCHER_FLAGS = ("--local_rank", "--local-rank")  # deepspeed / torch.distributed.launch


def _dest(field: str) -> str:
    """argparse dest of a field's flag: ``sp_<field>``, ``sp_size`` as is."""
    return field if field == "sp_size" else f"sp_{field}"


def load_ds_config(config: str | os.PathLike | Mapping[str, Any] | None) -> dict[str, Any]:
    """A private deep copy of a DeepSpeed config given as a dict or a JSON file path."""
    if config is None:
        raise ValueError(
            "no DeepSpeed config: pass config=<dict or path> or --deepspeed_config <path>"
        )
    if isinstance(config, Mapping):
        return copy.deepcopy(dict(config))
    path = os.fspath(config)
    if not os.path.isfile(path):
        raise ValueError(f"DeepSpeed config {path!r} is not a file: pass a dict or a JSON path")
    with open(path) as f:
        return json.load(f)


def split_config(
    ds_config: str | os.PathLike | Mapping[str, Any] | None,
    overrides: Mapping[str, Any] | None = None,
) -> tuple[SeqParConfig, dict[str, Any]]:
    """Read the SP section (``overrides``: SeqParConfig fields from flags, they win).

    Returns the validated `SeqParConfig` and a copy of the DeepSpeed dict in which
    ``sequence_parallel.size`` and ``sequence_parallel_size`` both hold the final SP size.
    """
    ds = load_ds_config(ds_config)
    section = ds.get(SECTION, {})
    if not isinstance(section, Mapping):
        raise ValueError(
            f"{SECTION} must be a JSON object of settings, got {section!r}: write e.g. "
            f'"{SECTION}": {{"size": 2}} (remove the section, or use size 1, for no sequence '
            "parallelism)")
    section = dict(section)
    if "sp_size" in section:
        raise ValueError(
            f"{SECTION}.sp_size is not a key of the JSON section: write {SECTION}.size"
        )
    unknown = sorted(set(section) - set(section_fields()))
    if unknown:
        raise ValueError(
            f"{SECTION} has unknown key(s) {unknown}; valid keys are {section_fields()}"
        )
    for key, value in section.items():
        if value is None:
            raise ValueError(f"{SECTION}.{key} is null: give a value or remove the key for its "
                             "default")
    size = section.pop("size", None)
    top = ds.get(DS_SIZE_KEY)
    if size is not None and top is not None and size != top:
        raise ValueError(
            f"{SECTION}.size={size!r} conflicts with {DS_SIZE_KEY}={top!r}: they are the same "
            "setting, make them equal or remove one"
        )
    size = size if size is not None else top
    values = {"sp_size": size if size is not None else 1, **section}
    for key, value in (overrides or {}).items():
        if value is not None:
            values[key] = value
    cfg = SeqParConfig.from_dict(values)
    rest = {k: v for k, v in cfg.to_dict().items() if k != "sp_size"}
    ds[SECTION] = {"size": cfg.sp_size, **rest}
    ds[DS_SIZE_KEY] = cfg.sp_size
    return cfg, ds


def add_argparse_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``--sequence-parallel-*`` flags (a group, like deepspeed.add_config_arguments).

    Every flag defaults to None = "take the JSON value"; a given flag overrides the JSON.
    Also accepts what launchers append to the script's arguments: ``--local_rank=N`` (the
    ``deepspeed`` launcher) and ``--local-rank=N`` (``torch.distributed.launch``), as
    ``args.local_rank`` (default -1), unless the parser already defines them.
    """
    group = parser.add_argument_group("sequence parallel (seqpar_ring)")
    for flag, (dest, typ, text) in _FLAGS.items():
        name = _dest(dest)
        if typ is bool:
            group.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction,
                               default=None, help=f"{text} (overrides {SECTION}.*)")
            continue
        nargs = "+" if dest in _LIST_FIELDS else None
        group.add_argument(flag, dest=name, type=typ, nargs=nargs, default=None,
                           help=f"{text} (overrides {SECTION}.*)")
    taken = set(parser._option_string_actions)  # argparse has no public lookup of options
    missing = [flag for flag in _LAUNCHER_FLAGS if flag not in taken]
    if missing:
        group.add_argument(*missing, dest="local_rank", type=int, default=-1,
                           help="set by the launcher (this process's rank on its node)")
    return parser


def overrides_from_args(args: argparse.Namespace | None) -> dict[str, Any]:
    """The SeqParConfig fields set on the command line (flags left out are absent)."""
    if args is None:
        return {}
    out = {}
    for dest, _, _ in _FLAGS.values():
        value = getattr(args, _dest(dest), None)
        if value is not None:
            out[dest] = value
    return out


def config_from_args(
    args: argparse.Namespace | None, ds_config: str | os.PathLike | Mapping[str, Any] | None = None
) -> tuple[SeqParConfig, dict[str, Any]]:
    """`split_config` of ``ds_config`` (default ``args.deepspeed_config``), flags applied."""
    if ds_config is None:
        ds_config = getattr(args, "deepspeed_config", None)
    return split_config(ds_config, overrides_from_args(args))


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def refuse_auto(ds: Mapping[str, Any]) -> None:
    """Batch keys given as "auto": only the HF Trainer / accelerate fill those, and under SP they
    would count the SP ranks as data-parallel replicas. Raise naming the key."""
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu",
                "gradient_accumulation_steps"):
        if ds.get(key) == "auto":
            raise ValueError(
                f'{key}="auto" in the DeepSpeed config: "auto" is filled in by the HF Trainer / '
                "accelerate only, and under sequence parallelism they would count the SP ranks "
                f"as data-parallel replicas. Give {key} as a number (DeepSpeed's data-parallel "
                f"size is world_size / {DS_SIZE_KEY})"
            )


def validate_for_world(cfg: SeqParConfig, ds: Mapping[str, Any], world_size: int) -> None:
    """Check the settings against the world size; raise ValueError naming the key.

    DeepSpeed's batch arithmetic counts DATA-parallel ranks only:
    ``train_batch_size = train_micro_batch_size_per_gpu * gradient_accumulation_steps * dp``
    with ``dp = world_size / sp_size`` (the ranks of one SP group share one micro batch).
    """
    sp = cfg.sp_size
    if world_size % sp:
        raise ValueError(
            f"{SECTION}.size ({DS_SIZE_KEY}) = {sp} does not divide world_size({world_size}): "
            f"choose one of {_divisors(world_size)}"
        )
    dp = world_size // sp
    given_dp = ds.get("data_parallel_size")
    if given_dp is not None and given_dp != dp:
        raise ValueError(
            f"data_parallel_size={given_dp} but world_size({world_size}) / {DS_SIZE_KEY}({sp}) "
            f"= {dp}: remove data_parallel_size or set it to {dp}"
        )
    tb = ds.get("train_batch_size")
    mb = ds.get("train_micro_batch_size_per_gpu")
    ga = ds.get("gradient_accumulation_steps")
    if isinstance(tb, int) and isinstance(mb, int) and isinstance(ga, int) and tb != mb * ga * dp:
        raise ValueError(
            f"train_batch_size={tb} != train_micro_batch_size_per_gpu({mb}) * "
            f"gradient_accumulation_steps({ga}) * dp({dp}), where dp = world_size({world_size}) / "
            f"{DS_SIZE_KEY}({sp}): set train_batch_size to {mb * ga * dp} or drop it"
        )
    if isinstance(tb, int) and isinstance(mb, int) and ga is None and tb % (mb * dp):
        raise ValueError(
            f"train_batch_size={tb} is not a multiple of train_micro_batch_size_per_gpu({mb}) * "
            f"dp({dp}) (dp = world_size / {DS_SIZE_KEY}); choose a multiple of {mb * dp}"
        )
    zero = ds.get("zero_optimization") or {}
    if sp > 1 and zero.get("stage") == 3 and zero.get("reduce_scatter") is False:
        raise ValueError(
            "zero_optimization.reduce_scatter=false with ZeRO-3 and sequence parallelism: "
            "DeepSpeed 0.19.8 then scales gradients differently per bucket (its all-reduce path "
            "divides by dp, its reduce-scatter path by sp*dp), so no single correction is right. "
            "Remove reduce_scatter (default true)"
        )


def section_fields() -> list[str]:
    """The keys the JSON section accepts (``size`` stands for SeqParConfig.sp_size)."""
    return ["size"] + [f.name for f in fields(SeqParConfig) if f.name != "sp_size"]
