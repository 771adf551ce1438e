"""Session set-up: DeepSpeed's CPU communication op is built once, before any test that
initialises DeepSpeed, outside every per-test timeout (see tests/_ds_op.py for why)."""

from __future__ import annotations

import functools
import os

import _ds_op


@functools.lru_cache(maxsize=None)
def _mentions_deepspeed(path: str) -> bool:
    with open(path, encoding="utf-8") as f:
        return "deepspeed" in f.read()


def pytest_collection_finish(session) -> None:
    files = {str(item.path) for item in session.items}
    if not any(_mentions_deepspeed(f) for f in files if os.path.isfile(f)):
        return
    report = session.config.pluginmanager.get_plugin("terminalreporter")
    if report is not None:
        report.write_line("DeepSpeed's CPU communication op: loading it, or building it once "
                          "(first run on a machine: 1-2 min on 2 cores)")
    try:
        took = _ds_op.build()
    except Exception as e:  # noqa: BLE001 - the DeepSpeed tests then fail with it, one by one
        if report is not None:
            report.write_line(f"DeepSpeed's CPU communication op did not build: {e}", red=True)
        return
    if report is not None and took is not None:
        report.write_line(f"DeepSpeed's CPU communication op ready in {took:.1f} s")
