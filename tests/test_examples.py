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
# A run takes 30-60 s alone on 2 cores and up to 85 s on a busy one (measured): twice that and
# more. DeepSpeed's CPU op is built before the session (conftest.py), never inside this limit.
LIMIT_S = 300
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


def test_passkey_batch_rows_have_the_layout_of_passkey_sample():
    depths = [0.0, 0.37, 0.5, 1.0]
    b = passkey.passkey_batch(4, 96, 4, seed=5, depths=depths)
    ids, labels = b["input_ids"], b["labels"]
    assert ids.shape == labels.shape == (4, 96) and b["depth"].tolist() == depths
    assert torch.equal(b["input_ids"], passkey.passkey_batch(4, 96, 4, 5, depths)["input_ids"])
    for row, lab, depth in zip(ids, labels, depths):
        assert row[0] == passkey.BOS
        text = passkey.decode(row.tolist())
        answer = passkey.decode(lab[lab != passkey.IGNORE].tolist())
        assert len(answer) == 4 and answer.isdigit()
        assert text.endswith("?" + "".join(s + d for s, d in zip("ABCD", answer)))
        needle = "k" + "".join(f"[{s}{d}]" for s, d in zip("ABCD", answer))
        assert text.count(needle) == 1 and text.count("k") == 1
        before = text.index(needle) - 1
        assert before == round(depth * (96 - 1 - 5 - 9))  # where passkey_sample puts it
        filler = text[1:1 + before] + text[1 + before + len(needle):text.index("?")]
        assert len(filler) == 96 - 1 - 5 - 9 and set(filler) <= set(passkey.FILLER)
        assert (lab != passkey.IGNORE).nonzero().flatten().tolist() == [89, 91, 93, 95]
    free = passkey.passkey_batch(64, 64, 4, seed=1)["depth"]  # uniform depths without depths
    assert 0.0 <= free.min() < 0.2 and 0.8 < free.max() <= 1.0
    with pytest.raises(ValueError, match="too short"):
        passkey.passkey_batch(1, 15, 4)


def test_finetune_presets_and_stages_resolve_before_any_process_starts():
    import finetune
    import recipes

    cpu = finetune.parse_args([])  # the CPU main job keeps its settings
    assert (cpu.seq_len, cpu.batch_size, cpu.steps, cpu.warmup, cpu.lr) == (1024, 8, 600, 30, None)
    assert cpu.stage_list is None and cpu.eval_len_list == [1024] and not cpu.fast_data
    assert cpu.depth_list == finetune.DEPTHS and cpu.deepspeed_config is None
    plan = recipes.step_plan(cpu, 4)
    assert [n for n, _ in plan] == [finetune_row_len(cpu, s) for s in range(600)]
    assert plan[0] == (128, 8) and plan[-1] == (1024, 8)

    gpu = finetune.parse_args(["--preset", "h200"])
    assert gpu.stage_list[0] == (128, 64, 200) and gpu.stage_list[-1] == (32768, 8, 400)
    assert gpu.steps == sum(s[2] for s in gpu.stage_list) and gpu.seq_len == 32768
    assert gpu.eval_len_list == [32768, 65536, 131072] and gpu.eval_batch_size == 1
    assert gpu.rope_theta == 1e8 and gpu.fast_data and gpu.preflight and gpu.max_train_s > 0
    assert len(gpu.depth_list) == 11 and gpu.depth_list[0] == 0.0 and gpu.depth_list[-1] == 1.0
    assert finetune.parse_args(["--preset", "h200", "--lr", "1e-3"]).lr == 1e-3  # flags win
    ds = recipes.preset_ds_config(gpu)
    assert ds["optimizer"]["params"]["torch_adam"] is True and "scheduler" not in ds
    assert ds["bf16"]["enabled"] and ds["zero_optimization"]["stage"] == 2

    with pytest.raises(SystemExit, match="--steps 10 and --stages"):
        finetune.parse_args(["--preset", "h200", "--steps", "10"])
    with pytest.raises(SystemExit, match="LENxROWS:STEPS"):
        finetune.parse_args(["--stages", "128x4"])
    with pytest.raises(SystemExit, match=">= 1"):
        finetune.parse_args(["--stages", "128x0:5"])
    with pytest.raises(SystemExit, match="in \\[0, 1\\]"):
        finetune.parse_args(["--depths", "0,1.5"])
    with pytest.raises(SystemExit, match="not multiples of 4"):
        recipes.step_plan(finetune.parse_args(["--stages", "130x4:2"]), 4)


