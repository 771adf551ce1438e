"""Plot a fine-tuning run: ``python -m seqpar_ring.plot <run dir>`` (needs the ``plot`` extra).

Reads ``<run dir>/metrics.jsonl`` as written by ``examples/finetune.py`` (one JSON object per
line: training records ``{"step", "loss", "seq_len", "tokens_per_s", ...}`` and evaluation
records ``{"step", "eval": {"accuracy", "by_depth": {depth: accuracy}}}``) and writes
``loss.png`` and, when the run was evaluated, ``passkey_accuracy.png`` (accuracy by needle
depth at every row length evaluated at the last step) into the run dir.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

__all__ = ["read_metrics", "plot_run"]


def read_metrics(run_dir: str) -> tuple[list[dict], list[dict]]:
    """(training records, evaluation records) of ``<run_dir>/metrics.jsonl``, in file order."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise ValueError(f"{path} does not exist: pass the --out dir of examples/finetune.py")
    train, evals = [], []
    with open(path) as f:
        for line in f:
            if line.strip():
                rec = json.loads(line)
                (evals if "eval" in rec else train).append(rec)
    return train, evals


def _smooth(values: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):  # trailing mean: noise of few-token losses is large
        acc += v - (values[i - window] if i >= window else 0.0)
        out.append(acc / min(i + 1, window))
    return out


def plot_run(run_dir: str) -> list[str]:
    """Draw the PNGs of one run; returns their paths."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display needed
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise RuntimeError("plotting needs matplotlib: pip install 'seqpar_ring[plot]'") from err
    train, evals = read_metrics(run_dir)
    if not train:
        raise ValueError(f"{run_dir}/metrics.jsonl has no training records to plot")
    written = []

    fig = loss_figure(plt, run_dir, train)
    written.append(os.path.join(run_dir, "loss.png"))
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)

    if evals:
        written.append(_plot_accuracy(plt, run_dir, evals))
    return written


def loss_figure(plt, run_dir: str, train: list[dict]):
    """Loss (raw and smoothed, log scale) by step, with the row length on a second axis; the
    legend sits below the axes, outside every line."""
    steps = [r["step"] for r in train]
    losses = [r["loss"] for r in train]
    fig, ax = plt.subplots(figsize=(7, 4.4), layout="constrained")
    lines = ax.plot(steps, losses, alpha=0.3, color="C0", label="loss")
    lines += ax.plot(steps, _smooth(losses, max(1, len(losses) // 50)), color="C0",
                     label="smoothed")
    ax.set(xlabel="step", ylabel="loss", title=f"training loss: {os.path.basename(run_dir)}")
    ax.set_yscale("log")
    if any("seq_len" in r for r in train):
        right = ax.twinx()  # the curriculum explains jumps in the loss
        lines += right.plot(steps, [r.get("seq_len", 0) for r in train], color="C1", lw=1,
                            label="tokens per row (right axis)")
        right.set_ylabel("tokens per row", color="C1")
    fig.legend(handles=lines, loc="outside lower center", ncols=len(lines), fontsize=8)
    return fig


def _plot_accuracy(plt, run_dir: str, evals: list[dict]) -> str:
    """Accuracy by needle depth of the last step's evaluations, one bar group per row length
    (a run evaluated at several lengths shows its length generalisation side by side)."""
    step = evals[-1]["step"]
    last = [e["eval"] for e in evals if e["step"] == step]
    depths = list(last[-1]["by_depth"])
    fig, ax = plt.subplots(figsize=(min(10, max(6, 0.3 * len(depths) * len(last))), 4))
    width = 0.8 / len(last)
    for i, ev in enumerate(last):
        label = (f"{ev['seq_len']:,} tokens: {ev['accuracy']:.2f}" if "seq_len" in ev
                 else f"overall {ev['accuracy']:.2f}")
        xs = [j + (i - (len(last) - 1) / 2) * width for j in range(len(depths))]
        ax.bar(xs, [ev["by_depth"].get(d, 0.0) for d in depths], width, label=label,
               color=f"C{2 + i}")
    ax.set_xticks(range(len(depths)), [f"{float(d):.0%}" for d in depths])
    ax.set(xlabel="needle depth in the row", ylabel="passkey accuracy", ylim=(0, 1.05),
           title=f"passkey accuracy at step {step}: {os.path.basename(run_dir)}")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path = os.path.join(run_dir, "passkey_accuracy.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m seqpar_ring.plot", description=__doc__)
    parser.add_argument("run_dir", help="the --out dir of examples/finetune.py")
    args = parser.parse_args(argv)
    try:
        paths = plot_run(args.run_dir)
    except (ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for p in paths:
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
