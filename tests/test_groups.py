"""SP x DP grid: ranks, group members, ring neighbours, collectives and the DeepSpeed mpu.

One spawn per world size loops over every valid sp_size (destroy() in between).
"""

import pytest
import torch
import torch.distributed as dist

from seqpar_ring import groups as G
from tests._dist import run_distributed


def expected_grid(world: int, sp: int, rank: int) -> dict:
    """Independent table: SP groups are consecutive ranks, DP groups strided by sp."""
    table = [[d * sp + s for s in range(sp)] for d in range(world // sp)]  # table[dp][sp]
    dp_rank, sp_rank = next((d, s) for d in range(world // sp) for s in range(sp)
                            if table[d][s] == rank)
    return dict(
        sp_rank=sp_rank,
        dp_rank=dp_rank,
        sp_ranks=tuple(table[dp_rank]),
        dp_ranks=tuple(row[sp_rank] for row in table),
        next_rank=table[dp_rank][(sp_rank + 1) % sp],
        prev_rank=table[dp_rank][(sp_rank + sp - 1) % sp],
    )


def _check_one(rank: int, world: int, sp: int) -> None:
    g = G.initialize(sp)
    assert G.get_groups() is g and G.initialize(sp) is g  # recorded, idempotent
    exp = expected_grid(world, sp, rank)
    for key, value in exp.items():
        assert getattr(g, key) == value, (world, sp, rank, key, getattr(g, key), value)
    assert (g.sp_size, g.dp_size, g.rank) == (sp, world // sp, rank)
    assert str(g) == f"SP({sp})-DP({world // sp})-rank({rank})"
    assert str(g) in g.describe() and f"*{rank}" in g.describe()
    ranks = dist.get_process_group_ranks
    assert tuple(ranks(g.sp_group)) == exp["sp_ranks"]
    assert tuple(ranks(g.dp_group)) == exp["dp_ranks"]
    assert tuple(ranks(g.sp_dp_group)) == tuple(range(world))
    assert tuple(ranks(g.self_group)) == (rank,)

    # real collectives: sums of (rank + 1) over each group
    for group, members in ((g.sp_group, exp["sp_ranks"]), (g.dp_group, exp["dp_ranks"]),
                           (g.sp_dp_group, range(world)), (g.self_group, (rank,))):
        t = torch.tensor([float(rank + 1)])
        dist.all_reduce(t, group=group)
        assert t.item() == sum(r + 1 for r in members)

    # DeepSpeed mpu protocol (every getter DeepSpeed 0.19.8 calls)
    assert g.get_data_parallel_world_size() == world // sp
    assert g.get_data_parallel_rank() == exp["dp_rank"]
    assert g.get_data_parallel_group() is g.dp_group
    assert g.get_data_parallel_group_ranks() == list(exp["dp_ranks"])
    assert g.get_sequence_parallel_world_size() == sp
    assert g.get_sequence_parallel_rank() == exp["sp_rank"]
    assert g.get_sequence_parallel_group() is g.sp_group
    assert g.get_sequence_data_parallel_world_size() == world
    assert g.get_sequence_data_parallel_rank() == rank
    assert dist.get_rank(g.get_sequence_data_parallel_group()) == rank
    for kind in ("model", "tensor_model", "slice", "pipeline_model", "pipe"):
        assert getattr(g, f"get_{kind}_parallel_world_size")() == 1
        assert getattr(g, f"get_{kind}_parallel_rank")() == 0
        assert getattr(g, f"get_{kind}_parallel_group")() is g.self_group
    assert g.get_tensor_model_parallel_src_rank() == rank
    assert not hasattr(g, "initialize_sequence_parallel")  # DeepSpeed would drop the DP group
    for group, size, grank in ((g.sp_group, sp, exp["sp_rank"]),
                               (g.dp_group, world // sp, exp["dp_rank"])):
        assert dist.get_world_size(group) == size and dist.get_rank(group) == grank
    G.destroy()


def _body(rank: int, world: int) -> list[int]:
    done = []
    for sp in (d for d in range(1, world + 1) if world % d == 0):
        _check_one(rank, world, sp)
        done.append(sp)
    # invalid sp_size: raised on every rank before any collective (so no hang)
    bad = next((s for s in range(2, world + 2) if world % s), world + 1)
    for value, pattern in ((bad, rf"world_size\({world}\) % sp_size\({bad}\) != 0"),
                           (0, "sp_size=0"), (-1, "sp_size=-1")):
        with pytest.raises(ValueError, match=pattern):
            G.initialize(value)
    with pytest.raises(RuntimeError, match="destroy"):
        G.initialize(world)
        G.initialize(1 if world > 1 else 2)
    G.destroy()
    G.destroy()  # twice is fine
    with pytest.raises(RuntimeError, match="initialize"):
        G.get_groups()
    if world == 4:  # a grid inside a sub-world: two independent halves with sp=2
        halves = [dist.new_group([0, 1]), dist.new_group([2, 3])]
        g = G.initialize(2, world_group=halves[rank // 2])
        assert g.sp_ranks == (rank // 2 * 2, rank // 2 * 2 + 1) and g.dp_size == 1
        t = torch.tensor([1.0])
        dist.all_reduce(t, group=g.sp_group)
        assert t.item() == 2.0
        G.destroy()
    return done


@pytest.mark.parametrize("world", [2, 3, 4, 6])
def test_grid(world):
    done = run_distributed(_body, world, timeout=120)
    assert done[0] == [d for d in range(1, world + 1) if world % d == 0]


def test_grid_world_1_in_process():
    # world 1 needs no other process: a gloo group over an in-memory store saves a spawn
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        assert _body(0, 1) == [1]
    finally:
        G.destroy()
        dist.destroy_process_group()


def test_needs_initialised_dist():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="init_process_group"):
        G.initialize(2)


def test_invalid_sp_message_lists_divisors():
    # the documented message, checked without spawning (the spawned test checks the raise)
    assert G._divisors(6) == (1, 2, 3, 6)
