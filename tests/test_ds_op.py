"""The build lock of DeepSpeed's CPU op: a lock left by a killed build is removed, one that a
running build holds is waited on (tests/_ds_op.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import _ds_op
import pytest


def _old(path) -> None:
    past = time.time() - 10 * _ds_op.STALE_AGE_S
    os.utime(path, (past, past))


def test_stale_lock_is_removed_and_a_held_one_is_kept(tmp_path, monkeypatch):
    lock = tmp_path / "lock"
    monkeypatch.setattr(_ds_op, "lock_path", lambda: str(lock))
    assert not _ds_op.clear_stale_lock()  # no lock: nothing to do

    lock.write_text("")  # just created (a build starting): left alone even if nobody holds it
    assert not _ds_op.clear_stale_lock() and lock.exists()

    _old(lock)  # a killed build's lock: old and held by no process
    assert _ds_op.clear_stale_lock() and not lock.exists()

    lock.write_text("")
    _old(lock)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; f = open(sys.argv[1]); "
                               "print('open', flush=True); time.sleep(60)", str(lock)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "open"
        assert not _ds_op.clear_stale_lock() and lock.exists()  # a build in progress
    finally:
        holder.kill()
        holder.wait()
    assert _ds_op.clear_stale_lock() and not lock.exists()


def test_the_op_lock_lives_in_torchs_extension_dir():
    pytest.importorskip("deepspeed")
    path = _ds_op.lock_path()
    assert path is not None, "no ShareMemCommBuilder on the CPU accelerator"
    assert path.endswith(os.path.join("deepspeed_shm_comm", "lock")), path
