"""Sequence-tiled gated MLP: one tile's intermediate activations live at a time.

A Llama-style MLP ``down(act(gate(x)) * up(x))`` is per token, and its intermediates are wide:
gate, up, act(gate) and their product are ``intermediate`` wide each (5632 for the 1.1B Llama
shape, 2.75 x hidden), so at 1M tokens they hold 4 x 11 GiB in bf16 for backward, and the
forward alone makes 3 of them at once even under checkpointing. Here the forward runs over
tiles of tokens under no_grad and keeps only the input; backward recomputes each tile and
forms its gradients by hand (the activation's derivative through autograd on the tile), so
memory is the input, the output gradient and one tile's intermediates.

Parameter gradients are summed over tiles in fp32 and returned once, as ordinary autograd
gradients of the weights: hooks on the parameters (DeepSpeed's, ``register_hook``) fire once
per backward as with the plain module. Under ZeRO-3 the module is best gathered whole around
its forward and backward (the tiles use the weights directly, not the child modules):
`seqpar_ring.integrations.hf_reach` marks it a DeepSpeed "leaf" module for that.

`tile_gated_mlp(module)` swaps the forward of one module instance (state-dict keys, the class
and the parameters are unchanged); `untile(module)` restores it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .tiled import TILE_ELEMENTS

__all__ = ["default_mlp_tile", "tiled_gated_mlp", "tile_gated_mlp", "untile", "is_gated_mlp",
           "is_tiled"]


def default_mlp_tile(intermediate: int) -> int:
    """Tokens per tile so one intermediate tensor holds about ``TILE_ELEMENTS`` elements."""
    return max(64, TILE_ELEMENTS // max(1, intermediate))


def _lin(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    return F.linear(x, w, b)  # what nn.Linear.forward runs: the tiles match the plain module


class _TiledGatedMLP(torch.autograd.Function):
    """y = down(act(gate(x)) * up(x)) over row tiles of x (N, hidden); see the module doc."""

    @staticmethod
    def forward(ctx, x, act, tile, wg, bg, wu, bu, wd, bd):
        out = None
        for s in range(0, x.shape[0], tile):
            xt = x[s:s + tile]
            y = _lin(act(_lin(xt, wg, bg)) * _lin(xt, wu, bu), wd, bd)
            if out is None:  # the dtype the ops produced (autocast may differ from x's)
                out = y.new_empty(x.shape[0], y.shape[1])
            out[s:s + tile] = y
        ctx.save_for_backward(x, wg, bg, wu, bu, wd, bd)
        ctx.act, ctx.tile = act, tile
        return out

    @staticmethod
    def backward(ctx, dy):
        saved = ctx.saved_tensors
        # backward runs without autocast: compute in the forward's output dtype, as it did
        x, wg, bg, wu, bu, wd, bd = (None if t is None else t.to(dy.dtype) for t in saved)
        need = ctx.needs_input_grad
        need_x, need_wg, need_bg, need_wu, need_bu, need_wd, need_bd = (
            need[0], need[3], need[4], need[5], need[6], need[7], need[8])
        dx = torch.empty(x.shape, dtype=saved[0].dtype, device=x.device) if need_x else None

        def acc(flag, p):  # fp32 (or wider) sums over tiles: each tile's product rounds once
            if not flag:
                return None
            dt = torch.promote_types(p.dtype, torch.float32)
            return torch.zeros(p.shape, dtype=dt, device=p.device)

        gwg, gbg, gwu, gbu, gwd, gbd = (acc(need_wg, wg), acc(need_bg, bg), acc(need_wu, wu),
                                        acc(need_bu, bu), acc(need_wd, wd), acc(need_bd, bd))
        for s in range(0, x.shape[0], ctx.tile):
            xt, dyt = x[s:s + ctx.tile], dy[s:s + ctx.tile]
            u, h = _lin(xt, wu, bu), _lin(xt, wg, bg)  # grad mode is off in backward
            with torch.enable_grad():  # only the activation's derivative goes through autograd
                a = ctx.act(h.requires_grad_())
            if gwd is not None:
                gwd += (dyt.t() @ (a.detach() * u)).to(gwd.dtype)
            if gbd is not None:
                gbd += dyt.sum(0, dtype=gbd.dtype)
            dprod = dyt @ wd                      # d(act(h) * u)
            du = dprod * a.detach()
            (dh,) = torch.autograd.grad(a, h, dprod * u)
            del a, u, dprod
            if dx is not None:
                dx[s:s + ctx.tile] = dh @ wg + du @ wu
            if gwg is not None:
                gwg += (dh.t() @ xt).to(gwg.dtype)
            if gbg is not None:
                gbg += dh.sum(0, dtype=gbg.dtype)
            if gwu is not None:
                gwu += (du.t() @ xt).to(gwu.dtype)
            if gbu is not None:
                gbu += du.sum(0, dtype=gbu.dtype)
            del dh, du

        def cast(g, i):
            return None if g is None else g.to(saved[i].dtype)

        return (dx, None, None, cast(gwg, 1), cast(gbg, 2), cast(gwu, 3), cast(gbu, 4),
                cast(gwd, 5), cast(gbd, 6))


def tiled_gated_mlp(x: Tensor, gate: nn.Linear, up: nn.Linear, down: nn.Linear, act,
                    tile_size: int | None = None) -> Tensor:
    """``down(act(gate(x)) * up(x))`` computed over tiles of tokens; exact up to rounding.

    Args:
        x: ``(..., hidden)``; every leading position is a token (batch and sequence).
        gate, up, down: the MLP's projections (``nn.Linear``; bias allowed).
        act: the elementwise activation (a parameter-free callable, e.g. ``nn.SiLU()``).
        tile_size: tokens per tile; None = `default_mlp_tile` of the intermediate width.
    Returns:
        ``(..., down.out_features)``, as the plain expression.
    """
    tile = tile_size or default_mlp_tile(gate.out_features)
    if tile < 1:
        raise ValueError(f"tile_size must be >= 1, got {tile_size}")
    lead = x.shape[:-1]
    flat = x.reshape(-1, x.shape[-1])
    out = _TiledGatedMLP.apply(flat, act, int(tile), gate.weight, gate.bias, up.weight, up.bias,
                               down.weight, down.bias)
    return out.view(*lead, out.shape[-1])


def is_gated_mlp(module: nn.Module) -> bool:
    """Whether ``module`` looks like a Llama/Mistral/Qwen2 MLP: plain Linear gate/up/down, act_fn.

    Modules with other trainable parameters (e.g. LoRA adapters on the projections) or
    dropout do not qualify: their forward is not the expression this module tiles.
    """
    parts = [getattr(module, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
    if not all(type(p) is nn.Linear for p in parts) or not callable(getattr(module, "act_fn", 0)):
        return False
    own = {id(p) for part in parts for p in part.parameters()}
    extra = [n for n, p in module.named_parameters() if id(p) not in own]
    drop = any(isinstance(m, nn.Dropout) and m.p > 0 for m in module.modules())
    act = module.act_fn
    return not extra and not drop and not (isinstance(act, nn.Module) and any(act.parameters()))


class _TiledForward:
    """Instance ``forward`` of a tiled MLP (callable; remembers the tile size)."""

    def __init__(self, module: nn.Module, tile_size: int | None):
        self.module, self.tile_size = module, tile_size

    def __call__(self, x: Tensor) -> Tensor:
        m = self.module
        return tiled_gated_mlp(x, m.gate_proj, m.up_proj, m.down_proj, m.act_fn, self.tile_size)


def _check_expression(module: nn.Module) -> None:
    """Refuse a module whose own forward is not down(act(gate(x)) * up(x)) (checked on 3 tokens)."""
    p = module.gate_proj.weight
    if p.device.type == "meta" or p.numel() == 0 or hasattr(p, "ds_id"):
        return  # not materialised here (meta / ZeRO-3 partitioned): nothing to compare against
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)  # a private generator: the model's RNG is untouched
        x = torch.randn(1, 3, p.shape[1], generator=g).to(p.device, p.dtype)
        want = type(module).forward(module, x)
        got = tiled_gated_mlp(x, module.gate_proj, module.up_proj, module.down_proj,
                              module.act_fn, 2)
    tol = 1e-4 if p.dtype in (torch.float32, torch.float64) else 5e-2
    err = (want.float() - got.float()).abs().max() / want.float().abs().max().clamp_min(1e-30)
    if want.shape != got.shape or not err <= tol:  # relative: weights may be tiny at init
        raise ValueError(f"{type(module).__name__}.forward is not down(act(gate(x)) * up(x)): "
                         "it cannot be tiled; set tiled_mlp=false for this model")


def tile_gated_mlp(module: nn.Module, tile_size: int | None = None) -> nn.Module:
    """Make ``module`` (a gated MLP, see `is_gated_mlp`) compute its forward over tiles.

    Only this instance's ``forward`` changes. Calling it again on a tiled module sets the tile
    size to ``tile_size`` (None keeps the current one).
    """
    if not is_gated_mlp(module):
        raise ValueError(f"{type(module).__name__} is not a plain gated MLP (nn.Linear gate_proj, "
                         "up_proj, down_proj and a parameter-free act_fn, no dropout, no "
                         "adapters): it cannot be tiled; set tiled_mlp=false")
    if is_tiled(module):
        if tile_size is not None:
            module.forward.tile_size = tile_size
        return module
    _check_expression(module)
    module.forward = _TiledForward(module, tile_size)
    return module


def is_tiled(module: nn.Module) -> bool:
    return isinstance(module.__dict__.get("forward"), _TiledForward)


def untile(module: nn.Module) -> nn.Module:
    """Undo `tile_gated_mlp` (no-op on a module that is not tiled)."""
    if is_tiled(module):
        del module.forward
    return module
