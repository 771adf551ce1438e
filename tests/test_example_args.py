"""The examples refuse bad command lines in the launching process, before any spawn, model or
engine, with one line naming the flag and the fix (examples/arg_checks.py). Each case calls
the script's ``main`` in this process: if a check were missing, ``main`` would go on to spawn
and the case would fail on the time limit or the message."""

from __future__ import annotations

import os
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))

pytest.importorskip("deepspeed")
pytest.importorskip("transformers")

import finetune  # noqa: E402
import finetune_trainer  # noqa: E402
import passkey  # noqa: E402


def refused(main, argv: list[str], match: str) -> str:
    start = time.monotonic()
    with pytest.raises(SystemExit) as e:
        main(argv)
    message = str(e.value.code)
    assert message.startswith("error: ") and match in message, message
    assert time.monotonic() - start < 10, "the check ran after something slow"
    return message


FINETUNE_CASES = [
    (["--seq-len", "-5"], "--seq-len -5 must be a positive number"),
    (["--seq-len", "-8"], "--seq-len -8 must be a positive number"),
    (["--seq-len", "0"], "--seq-len 0 must be a positive number"),
    (["--batch-size", "0"], "--batch-size 0 must be a positive number"),
    (["--steps", "-1"], "--steps -1 must be a positive number"),
    (["--nproc", "0"], "--nproc 0 must be a positive number"),
    (["--curriculum", "2"], "--curriculum 2.0 must be a fraction in [0, 1]"),
    (["--sequence-parallel-size", "3"],
     "--sequence-parallel-size 3 does not divide the 2 processes (--nproc 2): choose one of "
     "[1, 2]"),
    (["--seq-len", "130"], "--seq-len 130 must be a positive multiple of 4 (2 SP ranks x 2 "
     "for the zigzag layout): use 132"),
    (["--eval-lens", "1024,1030"], "--eval-lens 1030 must be a positive multiple of 4"),
    (["--seq-len", "64"], "rows of 8 tokens cannot hold a passkey row, which needs at least 16 "
     "(the curriculum starts at --seq-len / 8: use --seq-len >= 128 or --curriculum 0)"),
    (["--stages", "8x4:2,64x4:2"], "--stages: rows of 8 tokens cannot hold a passkey row"),
    (["--deepspeed_config", "missing.json"], "'missing.json' is not a file"),
]


@pytest.mark.parametrize("argv,match", FINETUNE_CASES, ids=[" ".join(a) for a, _ in
                                                              FINETUNE_CASES])
def test_finetune_refuses_before_spawning(argv, match, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    refused(finetune.main, argv, match)


def test_launched_world_comes_from_the_launcher(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")  # torchrun --nproc_per_node 4, checked before init
    monkeypatch.setattr(finetune, "train", lambda args: pytest.fail("reached train()"))
    refused(finetune.main, ["--sequence-parallel-size", "3"],
            "does not divide the 4 processes (WORLD_SIZE, set by the launcher)")


def _data(tmp_path, name: str, raw: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(raw)
    return str(path)


def test_data_files_are_checked_with_their_name_and_offset(tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    cases = [
        (_data(tmp_path, "w.bin", b"plain text"), "a .bin file is not read as text"),
        (_data(tmp_path, "nul.txt", b"text\0more"), "is binary (a NUL byte at offset 4)"),
        (_data(tmp_path, "latin.txt", b"caf\xe9 au lait"),
         "is not UTF-8 text: byte 0xe9 at offset 3"),
        (_data(tmp_path, "bad.jsonl", b'{"text": "a"}\n{"body": "b"}\n'),
         "line 2: want an object with a string \"text\" field"),
        (_data(tmp_path, "broken.jsonl", b'{"text": "a"}\n{"text": \n'), "line 2: not JSON"),
        (_data(tmp_path, "empty.txt", b"\n\n\n"), "holds no documents"),
        (str(tmp_path / "missing.jsonl"), "is not a file"),
    ]
    for path, match in cases:
        msg = refused(finetune.main, ["--data", path], match)
        assert repr(path) in msg, msg  # the file is named
    good = _data(tmp_path, "good.txt", "první\n\nzweite".encode())
    assert passkey.read_documents(good) == ["první", "zweite"]


TRAINER_CASES = [
    (["--seq-len", "-5"], "--seq-len -5 must be a positive number"),
    (["--sequence-parallel-size", "3"],
     "--sequence-parallel-size 3 does not divide the 2 processes (--nproc 2)"),
    (["--seq-len", "10"], "--seq-len 10 must be a positive multiple of 4"),
    (["--seq-len", "8", "--sequence-parallel-size", "1"], "rows of 8 tokens cannot hold"),
    (["--nproc", "3", "--deepspeed_config", os.path.join(ROOT, "configs", "cpu_gloo.json")],
     "cpu_gloo.json 2 does not divide the 3 processes (--nproc 3)"),
    (["--deepspeed_config", "missing.json"], "'missing.json' is not a file"),
]


@pytest.mark.parametrize("argv,match", TRAINER_CASES, ids=[" ".join(a) for a, _ in
                                                           TRAINER_CASES])
def test_trainer_example_refuses_before_spawning(argv, match, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    refused(finetune_trainer.main, argv, match)


def test_train_deepspeed_refuses_before_the_engine(monkeypatch):
    import train_deepspeed

    monkeypatch.setattr(train_deepspeed, "build_model", lambda name: pytest.fail("model built"))
    monkeypatch.setenv("WORLD_SIZE", "2")
    ds = os.path.join(ROOT, "configs", "cpu_gloo.json")
    for argv, match in ((["--seq-len", "0"], "--seq-len 0 must be a positive number"),
                        (["--sequence-parallel-size", "4"], "4 does not divide the 2 processes"),
                        (["--seq-len", "6"], "--seq-len 6 must be a positive multiple of 4")):
        monkeypatch.setattr(sys, "argv", ["train_deepspeed.py", "--deepspeed",
                                          "--deepspeed_config", ds, *argv])
        refused(lambda _: train_deepspeed.main(), [], match)
