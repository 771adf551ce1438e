"""Shared helpers of the exactness tests: seeded inputs, sharded forward/backward, comparisons.

Inputs are drawn in fp32 and the references run on their exact fp64 copies, so one fp64
reference serves both the fp32 and the fp64 runs of the implementation.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from reference import shard_reference

NAMES = ("out", "dq", "dk", "dv")
# (atol, rtol) for (forward, gradients); docs/dilated.md: fp32 1e-5 forward, 1e-4 gradients.
DENSE_TOL = {torch.float32: (1e-5, 1e-5), torch.float64: (1e-10, 1e-10)}
DILATED_TOL = {torch.float32: ((1e-5, 1e-5), (1e-4, 1e-5)), torch.float64: ((1e-10, 1e-10),) * 2}


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Tiny ops on a busy 2-core machine run ~100x faster on one intra-op thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def make_inputs(
    seed: int, batch: int, seq: int, heads: int, kv_heads: int, head_dim: int
) -> dict[str, torch.Tensor]:
    """q, dout (B, S, H, D) and k, v (B, S, Hkv, D), fp32, identical on every rank."""
    g = torch.Generator().manual_seed(seed)
    return {
        "q": torch.randn(batch, seq, heads, head_dim, generator=g),
        "k": torch.randn(batch, seq, kv_heads, head_dim, generator=g),
        "v": torch.randn(batch, seq, kv_heads, head_dim, generator=g),
        "dout": torch.randn(batch, seq, heads, head_dim, generator=g),
    }


def reference_fwd_bwd(fn: Callable[..., torch.Tensor], data: dict) -> dict[str, torch.Tensor]:
    """fn(q, k, v) on fp64 copies of ``data``; returns out and dq/dk/dv (fp64, full length)."""
    leaves = [data[n].double().requires_grad_(True) for n in ("q", "k", "v")]
    out = fn(*leaves)
    out.backward(data["dout"].double())
    return {"out": out.detach(), "dq": leaves[0].grad, "dk": leaves[1].grad, "dv": leaves[2].grad}


def sharded_fwd_bwd(
    call: Callable[..., torch.Tensor],
    data: dict,
    sp_size: int,
    sp_rank: int,
    layout: str,
    dtype: torch.dtype,
    backward: bool = True,
) -> list[torch.Tensor | None]:
    """Shard q/k/v/dout with seqpar_ring.layout.shard, run ``call(q_l, k_l, v_l)`` and backward.

    Returns [out, dq, dk, dv] of this rank (grads None when ``backward`` is False).
    """
    from seqpar_ring.layout import shard

    def local(name: str) -> torch.Tensor:
        return shard(data[name].to(dtype), sp_size, sp_rank, layout, dim=1).contiguous()

    q, k, v = (local(n).requires_grad_(backward) for n in ("q", "k", "v"))
    before = [x.detach().clone() for x in (q, k, v)]
    out = call(q, k, v)
    for name, x, x0 in zip("qkv", (q, k, v), before):
        assert torch.equal(x.detach(), x0), f"the call modified its input {name} in place"
    if not backward:
        return [out.detach(), None, None, None]
    out.backward(local("dout"))
    return [out.detach(), q.grad, k.grad, v.grad]


def shard_expected(ref: dict, sp_size: int, sp_rank: int, layout: str) -> list[torch.Tensor]:
    """The rows of the full-sequence reference that this rank must produce."""
    return [shard_reference(ref[n], sp_size, sp_rank, layout) for n in NAMES]


def assert_close(
    got: Sequence[torch.Tensor | None],
    want: Sequence[torch.Tensor],
    tol: Sequence[tuple[float, float]],
    ctx: str,
    dtype: torch.dtype | None = None,
    names: Sequence[str] = NAMES,
) -> None:
    """|got - want| <= atol + rtol * |want| elementwise; ``tol[i]`` is (atol, rtol) of item i
    (the last entry repeats). Raises AssertionError naming the case, tensor and max error."""
    for i, (name, a, b) in enumerate(zip(names, got, want)):
        atol, rtol = tol[min(i, len(tol) - 1)]
        if a is None:
            raise AssertionError(f"{ctx}: {name} is None (no gradient reached the input)")
        if tuple(a.shape) != tuple(b.shape):
            raise AssertionError(f"{ctx}: {name} shape {tuple(a.shape)}, expected {tuple(b.shape)}")
        if dtype is not None and a.dtype != dtype:
            raise AssertionError(f"{ctx}: {name} dtype {a.dtype}, expected {dtype}")
        if not torch.isfinite(a).all():
            bad = (~torch.isfinite(a)).nonzero()[0].tolist()
            raise AssertionError(f"{ctx}: {name} has non-finite values (first at {bad})")
        err = (a.double() - b.double()).abs()
        over = err > atol + rtol * b.double().abs()
        if over.any():
            first = over.nonzero()[0].tolist()
            raise AssertionError(
                f"{ctx}: {name} max abs err {err.max().item():.3e} (atol {atol:.0e}, rtol "
                f"{rtol:.0e}); {int(over.sum())}/{over.numel()} elements out of tolerance, "
                f"first at index {first} (got {a.double()[tuple(first)].item():.6g}, "
                f"want {b.double()[tuple(first)].item():.6g})"
            )


def expect_error(fn: Callable[[], Any], ctx: str) -> str:
    """Run fn, which must raise ValueError or RuntimeError; return the message."""
    try:
        fn()
    except (ValueError, RuntimeError) as err:
        return f"{type(err).__name__}: {err}"
    raise AssertionError(f"{ctx}: expected ValueError/RuntimeError, nothing was raised")


def to_bytes(obj: Any) -> bytes:
    """Serialise tensors for the spawned ranks (avoids one shared-memory fd per tensor)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def from_bytes(blob: bytes) -> Any:
    return torch.load(io.BytesIO(blob), weights_only=True)


def band_prim(log: list):
    """`kernels/band.py`'s primitives on the torch kernel (standing in for cuDNN's causal calls
    and FlashAttention's window); every call appends "causal" or "band" to ``log``."""
    from types import SimpleNamespace

    from seqpar_ring.kernels import torch_kernel as T

    def rec(name, fn):
        def call(*a):
            log.append(name)
            return fn(*a)
        return call

    return SimpleNamespace(
        causal_forward=rec("causal", lambda q, k, v, s: T.block_forward(
            q, k, v, causal=True, scale=s)),
        causal_backward=rec("causal", lambda do, q, k, v, o, l_, s, d: T.block_backward(
            do, q, k, v, o, l_, causal=True, scale=s, delta=d)),
        band_forward=rec("band", lambda q, k, v, b, s: T.block_forward(
            q, k, v, causal=False, scale=s, band=b)),
        band_backward=rec("band", lambda do, q, k, v, o, l_, b, s, d: T.block_backward(
            do, q, k, v, o, l_, causal=False, scale=s, band=b, delta=d)),
    )
