"""Package discovery for the wheel (the metadata is in pyproject.toml).

``integrations/`` sits at the top level of the repository but installs as
``seqpar_ring.integrations``; setuptools' declarative ``find`` cannot rename a directory, so
the package list is computed here: every package under ``seqpar_ring/`` plus every package
under ``integrations/`` renamed into ``seqpar_ring.``. Nothing is listed by hand, so a new
sub-package cannot miss the wheel (CI installs the wheel and imports every module).
"""

import os

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def packages() -> list[str]:
    core = find_packages(ROOT, include=["seqpar_ring", "seqpar_ring.*"])
    adapters = find_packages(ROOT, include=["integrations", "integrations.*"])
    return sorted(core + ["seqpar_ring." + name for name in adapters])


if __name__ == "__main__":
    setup(packages=packages(), package_dir={"seqpar_ring.integrations": "integrations"})
