"""Flatten and scale: copy a list of tensors end to end into one flat buffer, multiplied by a scale.

The sharded optimizer gathers a bucket's gradients this way before reducing them (scale = 1/world,
so the reduction sums averages and bf16 sums stay in range). One kernel call per bucket: no
per-parameter Python loop on the hot path.

flatten_scale_(out, tensors, scale): out[o_i : o_i + n_i] = scale * tensors[i].flatten(), with
o_0 = 0 and o_{i+1} = o_i + n_i; elements of out after the last tensor are not touched.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from . import _checks, backend

# (tensors' dtype) -> dtypes `out` may have: the same, or fp32 for the 16-bit types
_OUT_DTYPES = {
    torch.float32: (torch.float32,),
    torch.float64: (torch.float64,),
    torch.bfloat16: (torch.bfloat16, torch.float32),
    torch.float16: (torch.float16, torch.float32),
}


def flatten_scale_ref(out: Tensor, tensors: Sequence[Tensor], scale: float = 1.0) -> Tensor:
    """Pure-torch flatten and scale: the oracle. The product is taken in fp32 (fp64 for fp64)."""
    offset = 0
    for t in tensors:
        acc = torch.float64 if t.dtype == torch.float64 else torch.float32
        n = t.numel()
        out[offset : offset + n].copy_((t.reshape(-1).to(acc) * scale).to(out.dtype))
        offset += n
    return out


def _check(out: object, tensors: object, scale: object) -> tuple[Tensor, list[Tensor], float]:
    out = _checks.tensor("out", out, dim=1)
    if not out.is_contiguous():
        raise ValueError(f"out must be contiguous, got strides {tuple(out.stride())}")
    if isinstance(tensors, Tensor) or not isinstance(tensors, Sequence):
        raise TypeError(f"tensors must be a list of tensors, got {type(tensors).__name__}")
    tensors = [_checks.tensor(f"tensors[{i}]", t, min_dim=0) for i, t in enumerate(tensors)]
    if tensors:
        first = tensors[0]
        for i, t in enumerate(tensors):
            _checks.same_dtype("tensors[0]", first, **{f"tensors[{i}]": t})
            _checks.same_device("out", out, **{f"tensors[{i}]": t})
        if out.dtype not in _OUT_DTYPES[first.dtype]:
            allowed = ", ".join(str(d).removeprefix("torch.") for d in _OUT_DTYPES[first.dtype])
            raise TypeError(f"out has dtype {out.dtype} but tensors are {first.dtype}: out must be one of {allowed}")
    total = sum(t.numel() for t in tensors)
    if total > out.numel():
        raise ValueError(f"out holds {out.numel()} elements but the tensors have {total}")
    if out.requires_grad:
        raise ValueError("out must not require grad: flatten_scale_ writes into it outside autograd")
    return out, tensors, _checks.finite_float("scale", scale)


@torch.library.custom_op("internlm_fast::flatten_scale", mutates_args=("out",))
def _flatten(out: Tensor, tensors: list[Tensor], scale: float, impl: str) -> None:
    backend.kernels(impl).flatten_scale_fwd(tensors, out, scale)


@_flatten.register_fake
def _(out, tensors, scale, impl):
    return None


@torch.no_grad()
def flatten_scale_(out: Tensor, tensors: Sequence[Tensor], scale: float = 1.0) -> Tensor:
    """Write scale * each tensor, flattened, end to end into the 1-D `out` from index 0; returns out."""
    out, tensors, scale = _check(out, tensors, scale)
    if not tensors:
        return out
    impl = backend.select("flatten_scale", out)
    if impl == "ref":
        return flatten_scale_ref(out, tensors, scale)
    _flatten(out, [t.contiguous() for t in tensors], scale, impl)
    return out
