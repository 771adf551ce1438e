"""Input checks of the attention entry points: local rules, folded into one agreement.

Every rule that can fail on one rank (shapes, dtypes, settings) runs locally first; its error,
if any, travels in the same agreement exchange as the shapes and settings that must match
(`seqpar_ring.agreement`), so a mistake on any rank is an error on every rank — never a hang,
never silently mixed shapes — before any ring traffic.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch

from . import comm as C
from . import stage
from .agreement import AgreementError, agree, collect_error

__all__ = ["check_inputs", "shape_rules"]


def shape_rules(q, k, v) -> None:
    """The (batch, seq_local, heads, head_dim) rules every attention entry point shares."""
    if any(not isinstance(x, torch.Tensor) for x in (q, k, v)):
        raise ValueError("q, k, v must be tensors")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"expected q, k, v of shape (batch, seq_local, heads, head_dim), "
                         f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"k and v must be (batch, seq_local, kv_heads, head_dim) "
                         f"matching q {tuple(q.shape)}; got k {tuple(k.shape)}, v "
                         f"{tuple(v.shape)}")
    if 0 in q.shape or 0 in k.shape:
        raise ValueError(f"empty input {tuple(q.shape)}: every rank needs at least one "
                         "token of every row (pad the rows to a multiple of the layout's divisor)")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"heads ({q.shape[2]}) must be a multiple of kv_heads "
                         f"({k.shape[2]})")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise ValueError(f"q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype}); "
                         "cast them to one floating dtype")
    if not q.is_floating_point():
        raise ValueError(f"q, k, v must be floating point, got {q.dtype}")
    if q.device != k.device or q.device != v.device:
        raise ValueError(f"q, k, v are on different devices ({q.device}, {k.device}, "
                         f"{v.device})")


def check_inputs(q, k, v, group, *, what: str, settings: Mapping[str, Any] | None = None,
                 local: Callable[[], None] | None = None, agreed: bool = False,
                 timeout_s: float = C.DEFAULT_TIMEOUT_S) -> None:
    """Run ``local`` rules and the shape rules; agree shapes, ``settings`` and errors over
    ``group`` (skipped when the caller already agreed for this step: ``agreed=True``).

    Raises `AgreementError` (a ValueError) on every rank when any rank fails.
    """
    def rules():
        shape_rules(q, k, v)
        # NCCL with CPU tensors: raise here, with the fix, not as a hang in the first exchange
        # (gloo with CUDA tensors is staged through the host by the transport: no error).
        why = stage.carry_error(group, q.device)
        if why is not None:
            raise ValueError(why)
        if local is not None:
            local()

    error = collect_error(rules)
    if agreed:
        if error is not None:
            raise AgreementError(f"{what}: {error}")
        return
    fields = dict(settings or {})
    fields.update(
        q=tuple(getattr(q, "shape", ())), k=tuple(getattr(k, "shape", ())),
        v=tuple(getattr(v, "shape", ())), dtype=str(getattr(q, "dtype", None)),
        device=getattr(getattr(q, "device", None), "type", None),
        backward=bool(torch.is_grad_enabled() and any(
            getattr(x, "requires_grad", False) for x in (q, k, v))),
    )
    agree(group, what, fields, error=error, timeout_s=timeout_s)
