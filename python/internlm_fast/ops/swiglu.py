"""SwiGLU, the gated activation of the InternLM / LLaMA MLP, fused into one pass.

swiglu(gate, up) = silu(gate) * up
swiglu_packed(x) = silu(x[..., :F]) * x[..., F:] for x of shape [..., 2F]  (one [..., 2F] gradient)

silu keeps its limits at the infinities: silu(-inf) = 0, silu(+inf) = inf, with gradients 0 and 1
(torch's F.silu gives NaN for all but silu(+inf)); NaN stays NaN.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _checks, backend


def _silu_ref(g: Tensor) -> Tensor:
    # F.silu is -inf * 0 = NaN at -inf and its gradient inf * 0 = NaN at +-inf; the inner where keeps
    # the infinities out of F.silu so no NaN reaches autograd either
    ninf, pinf = g == -math.inf, g == math.inf
    safe = F.silu(torch.where(ninf | pinf, 0, g))
    return torch.where(ninf, 0, torch.where(pinf, g, safe))


def swiglu_ref(gate: Tensor, up: Tensor) -> Tensor:
    """Pure-torch SwiGLU: the oracle. Computes in fp32 (fp64 for fp64 inputs)."""
    acc = torch.float64 if gate.dtype == torch.float64 else torch.float32
    return (_silu_ref(gate.to(acc)) * up.to(acc)).to(gate.dtype)


def swiglu_packed_ref(x: Tensor) -> Tensor:
    """Pure-torch packed SwiGLU: the oracle. x is [..., 2F]: gate first, then up."""
    gate, up = x.chunk(2, dim=-1)
    return swiglu_ref(gate, up)


def _check(gate: object, up: object) -> None:
    gate = _checks.tensor("gate", gate)
    up = _checks.tensor("up", up)
    _checks.same_device("gate", gate, up=up)
    _checks.same_dtype("gate", gate, up=up)
    _checks.same_shape("gate", gate, up=up)
    _checks.unit_last_stride("gate", gate)
    _checks.unit_last_stride("up", up)


def _check_packed(x: object) -> int:
    x = _checks.tensor("x", x)
    if x.shape[-1] % 2:
        raise ValueError(f"x's last dimension must be even (gate and up halves), got shape {tuple(x.shape)}")
    _checks.unit_last_stride("x", x)
    return x.shape[-1] // 2


def _rows(t: Tensor) -> Tensor:
    """t as (rows, last dim) for the kernels: a view when the leading dims collapse, so row-strided
    inputs (the halves of a packed tensor, slices) are read in place; a copy otherwise."""
    return t.reshape(math.prod(t.shape[:-1]), t.shape[-1])


# ---- custom ops: forward and backward each a torch.library op, so torch.compile sees them ----
# Both variants run the same two kernels; the packed one hands them the halves of x as views.


@torch.library.custom_op("internlm_fast::swiglu_fwd", mutates_args=())
def _fwd(gate: Tensor, up: Tensor, impl: str) -> Tensor:
    return backend.kernels(impl).swiglu_fwd(gate, up)


@torch.library.custom_op("internlm_fast::swiglu_bwd", mutates_args=())
def _bwd(dout: Tensor, gate: Tensor, up: Tensor, impl: str) -> tuple[Tensor, Tensor]:
    dgate, dup = backend.kernels(impl).swiglu_bwd(dout, gate, up, False)
    return dgate, dup


@torch.library.custom_op("internlm_fast::swiglu_packed_fwd", mutates_args=())
def _packed_fwd(x: Tensor, impl: str) -> Tensor:
    f = x.shape[1] // 2
    return backend.kernels(impl).swiglu_fwd(x[:, :f], x[:, f:])


@torch.library.custom_op("internlm_fast::swiglu_packed_bwd", mutates_args=())
def _packed_bwd(dout: Tensor, x: Tensor, impl: str) -> Tensor:
    f = x.shape[1] // 2
    (dx,) = backend.kernels(impl).swiglu_bwd(dout, x[:, :f], x[:, f:], True)
    return dx


@_fwd.register_fake
def _(gate, up, impl):
    return gate.new_empty(gate.shape)


@_bwd.register_fake
def _(dout, gate, up, impl):
    return gate.new_empty(gate.shape), gate.new_empty(gate.shape)


@_packed_fwd.register_fake
def _(x, impl):
    return x.new_empty(x.shape[0], x.shape[1] // 2)


@_packed_bwd.register_fake
def _(dout, x, impl):
    return x.new_empty(x.shape)


# forward saves its inputs only: the backward recomputes the sigmoid rather than keep it


def _setup(ctx, inputs, output):
    ctx.impl = inputs[-1]
    ctx.save_for_backward(inputs[0], inputs[1])


def _backward(ctx, dout):
    gate, up = ctx.saved_tensors
    dgate, dup = _bwd(dout.contiguous(), gate, up, ctx.impl)
    return dgate, dup, None


def _packed_setup(ctx, inputs, output):
    ctx.impl = inputs[-1]
    ctx.save_for_backward(inputs[0])


def _packed_backward(ctx, dout):
    (x,) = ctx.saved_tensors
    return _packed_bwd(dout.contiguous(), x, ctx.impl), None


_fwd.register_autograd(_backward, setup_context=_setup)
_packed_fwd.register_autograd(_packed_backward, setup_context=_packed_setup)


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """``silu(gate) * up`` in one pass; gate and up of one shape (any leading dims) and dtype."""
    _check(gate, up)
    impl = backend.select("swiglu", gate)
    if impl == "ref":
        return swiglu_ref(gate, up)
    out = _fwd(_rows(gate), _rows(up), impl)
    return out.view(gate.shape)


def swiglu_packed(x: Tensor) -> Tensor:
    """``silu(x[..., :F]) * x[..., F:]`` for x of shape [..., 2F]; returns [..., F]. Its gradient is
    one [..., 2F] tensor, so the gate and up projections can be one fused matmul."""
    f = _check_packed(x)
    impl = backend.select("swiglu", x)
    if impl == "ref":
        return swiglu_packed_ref(x)
    out = _packed_fwd(_rows(x), impl)
    return out.view(*x.shape[:-1], f)
