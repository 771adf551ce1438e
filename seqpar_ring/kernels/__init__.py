"""Local block-attention kernels: (q block, k/v block) -> (out, lse) and its backward.

Every kernel has the same static functions (see ``torch_kernel.block_forward`` /
``block_backward`` / ``varlen_forward`` for the contract); the ring does not know which one runs.

| name    | where       | dtypes     | varlen calls (documents) | notes                    |
| ------- | ----------- | ---------- | ------------------------ | ------------------------ |
| `torch` | CPU and GPU | any float  | per-document loop        | bucketed reference, fp64 |
| `cudnn` | CUDA sm80+  | bf16, fp16 | FlashAttention-2 varlen  | fastest on H100/H200     |
| `flash` | CUDA sm80+  | bf16, fp16 | FlashAttention-2 varlen  | FlashAttention-2 of SDPA |

Packed documents reach a kernel as dense calls on row slices (one document, or several of one
length batched) and varlen calls (several short documents end to end): see `documents.py`.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

import torch

from . import torch_kernel
from .sdpa import CudnnKernel, FlashKernel

logger = logging.getLogger("seqpar_ring")

TorchKernel = SimpleNamespace(
    name="torch",
    supports_masks=True,  # row-masked calls (dilated windows that straddle chunks)
    needs_delta=True,  # takes rowsum(dout * out) precomputed once per pass
    min_rows=1,  # takes calls of any shape (fused kernels: `documents.FUSED_MIN_ROWS`)
    forward=torch_kernel.block_forward,
    backward=torch_kernel.block_backward,
    varlen_forward=torch_kernel.varlen_forward,
    varlen_backward=torch_kernel.varlen_backward,
)

KERNELS = {"torch": TorchKernel, "cudnn": CudnnKernel, "flash": FlashKernel}
_FUSED_DTYPES = (torch.bfloat16, torch.float16)


@torch.compiler.assume_constant_result  # a property of the build: a constant for compiled code
def _cudnn_available() -> bool:
    return torch.backends.cudnn.is_available() and hasattr(
        torch.ops.aten, "_scaled_dot_product_cudnn_attention"
    )


_warned: set[str] = set()


def _warn_once(msg: str) -> None:
    if msg not in _warned:
        _warned.add(msg)
        logger.warning(msg)


def select_kernel(name: str, q: torch.Tensor, *, masked: bool = False):
    """Resolve a kernel name ("auto" included) for inputs like ``q``; raise if it cannot run.

    ``masked``: the pass needs row-masked calls, which only the torch kernel has.
    """
    if name == "auto":
        if q.is_cuda and q.dtype in _FUSED_DTYPES and not masked:
            name = "cudnn" if _cudnn_available() else "flash"
        else:
            name = "torch"
            if q.is_cuda:
                _warn_once("kernel='auto' runs the pure-torch kernel on CUDA (fp32/fp64 inputs, "
                           "or dilated segments not aligned with the shards): correct but slow; "
                           "set bucket_size (e.g. 2048) to bound its memory")
    if name not in KERNELS:
        raise ValueError(f"kernel={name!r} is not one of {('auto', *KERNELS)}")
    kernel = KERNELS[name]
    if name != "torch":
        if not q.is_cuda:
            raise ValueError(f"kernel={name!r} needs CUDA tensors; use kernel='torch' on CPU")
        if q.dtype not in _FUSED_DTYPES:
            raise ValueError(
                f"kernel={name!r} runs bf16/fp16, got {q.dtype}; cast the model or use "
                "kernel='torch'"
            )
        if masked:
            raise ValueError(
                f"kernel={name!r} cannot run dilated segments that are not aligned with the "
                "shards; use segment lengths that divide (or are multiples of) the per-rank "
                "length, or kernel='torch'"
            )
    return kernel


__all__ = ["KERNELS", "select_kernel", "TorchKernel", "CudnnKernel", "FlashKernel"]
