"""The fine-tuning example end to end on CPU: 2 gloo ranks, SP = 2, a few steps of the passkey
task through DeepSpeed; it must train (loss falls), write checkpoints and metrics, evaluate,
and `python -m seqpar_ring.plot` must turn the run into PNGs. Also the data helpers."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))
import passkey  # noqa: E402


def test_passkey_rows_hide_the_key_once_and_label_only_the_answer():
    for depth in (0.0, 0.37, 1.0):
        row = passkey.passkey_sample(96, 4, depth, random.Random(3))
        ids, labels = row["input_ids"], row["labels"]
        assert ids.shape == labels.shape == (96,) and ids[0] == passkey.BOS
        answer = labels[labels != passkey.IGNORE]
        assert passkey.decode(answer.tolist()) == row["passkey"]
        text = passkey.decode(ids.tolist())
        assert text.endswith("?" + "".join(s + d for s, d in zip("ABCD", row["passkey"])))
        needle = "k" + "".join(f"[{s}{d}]" for s, d in zip("ABCD", row["passkey"]))
        assert text.count(needle) == 1
        before = text.index(needle) - 1  # filler tokens before the needle (after "^")
        assert before == round(depth * (96 - 1 - 5 - 9))
    with pytest.raises(ValueError, match="too short"):
        passkey.passkey_sample(12, 4, 0.5, random.Random(0))


class _CharTokenizer:
    """A stand-in for a real tokenizer: one token per character, BOS 1."""

    bos_token_id = 1

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": [ord(c) for c in text]}


def test_text_passkey_for_real_tokenizers():
    ds = passkey.TextPasskeyDataset(_CharTokenizer(), 3, 400, digits=5, depths=[0.0, 0.5, 1.0])
    for i in range(3):
        row = ds[i]
        ids, labels = row["input_ids"], row["labels"]
        assert ids.shape == labels.shape == (400,) and ids[0] == 1
        answer = "".join(chr(t) for t in labels[labels != passkey.IGNORE].tolist())
        text = "".join(chr(t) for t in ids[1:].tolist())
        assert answer.startswith(" ") and len(answer) == 6
        assert f"The pass key is{answer}. Remember it." in text
        assert text.endswith(f"What is the pass key? The pass key is{answer}")


def test_packed_rows_restart_positions_per_document():
    docs = [[1, 5, 6], [1, 7, 8, 9, 10], [1, 11]]
    ds = passkey.PackedDataset(docs, 4)  # 10 tokens -> 2 rows of 4, the rest dropped
    assert len(ds) == 2
    assert ds[0]["input_ids"].tolist() == [1, 5, 6, 1]
    assert ds[0]["position_ids"].tolist() == [0, 1, 2, 0]
    assert ds[1]["input_ids"].tolist() == [7, 8, 9, 10]
    assert ds[1]["position_ids"].tolist() == [0, 1, 2, 3]  # a continued document restarts
    assert torch.equal(ds[1]["labels"], ds[1]["input_ids"])


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def test_finetune_end_to_end_and_plot(tmp_path):
    pytest.importorskip("deepspeed")
    pytest.importorskip("transformers")
    out = tmp_path / "run"
    proc = _run([os.path.join("examples", "finetune.py"), "--out", str(out), "--steps", "40",
                 "--seq-len", "128", "--batch-size", "4", "--curriculum", "0", "--warmup", "5",
                 "--save-every", "20", "--eval-per-depth", "2", "--log-every", "10"], 85)
    assert "passkey accuracy by needle depth" in proc.stdout
    # it says where its outputs are and how to plot them
    assert f"outputs in {out}/" in proc.stdout and "latest global_step40" in proc.stdout
    assert f"plot: python -m seqpar_ring.plot {out}" in proc.stdout

    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if "eval" not in r]
    assert [r["step"] for r in train] == list(range(1, 41))
    assert all(r["seq_len"] == 128 and r["tokens_per_s"] > 0 for r in train)
    first, last = (sum(r["loss"] for r in part) / 5 for part in (train[:5], train[-5:]))
    assert last < first - 0.5, f"loss did not fall: {first:.3f} -> {last:.3f}"
    evals = [r["eval"] for r in recs if "eval" in r]
    assert len(evals) == 1 and set(evals[0]["by_depth"]) == {"0", "0.25", "0.5", "0.75", "1"}
    assert 0.0 <= evals[0]["accuracy"] <= 1.0

    ckpt = out / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "global_step40"
    for tag in ("global_step20", "global_step40"):
        assert any((ckpt / tag).glob("*model_states.pt")), f"no model states in {tag}"
    assert json.loads((ckpt / "global_step40" / "seqpar_ring.json").read_text())["sp_size"] == 2
    assert json.loads((out / "args.json").read_text())["seqpar"]["layout"] == "zigzag"

    pytest.importorskip("matplotlib")
    plot = _run(["-m", "seqpar_ring.plot", str(out)], 60)
    for name in ("loss.png", "passkey_accuracy.png"):
        png = out / name
        assert str(png) in plot.stdout and png.read_bytes()[:4] == b"\x89PNG"


def test_trainer_with_deepspeed_config_trains(tmp_path):
    """finetune_trainer.py through transformers.Trainer + DeepSpeed (the JSON's SP section)."""
    pytest.importorskip("deepspeed")
    pytest.importorskip("accelerate")
    out = tmp_path / "trainer"
    proc = _run([os.path.join("examples", "finetune_trainer.py"), "--deepspeed_config",
                 os.path.join("configs", "cpu_gloo.json"), "--steps", "30", "--out", str(out),
                 "--eval-per-depth", "2"], 240)
    assert "passkey_accuracy" in proc.stdout
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in recs if "loss" in r]
    assert len(losses) >= 3 and losses[-1] < losses[0] - 0.5, losses
    assert any("eval" in r for r in recs)


def test_plot_names_a_missing_run(tmp_path):
    from seqpar_ring.tools.plot import main

    assert main([str(tmp_path)]) == 1


def test_trainer_help_shows_defaults(capsys):
    import finetune_trainer

    with pytest.raises(SystemExit) as exit_:
        finetune_trainer.parse_args(["--help"])
    assert exit_.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for text in ("(default: 800)", "(default: runs/passkey_trainer)", "(default: 256)"):
        assert text in out, text
