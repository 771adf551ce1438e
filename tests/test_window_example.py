"""examples/sliding_window.py: a sliding-window Mistral fine-tuned at SP = 2 (torchrun, gloo)
takes the same optimizer steps as one process with transformers' eager attention."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "sliding_window.py")


def _port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _run(cmd: list[str], out: str) -> list[float]:
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", MASTER_PORT=_port())
    proc = subprocess.run(cmd + ["--out", out], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    with open(out) as f:
        return json.load(f)


def test_sliding_window_example_matches_eager(tmp_path):
    sp = _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_port", _port(), SCRIPT], str(tmp_path / "sp.json"))
    ref = _run([sys.executable, SCRIPT, "--eager"], str(tmp_path / "eager.json"))
    assert len(sp) == len(ref) == 4
    for a, b in zip(sp, ref):
        assert abs(a - b) <= 1e-5 * abs(b), (sp, ref)