def finetune_row_len(args, step: int) -> int:
    """The CPU job's curriculum as it always was: /8, /4, /2 of --seq-len, then the full row."""
    if step >= 0.75 * args.steps:
        return args.seq_len
    frac = step / (0.75 * args.steps)
    return args.seq_len // (8 if frac < 0.5 else 4 if frac < 0.75 else 2)


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
                 "--save-every", "20", "--eval-per-depth", "2", "--log-every", "10"], LIMIT_S)
    assert "passkey accuracy by needle depth" in proc.stdout
    assert "\r" not in proc.stdout + proc.stderr  # not a terminal: log lines, no tqdm bar
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
    plot = _run(["-m", "seqpar_ring.plot", str(out)], LIMIT_S)
    for name in ("loss.png", "passkey_accuracy.png"):
        png = out / name
        assert str(png) in plot.stdout and png.read_bytes()[:4] == b"\x89PNG"


def test_finetune_stages_and_evaluation_at_several_lengths(tmp_path):
    """The GPU recipe's code path at CPU scale: --stages, a larger tiny model with its RoPE
    base, rows drawn with torch, the preflight forward, evaluation at several lengths under
    SP = 2 with tokens/s, summary.json and its tables."""
    pytest.importorskip("deepspeed")
    out = tmp_path / "stages"
    proc = _run([os.path.join("examples", "finetune.py"), "--out", str(out), "--stages",
                 "32x8:3,64x4:2,128x2:2", "--hidden", "32", "--heads", "2", "--rope-theta",
                 "1e6", "--fast-data", "--eval-lens", "128,256", "--depths", "0,0.5,1",
                 "--eval-per-depth", "2", "--eval-batch-size", "1", "--preflight",
                 "--no-progress-bar", "--log-every", "2", "--save-every", "0"], LIMIT_S)
    for text in ("preflight: one 256-token row forward", "stage 3: rows of 128 tokens",
                 "| eval tokens per row |", "evaluating at 256 tokens per row"):
        assert text in proc.stdout, text
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if "eval" not in r]
    assert [r["seq_len"] for r in train] == [32] * 3 + [64] * 2 + [128] * 2
    evals = [r["eval"] for r in recs if "eval" in r]
    assert [e["seq_len"] for e in evals] == [128, 256] and all(r["step"] == 7 for r in recs[-2:])
    for e in evals:
        assert set(e["by_depth"]) == {"0", "0.5", "1"} and e["rows"] == 6
        assert e["tokens_per_s"] > 0 and 0.0 <= e["accuracy"] <= 1.0
    summary = json.loads((out / "summary.json").read_text())
    assert [(s["seq_len"], s["rows"], s["steps"]) for s in summary["stages"]] == [
        (32, 8, 3), (64, 4, 2), (128, 2, 2)]
    assert summary["steps_done"] == 7 and summary["evals"] == evals
    assert (out / "checkpoints" / "latest").read_text().strip() == "global_step7"
    assert json.loads((out / "args.json").read_text())["seq_len"] == 128


def test_finetune_stops_at_its_time_budget_and_still_evaluates(tmp_path):
    pytest.importorskip("deepspeed")
    out = tmp_path / "budget"
    proc = _run([os.path.join("examples", "finetune.py"), "--out", str(out), "--stages",
                 "32x4:3,64x4:3", "--max-train-s", "0.001", "--fast-data",
                 "--eval-per-depth", "1", "--no-progress-bar"], LIMIT_S)
    assert "--max-train-s 0.001 reached after step 1 of 6" in proc.stdout
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 1] and recs[-1]["eval"]["seq_len"] == 64
    assert (out / "checkpoints" / "latest").read_text().strip() == "global_step1"


def test_trainer_with_deepspeed_config_trains(tmp_path):
    """finetune_trainer.py through transformers.Trainer + DeepSpeed (the JSON's SP section)."""
    pytest.importorskip("deepspeed")
    pytest.importorskip("accelerate")
    out = tmp_path / "trainer"
    proc = _run([os.path.join("examples", "finetune_trainer.py"), "--deepspeed_config",
                 os.path.join("configs", "cpu_gloo.json"), "--steps", "30", "--out", str(out),
                 "--eval-per-depth", "2"], 2 * LIMIT_S)
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
