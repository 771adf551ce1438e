"""Benchmarks: ``python -m seqpar_ring.bench {ring,dilated,e2e,packed,window} --help``.

Each prints a table, writes JSON and measures its reference in the same run. Launch multi-GPU
runs with torchrun (``torchrun --nproc_per_node 2 -m seqpar_ring.bench ring``).
"""

from __future__ import annotations

import argparse
import importlib
import sys

# sub-command -> (module of this package, one line for --help); modules load only when run
COMMANDS = {
    "ring": ("ring", "ring attention kernel: per-GPU TFLOP/s vs one-GPU SDPA and torch "
                     "context_parallel"),
    "dilated": ("dilated", "dilated (LongNet) attention: time vs the dense ring and the FLOP "
                           "ratio; torch-kernel memory vs bucket size"),
    "e2e": ("e2e", "end-to-end training (HF Llama shape, DeepSpeed ZeRO): tokens/s and peak "
                   "memory, ours vs DeepSpeed ALST"),
    "packed": ("packed", "padded and packed rows: attention vs FlexAttention, end to end vs "
                         "transformers' sdpa and flex_attention"),
    "window": ("window", "sliding-window attention vs FlexAttention and our dense ring; 1.1B "
                         "Mistral end to end vs transformers' flex_attention and sdpa"),
}


def build_parser() -> argparse.ArgumentParser:
    lines = "\n".join(f"  {name:<8} {text}" for name, (_, text) in COMMANDS.items())
    p = argparse.ArgumentParser(
        prog="python -m seqpar_ring.bench", description=__doc__,
        epilog=f"sub-commands:\n{lines}\n\n`python -m seqpar_ring.bench <sub-command> --help` "
               "lists its options.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=sorted(COMMANDS), help="the benchmark to run")
    p.add_argument("options", nargs=argparse.REMAINDER, help="options of the sub-command")
    return p


def main(argv: list[str] | None = None) -> None:
    """Run the sub-command named by ``argv[0]`` with the rest of ``argv`` (default sys.argv)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in COMMANDS:
        module = importlib.import_module(f"{__name__}.{COMMANDS[argv[0]][0]}")
        module.main(argv[1:])
        return
    build_parser().parse_args(argv)  # --help: usage and exit 0; anything else: error, exit 2
    raise SystemExit(2)  # not reached: a valid command is dispatched above
