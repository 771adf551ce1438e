"""Build (or load) DeepSpeed's CPU communication op once, before the tests that need it.

On a machine without an accelerator, every ``deepspeed.comm`` initialisation loads the
``deepspeed_shm_comm`` op (``ShareMemCommBuilder``, ``deepspeed/comm/torch.py:build_shm_op``).
DeepSpeed 0.19 ships it as source, so the first load JIT-compiles it into
``~/.cache/torch_extensions/<py>_cpu/deepspeed_shm_comm`` (``$TORCH_EXTENSIONS_DIR`` moves it):
60-150 s on 2 cores. Inside a test that build would race the test's timeout; a build killed
half-way leaves torch's ``lock`` file behind and every later load on the machine waits on it
forever. So the suite builds it here first, with no limit (``tests/conftest.py`` at the start
of a session that runs DeepSpeed tests; ``.ci/run`` before pytest), and a lock that no
process holds open is removed before the build instead of being waited on.

``python tests/_ds_op.py`` builds it and prints how long that took.
"""

from __future__ import annotations

import os
import sys
import time

STALE_AGE_S = 5.0  # torch closes the lock's fd just before removing it: never race that


def lock_path() -> str | None:
    """The lock torch's extension loader takes while it builds the op, or None without it."""
    try:
        from deepspeed.accelerator import get_accelerator
        from torch.utils.cpp_extension import _get_build_directory
    except ImportError:
        return None
    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None:  # an accelerator that does not use it
        return None
    return os.path.join(_get_build_directory(builder.NAME, verbose=False), "lock")


def _held_open(path: str) -> bool:
    """True if a live process has ``path`` open (torch's builder keeps the lock's fd open)."""
    real = os.path.realpath(path)
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == real:
                    return True
            except OSError:
                continue
    return False


def clear_stale_lock() -> bool:
    """Remove the op's build lock if no process holds it (a build that was killed). Returns
    True if it removed one."""
    path = lock_path()
    if path is None or not os.path.exists(path) or not os.path.isdir("/proc"):
        return False
    if time.time() - os.path.getmtime(path) < STALE_AGE_S or _held_open(path):
        return False  # a build is running: load() below waits for it
    os.remove(path)
    return True


def build() -> float | None:
    """Load the op, compiling it if needed; returns the seconds it took (None: not used)."""
    try:
        import deepspeed.ops
        from deepspeed.accelerator import get_accelerator
    except ImportError:
        return None
    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return None
    if clear_stale_lock():
        print(f"removed a stale build lock (a killed build): {lock_path()}", file=sys.stderr)
    start = time.monotonic()
    builder.load(verbose=False)
    return time.monotonic() - start


if __name__ == "__main__":
    took = build()
    if took is None:
        print("DeepSpeed's CPU communication op is not used here (no DeepSpeed, or another "
              "accelerator)")
    else:
        print(f"DeepSpeed's CPU communication op (deepspeed_shm_comm) ready in {took:.1f} s")
