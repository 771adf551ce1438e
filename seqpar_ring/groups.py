"""The SP x DP rank grid, its process groups, and the DeepSpeed ``mpu`` protocol.

Grid: ``index = dp_rank * sp_size + sp_rank`` where ``index`` is the rank's position in the
world group (its global rank for the default world). SP groups are therefore consecutive ranks,
which keeps the ring inside a node when ``sp_size`` divides the GPUs per node.

DeepSpeed 0.19.8 reads the object handed to it as ``mpu`` like this (every getter it calls is
implemented below; the unit test calls each one):

* ``runtime/config.py``: ``world_size = mpu.get_data_parallel_world_size()`` (= dp) sets the
  batch-size arithmetic, and the data loader samples with the DP size and rank.
* ``engine.py`` / ``stage_1_and_2.py`` / ``stage3.py``: gradients are summed over
  ``get_sequence_data_parallel_group()`` and divided by ``its size / sp_size`` = dp. Parameters
  are replicated on all SP x DP ranks, so that group is the whole world group, and the SP-aware
  loss (`seqpar_ring.loss`) makes the sum over SP ranks the true gradient of a sample.
* ``runtime/utils.py`` / ZeRO grad-norm paths all-reduce norms over
  ``get_model_parallel_group()`` and count non-model-parallel params on model-parallel rank 0.
  Nothing is split across ranks here (model/tensor/pipe parallel size 1), so that group holds
  only this rank: the all-reduce is then a no-op, never a sum over replicas.
* We do NOT define ``initialize_sequence_parallel``: DeepSpeed treats an mpu that has it as its
  own Ulysses mpu and then returns None for the data-parallel group.

Ulysses x ring (``ulysses_size`` u > 1): the SP group of p = u x r ranks is a u x r grid,
``sp_rank = ring_rank * u + ulysses_rank``. The u ranks of one all-to-all (Ulysses) group are
adjacent (consecutive global ranks, so inside a node when u divides the GPUs per node); a ring
group takes every u-th rank of the SP group. Both sub-groups are explicit process groups on
`SPGroups`; the DeepSpeed mpu protocol above is unchanged (it sees one SP group of p ranks).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import timedelta

import torch.distributed as dist
from torch.distributed import ProcessGroup

from .agreement import agree, collect_error

__all__ = ["SPGroups", "initialize", "get_groups", "destroy", "shutdown"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class SPGroups:
    """Process groups of one rank in the SP x DP grid; also the DeepSpeed ``mpu``.

    ``sp_ranks``/``dp_ranks``/``next_rank``/``prev_rank`` are GLOBAL ranks (usable with
    ``dist.P2POp``); ``sp_ranks`` is in ring order: sp_rank i sends to i+1 (mod sp_size).
    """

    sp_size: int
    dp_size: int
    rank: int
    sp_rank: int
    dp_rank: int
    sp_group: ProcessGroup
    dp_group: ProcessGroup
    sp_dp_group: ProcessGroup
    sp_ranks: tuple[int, ...]
    dp_ranks: tuple[int, ...]
    next_rank: int
    prev_rank: int
    self_group: ProcessGroup = field(repr=False)  # only this rank: the model-parallel group
    world_ranks: tuple[int, ...] = field(repr=False, default=())  # global ranks of the grid
    _owned: tuple[ProcessGroup, ...] = field(repr=False, default=())  # groups destroy() frees
    # Ulysses x ring grid inside the SP group (u = 1: the ulysses group is this rank alone and
    # the ring group is the SP group); *_ranks are global ranks in group-rank order.
    ulysses_size: int = 1
    ulysses_rank: int = 0
    ring_rank: int = 0
    ulysses_group: ProcessGroup | None = field(repr=False, default=None)
    ring_group: ProcessGroup | None = field(repr=False, default=None)
    ulysses_ranks: tuple[int, ...] = ()
    ring_ranks: tuple[int, ...] = ()

    @property
    def ring_size(self) -> int:
        """r = sp_size / ulysses_size."""
        return self.sp_size // self.ulysses_size

    def __str__(self) -> str:
        if self.ulysses_size == 1:
            return f"SP({self.sp_size})-DP({self.dp_size})-rank({self.rank})"
        return (f"SP({self.sp_size}=U{self.ulysses_size}xR{self.ring_size})-DP({self.dp_size})"
                f"-rank({self.rank})")

    def describe(self) -> str:
        """The whole grid as a table of global ranks (rows dp_rank, columns sp_rank)."""
        width = max(len(str(r)) for r in self.world_ranks) + 2
        head = "dp\\sp".ljust(7) + "".join(f"{s:>{width}}" for s in range(self.sp_size))
        lines = [
            f"{self}: world {len(self.world_ranks)} = sp {self.sp_size} x dp {self.dp_size}",
            head,
        ]
        for d in range(self.dp_size):
            row = self.world_ranks[d * self.sp_size : (d + 1) * self.sp_size]
            cells = "".join(
                f"{('*' if r == self.rank else '') + str(r):>{width}}" for r in row
            )
            lines.append(f"{d:<7}{cells}")
        if self.ulysses_size > 1:
            u, sp = self.ulysses_size, self.sp_ranks
            lines.append(f"this SP group as ulysses {u} x ring {self.ring_size} (rows: ring "
                         "rank, columns: ulysses rank; all-to-all along a row, ring down a column)")
            for i in range(self.ring_size):
                cells = "".join(f"{('*' if r == self.rank else '') + str(r):>{width}}"
                                for r in sp[i * u:(i + 1) * u])
                lines.append(f"{i:<7}{cells}")
            lines.append(
                f"rank {self.rank}: sp_rank {self.sp_rank} = ring_rank {self.ring_rank} x {u} + "
                f"ulysses_rank {self.ulysses_rank}, dp_rank {self.dp_rank}; all-to-all with "
                f"{list(self.ulysses_ranks)}, ring {list(self.ring_ranks)} (* = this rank)"
            )
        else:
            lines.append(
                f"rank {self.rank}: sp_rank {self.sp_rank}, dp_rank {self.dp_rank}, "
                f"ring {self.prev_rank} -> {self.rank} -> {self.next_rank} (* = this rank)"
            )
        return "\n".join(lines)

    # --- DeepSpeed mpu protocol: data parallel = replicas of a sample's SP group -------------
    def get_data_parallel_group(self) -> ProcessGroup:
        return self.dp_group

    def get_data_parallel_world_size(self) -> int:
        return self.dp_size

    def get_data_parallel_rank(self) -> int:
        return self.dp_rank

    def get_data_parallel_group_ranks(self) -> list[int]:
        return list(self.dp_ranks)

    # --- sequence parallel ---------------------------------------------------------------
    def get_sequence_parallel_group(self) -> ProcessGroup:
        return self.sp_group

    def get_sequence_parallel_world_size(self) -> int:
        return self.sp_size

    def get_sequence_parallel_rank(self) -> int:
        return self.sp_rank

    # --- sequence x data parallel: every rank that replicates the parameters --------------
    def get_sequence_data_parallel_group(self) -> ProcessGroup:
        return self.sp_dp_group

    def get_sequence_data_parallel_world_size(self) -> int:
        return self.sp_size * self.dp_size

    def get_sequence_data_parallel_rank(self) -> int:
        return self.dp_rank * self.sp_size + self.sp_rank

    # --- model / tensor / pipe parallel: size 1 (parameters are not split) ----------------
    def get_model_parallel_group(self) -> ProcessGroup:
        return self.self_group

    def get_model_parallel_world_size(self) -> int:
        return 1

    def get_model_parallel_rank(self) -> int:
        return 0

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_slice_parallel_group = get_model_parallel_group
    get_slice_parallel_world_size = get_model_parallel_world_size
    get_slice_parallel_rank = get_model_parallel_rank
    get_pipeline_model_parallel_group = get_model_parallel_group
    get_pipeline_model_parallel_world_size = get_model_parallel_world_size
    get_pipeline_model_parallel_rank = get_model_parallel_rank
    get_pipe_parallel_group = get_model_parallel_group
    get_pipe_parallel_world_size = get_model_parallel_world_size
    get_pipe_parallel_rank = get_model_parallel_rank

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self.rank


_DEFAULT: SPGroups | None = None
_DEFAULT_KEY: tuple[int, object, int] | None = None


def _divisors(n: int) -> tuple[int, ...]:
    return tuple(d for d in range(1, n + 1) if n % d == 0)


def _check_sizes(sp_size, ulysses_size, world: int) -> None:
    if isinstance(sp_size, bool) or not isinstance(sp_size, int) or sp_size < 1:
        raise ValueError(f"sp_size={sp_size!r} must be an integer >= 1")
    if world % sp_size != 0:
        raise ValueError(
            f"world_size({world}) % sp_size({sp_size}) != 0: "
            f"choose sp_size from {_divisors(world)}"
        )
    u = ulysses_size
    if isinstance(u, bool) or not isinstance(u, int) or u < 1:
        hint = (" ('auto' must be resolved first: seqpar_ring.tools.plan.resolve_ulysses_size)"
                if u == "auto" else "")
        raise ValueError(f"ulysses_size={u!r} must be an integer >= 1{hint}")
    if sp_size % u:
        raise ValueError(
            f"ulysses_size({u}) does not divide sp_size({sp_size}): choose ulysses_size from "
            f"{_divisors(sp_size)}"
        )


def _build(sp_size: int, world_group: ProcessGroup | None, ulysses_size: int = 1) -> SPGroups:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "seqpar_ring groups need torch.distributed: call "
            "torch.distributed.init_process_group(...) (or deepspeed.init_distributed()) first"
        )
    whole = world_group if world_group is not None else dist.group.WORLD
    members = tuple(dist.get_process_group_ranks(whole))
    # Every rank must build the same grid: a rank with another sp_size would wait in new_group
    # forever. Agree (local checks folded in) before the first group is created.
    error = collect_error(lambda: _check_sizes(sp_size, ulysses_size, len(members)))
    agree(whole, "seqpar_ring.groups.initialize",
          {"sp_size": sp_size, "ulysses_size": ulysses_size}, error=error)
    world, u = len(members), ulysses_size
    rank = dist.get_rank()
    if rank not in members:
        raise RuntimeError(
            f"rank {rank} is not in world_group {list(members)}: call initialize() only on "
            "the ranks of world_group"
        )
    dp_size = world // sp_size
    index = members.index(rank)
    dp_rank, sp_rank = divmod(index, sp_size)

    sp_sets = [members[d * sp_size : (d + 1) * sp_size] for d in range(dp_size)]
    dp_sets = [members[s::sp_size] for s in range(sp_size)]
    self_sets = [(r,) for r in members]
    # u x r grid inside every SP group: all-to-all groups are u adjacent ranks, rings stride u
    uly_sets = [sp[i * u : (i + 1) * u] for sp in sp_sets for i in range(sp_size // u)]
    ring_sets = [sp[j::u] for sp in sp_sets for j in range(u)]
    # Inside a sub-world only its members call us, so groups are created with local
    # synchronisation (non-members need not join); on the default world every rank creates
    # every group in the same order, as torch requires.
    local_sync = world_group is not None and world != dist.get_world_size()
    made: dict[tuple[int, ...], ProcessGroup] = {members: whole}
    owned: list[ProcessGroup] = []
    for ranks in sp_sets + dp_sets + self_sets + uly_sets + ring_sets:  # same order everywhere
        if ranks in made or (local_sync and rank not in ranks):
            continue
        group = dist.new_group(list(ranks), use_local_synchronization=local_sync)
        made[ranks] = group
        owned.append(group)

    sp_ranks = sp_sets[dp_rank]
    ring_rank, ulysses_rank = divmod(sp_rank, u)
    ulysses_ranks = sp_ranks[ring_rank * u : (ring_rank + 1) * u]
    ring_ranks = sp_ranks[ulysses_rank::u]
    return SPGroups(
        sp_size=sp_size,
        dp_size=dp_size,
        rank=rank,
        sp_rank=sp_rank,
        dp_rank=dp_rank,
        sp_group=made[sp_ranks],
        dp_group=made[dp_sets[sp_rank]],
        sp_dp_group=whole,
        sp_ranks=sp_ranks,
        dp_ranks=dp_sets[sp_rank],
        next_rank=sp_ranks[(sp_rank + 1) % sp_size],
        prev_rank=sp_ranks[(sp_rank - 1) % sp_size],
        self_group=made[(rank,)],
        world_ranks=members,
        _owned=tuple(owned),
        ulysses_size=u,
        ulysses_rank=ulysses_rank,
        ring_rank=ring_rank,
        ulysses_group=made[ulysses_ranks],
        ring_group=made[ring_ranks],
        ulysses_ranks=ulysses_ranks,
        ring_ranks=ring_ranks,
    )


def initialize(
    sp_size: int, *, world_group: ProcessGroup | None = None, ulysses_size: int = 1
) -> SPGroups:
    """Build the SP x DP grid over ``world_group`` (default: the whole world) and record it.

    Every rank of ``world_group`` must call this with the same ``sp_size`` (and
    ``ulysses_size``: the SP group is then a ulysses x ring grid, module doc). Arguments are
    checked before any collective, so a bad ``sp_size`` raises on every rank instead of
    hanging. Calling it again with the same arguments returns the recorded groups; with
    different ones, call `destroy()` first.
    """
    global _DEFAULT, _DEFAULT_KEY
    key = (sp_size, world_group, ulysses_size)
    if _DEFAULT is not None:
        if _DEFAULT_KEY == key:
            return _DEFAULT
        raise RuntimeError(
            f"sequence-parallel groups are already initialised as {_DEFAULT}; "
            "call seqpar_ring.groups.destroy() before initialize() with other arguments"
        )
    groups = _build(sp_size, world_group, ulysses_size)
    _DEFAULT, _DEFAULT_KEY = groups, key
    logger.info("sequence-parallel grid %s (sp_ranks %s)", groups, groups.sp_ranks)
    return groups


def get_groups() -> SPGroups:
    """The groups recorded by `initialize()` (for adapters that cannot be handed them)."""
    if _DEFAULT is None:
        raise RuntimeError(
            "sequence-parallel groups are not initialised: call "
            "seqpar_ring.groups.initialize(sp_size) (seqpar_ring.init_sp_groups) first"
        )
    return _DEFAULT


def destroy() -> None:
    """Free the groups `initialize()` created and forget them (safe to call twice)."""
    global _DEFAULT, _DEFAULT_KEY
    groups, _DEFAULT, _DEFAULT_KEY = _DEFAULT, None, None
    if groups is None or not dist.is_initialized():
        return
    for group in groups._owned:
        dist.destroy_process_group(group)


def shutdown(timeout_s: float = 600.0, *, wait: bool = True) -> None:
    """End a distributed run on every rank: wait for all ranks, free the SP groups, destroy the
    default process group. Use it instead of ``dist.barrier(); dist.destroy_process_group()``.

    Why not gloo's ``barrier``: it queues an asynchronous work that keeps the previous
    collectives (and their tensors) alive, and gloo's worker thread may free it while the
    interpreter is exiting; freeing a Python-owned tensor there needs the GIL during
    finalisation and aborts the process now and then ("terminate called without an active
    exception"). ``monitored_barrier`` runs in the calling thread, holds
    no earlier work, and names a rank that has not arrived within ``timeout_s`` instead of
    waiting forever. NCCL groups use ``barrier`` (NCCL has no monitored barrier).
    ``wait=False`` on an error path, where a peer may never arrive: tear down at once.
    """
    if not dist.is_initialized():
        destroy()
        return
    if wait and dist.get_backend() == "gloo":
        dist.monitored_barrier(timeout=timedelta(seconds=timeout_s), wait_all_ranks=True)
    elif wait:
        dist.barrier()
    destroy()
    dist.destroy_process_group()
