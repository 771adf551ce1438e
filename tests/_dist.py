"""Spawn a gloo process group on CPU and run a test body on every rank.

Process start-up dominates on small CI machines, so one spawned group should run many cases:
write the body as a loop over cases and let it raise on the first mismatch. A worker that
raises sends its traceback back; a group that does not finish within ``timeout`` is killed
and the test fails instead of hanging.
"""

from __future__ import annotations

import os
import socket
import traceback
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

DEFAULT_TIMEOUT_S = 300.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple, queue) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(1)  # 2-core machines: oversubscription makes gloo tests crawl
    try:
        dist.init_process_group(
            "gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=120)
        )
        result = fn(rank, world_size, *args)
        queue.put((rank, "ok", result))
    except BaseException:  # noqa: BLE001 - the parent re-raises with the traceback
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _context():
    """A forkserver that has imported torch once: each rank then starts in ~0.1 s instead of
    re-importing torch (seconds of CPU on a 2-core machine). Falls back to spawn elsewhere."""
    try:
        ctx = mp.get_context("forkserver")
    except ValueError:  # platforms without forkserver
        return mp.get_context("spawn")
    ctx.set_forkserver_preload(["torch", "torch.distributed", "transformers"])
    return ctx


def run_distributed(
    fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = DEFAULT_TIMEOUT_S
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; return the results by rank.

    ``fn`` must be importable (a module-level function). Raises AssertionError with every failing
    rank's traceback, or TimeoutError if the group does not finish in ``timeout`` seconds.
    """
    ctx = _context()
    queue = ctx.SimpleQueue()
    port = _free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, world_size, port, fn, args, queue), daemon=True)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: dict[int, str] = {}
    import time

    deadline = time.monotonic() + timeout
    while len(results) + len(errors) < world_size:
        if time.monotonic() > deadline:
            for p in procs:
                p.kill()
            raise TimeoutError(
                f"distributed test did not finish in {timeout:.0f}s "
                f"(finished ranks: {sorted(results)}, failed: {sorted(errors)})"
            )
        if queue.empty():
            if any(p.exitcode not in (None, 0) for p in procs) and queue.empty():
                time.sleep(0.5)
                if queue.empty():
                    codes = [p.exitcode for p in procs]
                    for p in procs:
                        p.kill()
                    raise AssertionError(f"a worker died without reporting; exit codes {codes}")
            time.sleep(0.02)
            continue
        rank, status, payload = queue.get()
        if status == "ok":
            results[rank] = payload
        else:
            errors[rank] = payload
            # One failing rank usually leaves the others blocked in a collective: stop early.
            deadline = min(deadline, time.monotonic() + 5.0)
    for p in procs:
        p.join(timeout=5)
        if p.is_alive():
            p.kill()
    if errors:
        msg = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items()))
        raise AssertionError(f"{len(errors)} rank(s) failed:\n{msg}")
    return [results[r] for r in range(world_size)]
