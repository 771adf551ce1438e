"""seqpar_ring: sequence parallelism (ring attention) for HF transformers + DeepSpeed.

Every rank of a sequence-parallel group holds 1/p of each sample's tokens; attention passes
key/value blocks around the ring of the group. See README.md for the data flow.
"""

from __future__ import annotations

from .config import SeqParConfig
from .dilated import dilated_attention
from .groups import SPGroups, destroy, get_groups, initialize
from .layout import gather, shard, shard_batch, unshard
from .loss import sp_cross_entropy
from .modules import RingDilatedMultiheadAttention, sp_attention
from .ring import ring_attention
from .tiled import enable_tiled_loss, tiled_lm_loss

__version__ = "0.1.0"

init_sp_groups = initialize  # the package-level name; seqpar_ring.groups.initialize stays

__all__ = [
    "SeqParConfig",
    "SPGroups",
    "init_sp_groups",
    "get_groups",
    "destroy",
    "shard",
    "unshard",
    "gather",
    "shard_batch",
    "sp_cross_entropy",
    "ring_attention",
    "dilated_attention",
    "sp_attention",
    "RingDilatedMultiheadAttention",
    "tiled_lm_loss",
    "enable_tiled_loss",
    "__version__",
]
