"""nn.Module front ends: config-driven dispatch and a drop-in for ``nn.MultiheadAttention``."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import SeqParConfig
from .dilated import dilated_attention
from .groups import SPGroups
from .ring import ring_attention
from .ulysses import ulysses_dilated_attention, ulysses_ring_attention


def sp_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    config: SeqParConfig,
    group=None,
    *,
    causal: bool = True,
    scale: float | None = None,
    doc_ids: torch.Tensor | None = None,
    agreed: bool = False,
    window: int | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run the attention ``config`` selects (ring or dilated) on (batch, seq_local, heads, dim).

    ``window`` (a causal sliding window, transformers' ``sliding_window``) and ``sinks``
    ((heads,) learned sink logits) as in `ring_attention`; dilated attention takes neither.

    ``group``: the SP process group (None = local), or the rank's `SPGroups` — required when
    ``config.ulysses_size > 1``, which runs Ulysses x ring (`seqpar_ring.ulysses`) over its
    ``ulysses_group`` and ``ring_group``. An `SPGroups` of sp_size 1 means local attention.
    ``agreed``: the caller agreed shapes and settings across the group for this step (see
    `ring_attention`).
    """
    common = dict(causal=causal, layout=config.layout, scale=scale, bucket_size=config.bucket_size,
                  kernel=config.kernel, timeout_s=config.comm_timeout_s, agreed=agreed)
    dilated = config.attention == "dilated"
    if dilated and (window is not None or sinks is not None):
        raise ValueError(
            "dilated attention has its own sparsity and takes no sliding window or attention "
            "sinks: use SeqParConfig(attention='ring') for sliding-window or sink models")
    extra = dict(window=window, sinks=sinks) if not dilated else {}
    u = config.ulysses_size
    if u != 1:
        groups = _hybrid_groups(config, group)
        if dilated:
            if doc_ids is not None:
                raise ValueError(
                    "dilated attention with ulysses_size > 1 takes unpadded rows: pad-free rows "
                    "whose length is a multiple of the layout's divisor, or ulysses_size=1"
                )
            return ulysses_dilated_attention(q, k, v, groups,
                                             segment_lengths=config.segment_lengths,
                                             dilation_rates=config.dilation_rates, **common)
        return ulysses_ring_attention(q, k, v, groups, comm=config.comm, doc_ids=doc_ids,
                                      **extra, **common)
    if isinstance(group, SPGroups):
        group = group.sp_group if group.sp_size > 1 else None
    if dilated:
        return dilated_attention(q, k, v, group, segment_lengths=config.segment_lengths,
                                 dilation_rates=config.dilation_rates, doc_ids=doc_ids, **common)
    return ring_attention(q, k, v, group, comm=config.comm, doc_ids=doc_ids, **extra, **common)


def _hybrid_groups(config: SeqParConfig, group) -> SPGroups:
    u = config.ulysses_size
    if u == "auto":
        raise ValueError("ulysses_size='auto' reached the attention unresolved: resolve it "
                         "with seqpar_ring.tools.plan.resolve_ulysses_size(config, model, "
                         "seq_len) before building the groups")
    if not isinstance(group, SPGroups):
        raise ValueError(
            f"ulysses_size={u} needs the rank's SPGroups (with its ulysses and ring groups) as "
            f"`group`, got {type(group).__name__}: pass "
            f"seqpar_ring.groups.initialize(sp_size, ulysses_size={u})"
        )
    if (group.sp_size, group.ulysses_size) != (config.sp_size, u):
        raise ValueError(
            f"config has sp_size={config.sp_size}, ulysses_size={u} but the groups are {group}: "
            f"build them with seqpar_ring.groups.initialize({config.sp_size}, ulysses_size={u})"
        )
    return group


class RingDilatedMultiheadAttention(nn.Module):
    """Self-attention over a sequence sharded across an SP group (ring or LongNet-dilated).

    Shaped like ``nn.MultiheadAttention(embed_dim, num_heads, batch_first=True)``: input and
    output are (batch, seq_local, embed_dim), each rank holding its shard in ``config.layout``.
    ``kv_heads`` < ``num_heads`` gives grouped-query attention (K/V travel with kv_heads heads).
    ``forward`` returns ``(output, None)`` — attention weights are never materialised.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        kv_heads: int | None = None,
        bias: bool = True,
        config: SeqParConfig | None = None,
        group=None,
        causal: bool = True,
        device=None,
        dtype=None,
    ):
        super().__init__()
        kv_heads = kv_heads or num_heads
        if embed_dim % num_heads or num_heads % kv_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads "
                             f"({num_heads}) "
                             f"and num_heads by kv_heads ({kv_heads})")
        self.embed_dim, self.num_heads, self.kv_heads = embed_dim, num_heads, kv_heads
        self.head_dim = embed_dim // num_heads
        self.config = config or SeqParConfig()
        self.group, self.causal = group, causal
        kw = dict(bias=bias, device=device, dtype=dtype)
        self.q_proj = nn.Linear(embed_dim, embed_dim, **kw)
        self.kv_proj = nn.Linear(embed_dim, 2 * kv_heads * self.head_dim, **kw)
        self.out_proj = nn.Linear(embed_dim, embed_dim, **kw)

    def forward(self, x: torch.Tensor, need_weights: bool = False):
        if need_weights:
            raise ValueError("need_weights=True would materialise the (S x S) attention matrix; "
                             "RingDilatedMultiheadAttention never does")
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, self.num_heads, self.head_dim)
        k, v = self.kv_proj(x).view(b, n, 2, self.kv_heads, self.head_dim).unbind(2)
        out = sp_attention(q, k, v, self.config, self.group, causal=self.causal)
        return self.out_proj(out.reshape(b, n, self.embed_dim)), None

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, "
                f"kv_heads={self.kv_heads}, "
                f"attention={self.config.attention}, layout={self.config.layout}")


def reference_forward(module: RingDilatedMultiheadAttention, x_full: torch.Tensor) -> torch.Tensor:
    """Single-device dense result of ``module`` on the full sequence (for checks and demos)."""
    b, s, _ = x_full.shape
    q = module.q_proj(x_full).view(b, s, module.num_heads, module.head_dim).transpose(1, 2)
    k, v = module.kv_proj(x_full).view(b, s, 2, module.kv_heads, module.head_dim).unbind(2)
    rep = module.num_heads // module.kv_heads
    k = k.transpose(1, 2).repeat_interleave(rep, 1)
    v = v.transpose(1, 2).repeat_interleave(rep, 1)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=module.causal)
    return module.out_proj(out.transpose(1, 2).reshape(b, s, module.embed_dim))
