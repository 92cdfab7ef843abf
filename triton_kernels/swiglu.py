"""Fused SwiGLU in Triton: out = silu(gate) * up, and its backward.

Kernel contract (identical to internlm_fast._C.cpu):
    swiglu_fwd(gate, up) -> out
        gate, up: (rows, F), unit column stride, any row stride (so both may be views of one packed
        (rows, 2F) tensor), one dtype. out: contiguous (rows, F).
    swiglu_bwd(dout, gate, up, packed) -> [dgate, dup], or [dx] when packed
        dout: contiguous (rows, F). dgate/dup: contiguous (rows, F); dx: (rows, 2F) with dgate in
        columns :F and dup in F: (the gradient of the packed input, written in place, no cat).
silu(-inf) = 0 and silu(inf) = inf; NaN stays NaN. Reference: internlm_fast/ops/swiglu.py.

Element-wise and memory-bound: 2-D tiles of about TILE elements (several short rows per program
when F is small), fp32 math (fp64 for fp64), storage in the inputs' dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import acc_dtype, emulate_bf16_rounding, next_pow2, store_cast

TILE = 4096
MAX_BLOCK_F = 1024


@triton.jit
def _sigmoid_silu(g):
    # 1 / (1 + e^-g) is 0 at g = -inf and 1 at g = inf; g * sigmoid(g) would give -inf * 0 = NaN at
    # -inf, so silu is pinned to 0 wherever sigmoid underflowed (|silu| < 1e-37 there anyway)
    sig = 1.0 / (1.0 + tl.exp(-g))
    silu = tl.where(sig == 0.0, 0.0, g * sig)
    return sig, silu


@triton.jit
def _tile(rows, F, BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr):
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    c = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    mask = (r[:, None] < rows) & (c[None, :] < F)
    return r[:, None], c[None, :], mask


@triton.jit
def _swiglu_fwd_kernel(
    G, U, OUT, stride_g, stride_u, stride_o, rows, F,
    ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr, BF16_RNE: tl.constexpr,
):  # fmt: skip
    r, c, mask = _tile(rows, F, BLOCK_R, BLOCK_F)
    g = tl.load(G + r * stride_g + c, mask=mask, other=0.0).to(ACC)
    u = tl.load(U + r * stride_u + c, mask=mask, other=0.0).to(ACC)
    _, silu = _sigmoid_silu(g)
    tl.store(OUT + r * stride_o + c, store_cast(silu * u, OUT.dtype.element_ty, BF16_RNE), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(
    DO, G, U, DG, DU, stride_do, stride_g, stride_u, stride_dg, stride_du, rows, F,
    ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr, BF16_RNE: tl.constexpr,
):  # fmt: skip
    r, c, mask = _tile(rows, F, BLOCK_R, BLOCK_F)
    do = tl.load(DO + r * stride_do + c, mask=mask, other=0.0).to(ACC)
    g = tl.load(G + r * stride_g + c, mask=mask, other=0.0).to(ACC)
    u = tl.load(U + r * stride_u + c, mask=mask, other=0.0).to(ACC)
    sig, silu = _sigmoid_silu(g)
    # silu'(g) = sig + silu * (1 - sig): 0 at -inf by the pinned silu; at +inf it is inf * 0, so pin 1
    dsilu = tl.where(g == float("inf"), 1.0, sig + silu * (1.0 - sig))
    tl.store(DG + r * stride_dg + c, store_cast(do * u * dsilu, DG.dtype.element_ty, BF16_RNE), mask=mask)
    tl.store(DU + r * stride_du + c, store_cast(do * silu, DU.dtype.element_ty, BF16_RNE), mask=mask)


def _grid(rows: int, F: int) -> tuple[tuple[int, int], int, int, int]:
    block_f = min(next_pow2(F), MAX_BLOCK_F)
    block_r = min(max(TILE // block_f, 1), next_pow2(rows))
    warps = min(max(block_r * block_f // 512, 1), 8)
    return (triton.cdiv(rows, block_r), triton.cdiv(F, block_f)), block_r, block_f, warps


def _check(name: str, t: torch.Tensor, like: torch.Tensor | None = None) -> None:
    # second line of defence behind the public op's checks: a bad layout would read out of bounds
    if t.dim() != 2 or (t.shape[1] > 1 and t.stride(1) != 1) or t.stride(0) < 0:
        raise ValueError(f"swiglu (triton): {name} must be 2-D (rows, F) with a unit column stride")
    if like is not None and (t.shape != like.shape or t.dtype != like.dtype or t.device != like.device):
        raise ValueError(f"swiglu (triton): {name} must match gate in shape, dtype and device")


def swiglu_fwd(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    _check("gate", gate)
    _check("up", up, gate)
    rows, F = gate.shape
    out = torch.empty((rows, F), dtype=gate.dtype, device=gate.device)
    if out.numel() == 0:
        return out
    grid, block_r, block_f, warps = _grid(rows, F)
    _swiglu_fwd_kernel[grid](
        gate, up, out, gate.stride(0), up.stride(0), out.stride(0), rows, F,
        ACC=acc_dtype(gate.dtype), BLOCK_R=block_r, BLOCK_F=block_f,
        BF16_RNE=emulate_bf16_rounding(gate.dtype), num_warps=warps,
    )  # fmt: skip
    return out


def swiglu_bwd(dout: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, packed: bool) -> list[torch.Tensor]:
    _check("gate", gate)
    _check("up", up, gate)
    _check("dout", dout, gate)
    dout = dout.contiguous()
    rows, F = gate.shape
    if packed:
        dx = torch.empty((rows, 2 * F), dtype=gate.dtype, device=gate.device)
        dgate, dup, result = dx[:, :F], dx[:, F:], [dx]
    else:
        dgate = torch.empty((rows, F), dtype=gate.dtype, device=gate.device)
        dup = torch.empty_like(dgate)
        result = [dgate, dup]
    if rows * F == 0:
        return result
    grid, block_r, block_f, warps = _grid(rows, F)
    _swiglu_bwd_kernel[grid](
        dout, gate, up, dgate, dup,
        dout.stride(0), gate.stride(0), up.stride(0), dgate.stride(0), dup.stride(0), rows, F,
        ACC=acc_dtype(gate.dtype), BLOCK_R=block_r, BLOCK_F=block_f,
        BF16_RNE=emulate_bf16_rounding(gate.dtype), num_warps=warps,
    )  # fmt: skip
    return result
