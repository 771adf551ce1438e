"""Local block-attention kernels: (q block, k/v block) -> (out, lse) and its backward.

Every kernel has the same two static functions (see ``torch_kernel.block_forward`` /
``block_backward`` for the contract); the ring does not know which one runs.

| name    | where       | dtypes     | packed docs | notes                            |
| ------- | ----------- | ---------- | ----------- | -------------------------------- |
| `torch` | CPU and GPU | any float  | yes         | bucketed reference, fp64-exact   |
| `cudnn` | CUDA sm80+  | bf16, fp16 | no          | fastest on H100/H200             |
| `flash` | CUDA sm80+  | bf16, fp16 | no          | FlashAttention-2 backend of SDPA |
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
    supports_doc_ids=True,
    needs_delta=True,  # takes rowsum(dout * out) precomputed once per pass
    forward=torch_kernel.block_forward,
    backward=torch_kernel.block_backward,
)

KERNELS = {"torch": TorchKernel, "cudnn": CudnnKernel, "flash": FlashKernel}
_FUSED_DTYPES = (torch.bfloat16, torch.float16)


def _cudnn_available() -> bool:
    return torch.backends.cudnn.is_available() and hasattr(
        torch.ops.aten, "_scaled_dot_product_cudnn_attention"
    )


_warned: set[str] = set()


def _warn_once(msg: str) -> None:
    if msg not in _warned:
        _warned.add(msg)
        logger.warning(msg)


def select_kernel(name: str, q: torch.Tensor, *, doc_ids: bool = False):
    """Resolve a kernel name ("auto" included) for inputs like ``q``; raise if it cannot run."""
    if name == "auto":
        if q.is_cuda and q.dtype in _FUSED_DTYPES and not doc_ids:
            name = "cudnn" if _cudnn_available() else "flash"
        else:
            name = "torch"
            if q.is_cuda:
                _warn_once("kernel='auto' runs the pure-torch kernel on CUDA (packed documents, "
                           "padding masks or fp32 inputs): correct but slow; set bucket_size "
                           "(e.g. 2048) to bound its memory")
    if name == "flex":
        # FlexAttention has no CPU backward (so no CI path) and no lse-gradient-free way to take
        # the merged lse; until a GPU-tested flex kernel lands, say so instead of faking one.
        raise NotImplementedError(
            "kernel='flex' is not implemented yet: use kernel='torch' for packed documents and "
            "masks, 'cudnn' or 'flash' for plain causal attention on GPU"
        )
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
        if doc_ids:
            raise ValueError(
                f"kernel={name!r} cannot mask packed documents; use kernel='torch' for packed "
                "sequences"
            )
    return kernel


__all__ = ["KERNELS", "select_kernel", "TorchKernel", "CudnnKernel", "FlashKernel"]
