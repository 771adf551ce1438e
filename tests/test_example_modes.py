"""Every CPU mode the examples' READMEs name, a few steps each: the Trainer example in its
default (DDP) mode, finetune.py under torchrun on your own --data, and train_deepspeed.py under
torchrun. (finetune.py's spawn mode and the Trainer's DeepSpeed mode: test_examples.py.)
Output goes to a pipe, as in a log file: no progress-bar carriage returns may reach it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIMIT_S = 300  # ~60 s alone on 2 cores; twice as slow and busy still passes

pytest.importorskip("deepspeed")
pytest.importorskip("transformers")


def _run(argv: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=LIMIT_S)
    assert proc.returncode == 0, f"{argv} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    assert "\r" not in proc.stdout + proc.stderr, "a progress bar wrote into a log"
    return proc


def _torchrun(script: str, *args: str) -> subprocess.CompletedProcess:
    return _run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                 "--nproc_per_node", "2", os.path.join("examples", script), *args])


def test_trainer_example_default_mode_ddp(tmp_path):
    # The Trainer scales the loss in place (average_tokens_across_devices): the gradient guard
    # must leave the loss a plain tensor (it crashed with "is a view and is being modified").
    out = tmp_path / "trainer"
    proc = _run([sys.executable, os.path.join("examples", "finetune_trainer.py"), "--steps",
                 "20", "--seq-len", "64", "--batch-size", "2", "--eval-per-depth", "1",
                 "--out", str(out)])
    assert "passkey_accuracy" in proc.stdout and f"outputs in {out}/" in proc.stdout
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in recs if "loss" in r]
    assert len(losses) == 2 and all(x == x and x > 0 for x in losses), losses
    assert any("eval" in r for r in recs)


def test_finetune_under_torchrun_on_your_own_data(tmp_path):
    data = tmp_path / "docs.jsonl"
    docs = [{"text": f"document {i}: " + "words and more words. " * (3 + i % 5)}
            for i in range(40)]
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    out = tmp_path / "own"
    proc = _torchrun("finetune.py", "--data", str(data), "--seq-len", "128", "--batch-size",
                     "2", "--steps", "6", "--log-every", "2", "--save-every", "0",
                     "--out", str(out))
    assert f"outputs in {out}/" in proc.stdout
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if "eval" not in r]
    assert [r["step"] for r in train] == list(range(1, 7))
    assert all(r["seq_len"] == 128 and r["loss"] > 0 for r in train)
    assert json.loads((out / "args.json").read_text())["seqpar"]["sp_size"] == 2


def test_train_deepspeed_under_torchrun():
    proc = _torchrun("train_deepspeed.py", "--deepspeed", "--deepspeed_config",
                     os.path.join("configs", "cpu_gloo.json"), "--steps", "3", "--seq-len", "64")
    steps = [line for line in proc.stdout.splitlines() if line.startswith("step ")]
    assert len(steps) == 3 and all("loss" in s for s in steps), proc.stdout[-2000:]
