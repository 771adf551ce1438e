"""seqpar_ring: sequence parallelism (ring attention) for HF transformers + DeepSpeed.

Every rank of a sequence-parallel group holds 1/p of each sample's tokens; attention passes
key/value blocks around the ring of the group. See README.md for the data flow.
"""

from __future__ import annotations

import importlib.util as _ilu
import os as _os
import sys as _sys


def _mount_integrations() -> None:
    """Make ``seqpar_ring.integrations`` importable from a source checkout.

    The adapters live in the repository's top-level ``integrations/`` folder, which the wheel
    installs inside this package. Run from a checkout (repository root on ``sys.path``), that
    folder sits beside the package instead: load it under its one public name here, so it is
    never imported twice (as ``integrations`` and as ``seqpar_ring.integrations``).
    """
    name = __name__ + ".integrations"
    here = _os.path.dirname(_os.path.abspath(__file__))
    if name in _sys.modules or _os.path.isdir(_os.path.join(here, "integrations")):
        return  # installed from the wheel: the adapters are a normal sub-package
    src = _os.path.join(_os.path.dirname(here), "integrations")
    init = _os.path.join(src, "__init__.py")
    if not _os.path.isfile(init):
        return
    spec = _ilu.spec_from_file_location(name, init, submodule_search_locations=[src])
    module = _ilu.module_from_spec(spec)
    _sys.modules[name] = module
    spec.loader.exec_module(module)


_mount_integrations()

from .config import SeqParConfig  # noqa: E402
from .dilated import dilated_attention  # noqa: E402
from .groups import SPGroups, destroy, get_groups, initialize, shutdown  # noqa: E402
from .layout import gather, shard, shard_batch, unshard  # noqa: E402
from .loss import sp_cross_entropy  # noqa: E402
from .modules import RingDilatedMultiheadAttention, sp_attention  # noqa: E402
from .ring import ring_attention  # noqa: E402
from .tiled import TiledLMHead, tiled_lm_loss  # noqa: E402
from .ulysses import ulysses_dilated_attention, ulysses_ring_attention  # noqa: E402

__version__ = "0.1.0"

init_sp_groups = initialize  # the package-level name; seqpar_ring.groups.initialize stays

__all__ = [
    "SeqParConfig",
    "SPGroups",
    "init_sp_groups",
    "get_groups",
    "destroy",
    "shutdown",
    "shard",
    "unshard",
    "gather",
    "shard_batch",
    "sp_cross_entropy",
    "ring_attention",
    "dilated_attention",
    "sp_attention",
    "ulysses_ring_attention",
    "ulysses_dilated_attention",
    "RingDilatedMultiheadAttention",
    "tiled_lm_loss",
    "TiledLMHead",
    "__version__",
]
