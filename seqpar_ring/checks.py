"""Input checks of the attention entry points: local shape rules, then agreement across the ring.

Run before any ring traffic, so bad input is an error on every rank (naming the field and each
rank's value) instead of a hang or silently mixed shapes.
"""

from __future__ import annotations

import torch

from . import comm as C


def check_inputs(q, k, v, group, *, what: str, extra: dict[str, int] | None = None) -> None:
    """Local shape rules, then agreement of every rank of the group — before any ring traffic."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"{what}: expected q, k, v of shape (batch, seq_local, heads, head_dim), "
                         f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"{what}: k and v must be (batch, seq_local, kv_heads, head_dim) "
                         "matching q "
                         f"{tuple(q.shape)}; got k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"{what}: heads ({q.shape[2]}) must be a multiple of kv_heads "
                         f"({k.shape[2]})")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise ValueError(f"{what}: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    meta = dict(batch=q.shape[0], seq_local=q.shape[1], heads=q.shape[2], kv_heads=k.shape[2],
                head_dim=q.shape[3], dtype=_DTYPE_CODES.get(q.dtype, -1), **(extra or {}))
    C.agree(meta, group, what)


_DTYPE_CODES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3}
