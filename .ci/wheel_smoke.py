"""CI smoke test of the installed wheel, run from outside the source tree.

    python -I .ci/wheel_smoke.py <source root>      # with the environment holding the wheel

``-I`` (isolated mode) keeps the current directory, the script's directory and PYTHONPATH off
``sys.path``, so only the installed wheel can provide ``seqpar_ring``; every module's file is
checked to come from site-packages anyway. Checks:

1. every module of the source tree (``seqpar_ring/**.py``, ``integrations/**.py`` as
   ``seqpar_ring.integrations.*``) is in the installed package and imports; the wheel has no
   top-level ``integrations`` package;
2. ``ring_attention`` on one rank (no group, and a one-rank gloo group) equals SDPA, forward
   and gradients, fp64, causal and not, GQA;
3. the command-line entry points answer (``--help``; the two-rank demo runs).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import subprocess
import sys
import sysconfig
import tempfile


def source_modules(root: str) -> list[str]:
    """Module names the wheel must hold, from the .py files of the source tree."""
    names = []
    for folder, prefix in (("seqpar_ring", "seqpar_ring"), ("integrations",
                                                            "seqpar_ring.integrations")):
        base = os.path.join(root, folder)
        for here, dirs, files in os.walk(base):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            rel = os.path.relpath(here, base)
            pkg = prefix if rel == "." else prefix + "." + rel.replace(os.sep, ".")
            for f in files:
                if f.endswith(".py"):
                    names.append(pkg if f == "__init__.py" else f"{pkg}.{f[:-3]}")
    return sorted(names)


def check_modules(root: str) -> None:
    site = os.path.realpath(sysconfig.get_paths()["purelib"])
    src = os.path.realpath(root)
    names = source_modules(root)
    for name in names:
        module = importlib.import_module(name)
        path = os.path.realpath(module.__file__)
        if not path.startswith(site + os.sep) or path.startswith(src + os.sep):
            raise SystemExit(f"{name} was imported from {path}, not from the wheel in {site}")
    if importlib.util.find_spec("integrations") is not None:
        raise SystemExit("the install exposes a top-level `integrations` package")
    print(f"wheel: {len(names)} modules import from {site}")


def check_ring_world1() -> None:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    from seqpar_ring import ring_attention

    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 16, 4, 8, dtype=torch.float64, generator=gen)
    k, v = (torch.randn(2, 16, 2, 8, dtype=torch.float64, generator=gen) for _ in range(2))
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=0,
                                world_size=1)
        try:
            for group in (None, dist.group.WORLD):
                for causal in (True, False):
                    ours = [t.clone().requires_grad_() for t in (q, k, v)]
                    ref = [t.clone().requires_grad_() for t in (q, k, v)]
                    out = ring_attention(*ours, group, causal=causal)
                    want = F.scaled_dot_product_attention(
                        *(t.transpose(1, 2) for t in ref), is_causal=causal,
                        enable_gqa=True).transpose(1, 2)
                    dout = torch.randn(out.shape, dtype=out.dtype, generator=gen)
                    out.backward(dout)
                    want.backward(dout)
                    case = f"group={'gloo' if group else None} causal={causal}"
                    torch.testing.assert_close(out, want, atol=1e-10, rtol=0, msg=case)
                    for name, a, b in zip("qkv", ours, ref):
                        torch.testing.assert_close(a.grad, b.grad, atol=1e-10, rtol=0,
                                                   msg=f"d{name} {case}")
        finally:
            dist.destroy_process_group()
    print("ring_attention, world 1: equals SDPA (fp64, forward and gradients)")


def check_clis() -> None:
    for args in (["seqpar_ring.bench", "--help"], ["seqpar_ring.plan", "--help"],
                 ["seqpar_ring.plot", "--help"], ["seqpar_ring.demo", "--help"],
                 ["seqpar_ring.demo"],
                 ["seqpar_ring.plan", "--model", "tiny", "--gpus", "2", "--gpu-mem-gib", "1"],
                 ["seqpar_ring.plan", "--validate"]):  # its JSON data ship in the wheel
        proc = subprocess.run([sys.executable, "-I", "-m", *args], capture_output=True,
                              text=True, timeout=120)
        if proc.returncode != 0:
            raise SystemExit(f"python -m {' '.join(args)} exited {proc.returncode}:\n"
                             f"{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    print("CLIs: bench, plan, plot answer; the two-rank demo agrees with one process")


def main() -> None:
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    root = os.path.abspath(sys.argv[1])
    cwd, src = os.path.realpath(os.getcwd()), os.path.realpath(root)
    if cwd == src or cwd.startswith(src + os.sep):
        raise SystemExit("run the smoke test from outside the source tree")
    check_modules(root)
    check_ring_world1()
    check_clis()
    print("wheel smoke test: OK")


if __name__ == "__main__":
    main()
