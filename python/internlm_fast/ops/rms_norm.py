"""RMSNorm, optionally fused with the residual add before it (flash-attn's `rms_norm` semantics).

y = x / sqrt(mean(x^2) + eps) * weight
rms_norm(x, w, residual=r) -> (rms_norm(x + r, w), x + r)
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _checks, backend


def rms_norm_ref(
    x: Tensor, weight: Tensor, eps: float = 1e-6, residual: Tensor | None = None
) -> Tensor | tuple[Tensor, Tensor]:
    """Pure-torch RMSNorm: the oracle. Accumulates in fp32 (fp64 for fp64 inputs)."""
    if residual is not None:
        x = x + residual
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.to(acc)
    y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.to(acc)).to(x.dtype)
    return (y, x) if residual is not None else y


def _check(x: object, weight: object, eps: object, residual: object) -> float:
    x = _checks.tensor("x", x)
    weight = _checks.tensor("weight", weight, dim=1)
    if weight.shape[0] != x.shape[-1]:
        raise ValueError(f"weight has {weight.shape[0]} elements but x's last dimension is {x.shape[-1]}")
    _checks.same_device("x", x, weight=weight)
    if residual is not None:
        _checks.tensor("residual", residual)
        _checks.same_shape("x", x, residual=residual)
        _checks.same_dtype("x", x, residual=residual)
        _checks.same_device("x", x, residual=residual)
    return _checks.finite_float("eps", eps, positive=True)


# ---- custom ops: forward and backward each a torch.library op, so torch.compile sees them ----


@torch.library.custom_op("internlm_fast::rms_norm_fwd", mutates_args=())
def _fwd(x: Tensor, weight: Tensor, eps: float, impl: str) -> tuple[Tensor, Tensor]:
    y, _, rstd = backend.kernels(impl).rms_norm_fwd(x, weight, None, eps)
    return y, rstd


@torch.library.custom_op("internlm_fast::add_rms_norm_fwd", mutates_args=())
def _add_fwd(x: Tensor, residual: Tensor, weight: Tensor, eps: float, impl: str) -> tuple[Tensor, Tensor, Tensor]:
    y, res_out, rstd = backend.kernels(impl).rms_norm_fwd(x, weight, residual, eps)
    return y, res_out, rstd


@torch.library.custom_op("internlm_fast::rms_norm_bwd", mutates_args=())
def _bwd(dy: Tensor, x: Tensor, weight: Tensor, rstd: Tensor, dres: Tensor | None, impl: str) -> tuple[Tensor, Tensor]:
    dx, dw = backend.kernels(impl).rms_norm_bwd(dy, x, weight, rstd, dres)
    return dx, dw


def _rstd_like(x: Tensor) -> Tensor:
    return x.new_empty(x.shape[0], dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)


@_fwd.register_fake
def _(x, weight, eps, impl):
    return torch.empty_like(x), _rstd_like(x)


@_add_fwd.register_fake
def _(x, residual, weight, eps, impl):
    return torch.empty_like(x), torch.empty_like(x), _rstd_like(x)


@_bwd.register_fake
def _(dy, x, weight, rstd, dres, impl):
    return torch.empty_like(x), torch.empty_like(weight)


def _setup(ctx, inputs, output):
    ctx.impl = inputs[-1]
    ctx.save_for_backward(inputs[0], inputs[1], output[1])


def _backward(ctx, dy, _drstd):
    x, weight, rstd = ctx.saved_tensors
    dx, dw = _bwd(dy.contiguous(), x, weight, rstd, None, ctx.impl)
    return dx, dw, None, None


def _add_setup(ctx, inputs, output):
    ctx.impl = inputs[-1]
    ctx.save_for_backward(output[1], inputs[2], output[2])  # backward reads the sum x + residual


def _add_backward(ctx, dy, dres_out, _drstd):
    s, weight, rstd = ctx.saved_tensors
    dres = dres_out.contiguous() if dres_out is not None else None
    ds, dw = _bwd(dy.contiguous(), s, weight, rstd, dres, ctx.impl)
    return ds, ds, dw, None, None


_fwd.register_autograd(_backward, setup_context=_setup)
_add_fwd.register_autograd(_add_backward, setup_context=_add_setup)


def rms_norm(
    x: Tensor, weight: Tensor, eps: float = 1e-6, residual: Tensor | None = None
) -> Tensor | tuple[Tensor, Tensor]:
    """RMSNorm over the last dimension of `x` (any leading shape).

    With `residual`, normalises ``x + residual`` in one pass and returns ``(y, x + residual)``.
    """
    eps = _check(x, weight, eps, residual)
    x, weight = _checks.last_dim_contiguous("x", x), _checks.last_dim_contiguous("weight", weight)
    if residual is not None:
        residual = _checks.last_dim_contiguous("residual", residual)
    impl = backend.select("rms_norm", x)
    if impl == "ref":
        return rms_norm_ref(x, weight, eps, residual)
    shape = x.shape
    x2 = x.view(-1, shape[-1])
    if residual is None:
        y, _ = _fwd(x2, weight, eps, impl)
        return y.view(shape)
    y, s, _ = _add_fwd(x2, residual.view(-1, shape[-1]), weight, eps, impl)
    return y.view(shape), s.view(shape)
