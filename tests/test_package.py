"""One import path for the adapters, a package list nobody keeps by hand, the CLI entry points.

`seqpar_ring.integrations` must import from a source checkout (repository root on the path),
the top-level name `integrations` must be refused with a message naming the right one, and the
wheel must hold every package of the tree (CI also installs the wheel and imports every module:
.ci/wheel_smoke.py).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# An editable install (of this checkout or another) must not be what supplies the modules
# under test: drop its import finder before importing.
_NO_EDITABLE = ("import sys; sys.meta_path[:] = [f for f in sys.meta_path if not "
                "getattr(f, '__module__', '').startswith('__editable__')]\n")


def _python(args: list[str], cwd, pythonpath: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def test_integrations_import_from_a_source_checkout(tmp_path):
    pytest.importorskip("transformers")
    code = _NO_EDITABLE + (
        "import seqpar_ring.integrations.hf as hf, seqpar_ring\n"
        "print(seqpar_ring.__file__)\nprint(hf.__file__)\nprint('integrations' in sys.modules)")
    proc = _python(["-c", code], tmp_path, ROOT)  # only the repository root on the path
    assert proc.returncode == 0, proc.stderr[-3000:]
    pkg, hf, top_level = proc.stdout.split()
    assert pkg == os.path.join(ROOT, "seqpar_ring", "__init__.py")
    assert hf == os.path.join(ROOT, "integrations", "hf.py")
    assert top_level == "False"  # loaded once, under its one public name


def test_top_level_integrations_is_refused():
    proc = _python(["-c", _NO_EDITABLE + "import integrations"], ROOT, None)
    assert proc.returncode != 0
    assert "ImportError: import the adapters as seqpar_ring.integrations" in proc.stderr, \
        proc.stderr[-3000:]


def _setup_packages() -> list[str]:
    spec = importlib.util.spec_from_file_location("_seqpar_setup", os.path.join(ROOT, "setup.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # setup() itself runs only as __main__
    return module.packages()


def test_wheel_packages_are_every_package_of_the_tree():
    want = set()
    for folder, prefix in (("seqpar_ring", "seqpar_ring"),
                           ("integrations", "seqpar_ring.integrations")):
        for here, dirs, files in os.walk(os.path.join(ROOT, folder)):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            if "__init__.py" in files:
                rel = os.path.relpath(here, os.path.join(ROOT, folder))
                want.add(prefix if rel == "." else f"{prefix}.{rel.replace(os.sep, '.')}")
    got = _setup_packages()
    assert set(got) == want and len(got) == len(want), (sorted(got), sorted(want))
    assert {"seqpar_ring.tools", "seqpar_ring.tools.bench", "seqpar_ring.kernels"} <= want


def test_bench_help_lists_subcommands(capsys):
    from seqpar_ring.tools.bench import COMMANDS, main

    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert all(f"  {name} " in out for name in COMMANDS) and set(COMMANDS) == {
        "ring", "dilated", "e2e", "packed", "window"}
    with pytest.raises(SystemExit) as exit_:
        main(["no-such-benchmark"])
    assert exit_.value.code == 2
    # the documented command line, through the thin entry module
    proc = _python(["-m", "seqpar_ring.bench", "--help"], ROOT, ROOT)
    assert proc.returncode == 0 and "e2e" in proc.stdout, proc.stderr[-3000:]


def _text_files():
    skip = {".git", "__pycache__", "runs", "build", ".pytest_cache", ".ruff_cache"}
    for here, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in skip and not d.endswith(".egg-info")]
        for f in files:
            if f.endswith((".py", ".md", ".json", ".toml", ".txt")) or f == "run":
                yield os.path.join(here, f)


def test_docs_refer_only_inside_the_repository():
    import re

    outside = ("../" + "shared", "SPEC" + "-dilated")  # split so this file does not match
    link = re.compile(r"\]\(([^)#\s]+)[^)]*\)")
    real_root, bad = os.path.realpath(ROOT), []
    for path in _text_files():
        text = open(path, encoding="utf-8").read()
        bad += [f"{path}: {s!r}" for s in outside if s in text]
        if path.endswith(".md"):
            for target in link.findall(text):
                if target.startswith(("http://", "https://", "mailto:")):
                    continue
                full = os.path.realpath(os.path.join(os.path.dirname(path), target))
                if not full.startswith(real_root + os.sep) or not os.path.exists(full):
                    bad.append(f"{path}: link {target!r} is not a file of the repository")
    assert not bad, "\n".join(bad)
    assert os.path.isfile(os.path.join(ROOT, "docs", "dilated.md"))
