"""Agreement of the ranks of a group before they communicate: one small all-gather.

Every collective of the ring needs the same shapes and settings on every rank; a rank whose
input differs would deadlock its peers (or corrupt data silently), and a check that fails on
one rank only would leave the others waiting in their next collective. So each entry point
folds its local checks into one exchange of fixed size: the operation's name, an error flag
and a digest of the fields that must match (shapes, dtype, settings that change the function).
Then either all ranks go on, or all raise the same `AgreementError` naming the rank and the
field — and the group stays usable, since every rank took part in the same collective.

Cost: one all-gather of ~100 bytes and one read on the host. The HF adapter pays it once per
model forward (the batch's signature); per-layer attention calls then pass ``agreed=True``
and only run the local rules, which fail identically on every rank once the inputs agree.
"""

from __future__ import annotations

import zlib
from typing import Any, Callable, Mapping

import torch
import torch.distributed as dist

from . import comm as C

__all__ = ["AgreementError", "agree", "collect_error", "fingerprint", "stats"]


class _Stats:
    """How many agreement exchanges this process made (to check the hot path has none)."""

    exchanges: int = 0

    def reset(self) -> None:
        self.exchanges = 0


stats = _Stats()


class AgreementError(ValueError):
    """Raised on every rank of a group when one rank's input or settings are invalid or differ
    from the others'. A ValueError: the fix is always in the caller's input."""


def fingerprint(value: Any) -> int:
    """A stable 63-bit integer for any value with a deterministic repr (settings, tuples)."""
    if isinstance(value, bool) or (isinstance(value, int) and abs(value) < 2**62):
        return int(value)
    return zlib.crc32(repr(value).encode()) | (1 << 62)


def collect_error(check: Callable[[], None]) -> str | None:
    """Run local checks; return the message of the ValueError they raise (None if they pass)."""
    try:
        check()
    except ValueError as err:
        return str(err)
    return None


def agree(group, what: str, fields: Mapping[str, Any], *, error: str | None = None,
          timeout_s: float = C.DEFAULT_TIMEOUT_S) -> None:
    """All ranks of ``group`` confirm they run ``what`` with equal ``fields`` and no ``error``.

    ``fields``: name -> value that must be equal on every rank (compared by `fingerprint`,
    shown by repr in the error). ``error``: this rank's failed local check, if any. Raises
    `AgreementError` on every rank, or nothing on any. A group of one rank (or None) raises
    ``error`` locally. Waits at most ``timeout_s``.
    """
    if C.group_size(group) == 1:
        if error is not None:
            raise AgreementError(f"{what}: {error}")
        return
    keys = sorted(fields)
    op = fingerprint((what, *keys))
    stats.exchanges += 1
    # Fixed size on every rank, whatever the fields: a collective whose sizes differ across
    # ranks kills gloo processes and is undefined on NCCL. The fields travel as one digest;
    # only the failure path exchanges them in full.
    digest = fingerprint(tuple((k, fingerprint(fields[k])) for k in keys))
    local = torch.tensor([op, int(error is not None), digest], dtype=torch.int64)
    rows = C.all_gather_small(local.to(C.comm_device(group)), group, timeout_s,
                              f"{what} (agreement)")
    rows = rows.view(C.group_size(group), -1).tolist()
    if len({row[0] for row in rows}) > 1:
        mine = [r for r, row in enumerate(rows) if row[0] == op]
        raise AgreementError(
            f"{what}: the ranks of the sequence-parallel group are in different operations "
            f"(ranks {mine} are in {what}, the others elsewhere): every SP rank must run the same "
            "model code on the same step — check rank-dependent branches (e.g. `if rank == 0`)"
        )
    errors = [r for r, row in enumerate(rows) if row[1]]
    if not errors and len({row[2] for row in rows}) == 1:
        return
    # The failure path: every rank takes part, so the messages and values travel too.
    mine = {"error": error, "fields": {k: repr(fields[k]) for k in keys}}
    every: list[Any] = [None] * C.group_size(group)
    dist.all_gather_object(every, mine, group=group)
    differ = [k for k in keys if len({e["fields"][k] for e in every}) > 1]
    if errors:
        detail = "; ".join(f"rank {r}: {every[r]['error']}" for r in errors)
        raise AgreementError(f"{what}: {detail}")
    detail = "; ".join(
        f"{k}: " + ", ".join(f"rank{r}={e['fields'][k]}" for r, e in enumerate(every))
        for k in differ)
    raise AgreementError(
        f"{what}: ranks of the sequence-parallel group disagree on {detail}. Every SP rank must "
        "pass the same batch/heads/head_dim/dtype, the same settings and an equal share of the "
        "sequence (shard with SPDataCollator or seqpar_ring.shard_batch, which pad to the "
        "layout's multiple)"
    )
