"""The front door: licence, changelog, package metadata and the pin policy; outputs of the
documented commands ignored by git; `demo --help`; the loss plot's legend outside the lines."""

from __future__ import annotations

import glob
import os
import re
import subprocess
import sys
from importlib import metadata

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")


def _project() -> dict:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["project"]


def test_licence_changelog_and_metadata():
    text = open(os.path.join(ROOT, "LICENSE")).read()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    p = _project()
    assert p["license"] == "Apache-2.0" and p["license-files"] == ["LICENSE"]
    assert p["authors"] and p["requires-python"] == ">=3.10" and p["classifiers"]
    changelog = open(os.path.join(ROOT, "CHANGELOG.md")).read()
    assert f"## {p['version']}" in changelog and "## Unreleased" in changelog


def _requirements() -> list[str]:
    p = _project()
    extras = [r for group in p["optional-dependencies"].values() for r in group
              if not r.startswith("seqpar_ring")]
    return p["dependencies"] + extras


def test_every_runtime_dependency_has_a_range_and_the_installed_versions_are_in_it():
    from packaging.requirements import Requirement
    from packaging.version import Version

    untested = []
    for text in _requirements():
        req = Requirement(text)
        if req.name in ("pytest", "ruff"):  # tools: the newest is fine
            continue
        ops = {s.operator for s in req.specifier}
        assert ">=" in ops and "<" in ops, f"{text}: give a tested lower and an upper bound"
        try:
            installed = Version(metadata.version(req.name)).public  # drop +cpu
        except metadata.PackageNotFoundError:
            untested.append(req.name)
            continue
        assert req.specifier.contains(installed, prereleases=True), (
            f"{req.name} {installed} is installed but the package declares {req.specifier}: "
            "test the new version, then move the bound (README: Supported versions)")
    assert not untested, f"not installed, so not tested here: {untested}"


def test_readme_states_the_ranges_of_pyproject():
    readme = open(os.path.join(ROOT, "README.md")).read()
    section = readme[readme.index("## Supported versions"):]
    section = section[:section.index("\n## ", 3)]
    for text in _requirements():
        name, spec = re.match(r"([\w-]+)(.*)", text).groups()
        if name not in ("pytest", "ruff"):
            assert f"{name} `{spec}`" in section, f"README does not state {name} {spec}"


def _documented_outputs() -> list[str]:
    """Default output paths of the documented commands, read from their sources."""
    outs = ["runs/passkey/metrics.jsonl"]
    for path in glob.glob(os.path.join(ROOT, "seqpar_ring", "tools", "bench", "*.py")) + [
            os.path.join(ROOT, "examples", "finetune_trainer.py")]:
        outs += re.findall(r'"--out",\s*default="([^"]+)"', open(path).read())
    readme = open(os.path.join(ROOT, "README.md")).read()
    outs += re.findall(r'output_dir="([^"]+)"', readme)  # the Trainer snippet
    return outs


def test_outputs_of_the_documented_commands_are_ignored_by_git():
    outs = _documented_outputs()
    assert len(outs) >= 7, outs  # finetune, the trainer, 4 benchmarks, the Trainer snippet
    for out in outs:
        if not os.path.splitext(out)[1]:  # a run directory: a file in it
            out = f"{out}/checkpoint-1"
        proc = subprocess.run(["git", "check-ignore", "-q", "--no-index", out], cwd=ROOT)
        if proc.returncode == 128:
            pytest.skip("not a git checkout")
        assert proc.returncode == 0, f"{out} (a documented command's output) is not ignored"


def test_demo_help_prints_help_and_does_not_run():
    env = {**os.environ, "PYTHONPATH": ROOT}
    proc = subprocess.run([sys.executable, "-m", "seqpar_ring.demo", "--help"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: python -m seqpar_ring.demo")
    assert "gloo ranks agree" not in proc.stdout  # the demo did not run


def test_loss_plot_legend_lies_outside_the_axes(tmp_path):
    plt = pytest.importorskip("matplotlib.pyplot")
    from seqpar_ring.tools.plot import loss_figure

    train = [{"step": i, "loss": 4.0 / (i + 1), "seq_len": 128 if i < 30 else 1024}
             for i in range(60)]
    fig = loss_figure(plt, str(tmp_path), train)
    fig.savefig(tmp_path / "loss.png")  # lays the figure out
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == [
        "loss", "smoothed", "tokens per row (right axis)"]
    box = legend.get_window_extent()
    for ax in fig.axes:  # the loss axes and the row-length twin
        assert not box.overlaps(ax.get_window_extent()), "the legend covers the lines"
    plt.close(fig)
