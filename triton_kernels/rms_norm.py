"""RMSNorm in Triton, optionally fused with the residual add before it.

Kernel contract (identical to internlm_fast._C.cpu, see cpp/cpu/rms_norm.cpp):
    rms_norm_fwd(x, weight, residual|None, eps) -> [y, residual_out|None, rstd]
    rms_norm_bwd(dy, x, weight, rstd, dresidual_out|None) -> [dx, dweight]
x/dy/residual are 2-D (rows, H) with a unit column stride; weight is 1-D (H,) of any float dtype.
rstd is fp32 (fp64 for fp64 x). Reference: internlm_fast/ops/rms_norm.py::rms_norm_ref.

One program per row. A row of up to MAX_FUSED_* elements lives in registers between the
sum-of-squares and the scaling, so memory sees each byte once; wider rows loop over chunks and
read the row twice (from L2 on a GPU).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import acc_dtype, emulate_bf16_rounding, next_pow2, num_programs, num_warps, store_cast

# Row widths kept whole in registers; wider rows take the chunked loop. Module attributes so tests
# can shrink them to exercise the chunked path on small rows.
MAX_FUSED_FWD_BYTES = 65536
MAX_FUSED_BWD_ELEMS = 16384


@triton.jit
def _inv_rms(sum_sq, H, eps, ACC: tl.constexpr):
    # correctly rounded sqrt (tl.sqrt may be approximate in fp32); sqrt_rn takes fp32 only
    if ACC == tl.float64:
        return 1.0 / tl.sqrt(sum_sq / H + eps)
    else:
        return 1.0 / tl.sqrt_rn(sum_sq / H + eps)


@triton.jit
def _rms_norm_fwd_kernel(
    X, R, W, Y, RES_OUT, RSTD,
    stride_x, stride_r, stride_y, stride_ro,
    H, eps,
    HAS_RES: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr, SINGLE: tl.constexpr, BF16_RNE: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    X += row * stride_x
    Y += row * stride_y
    if HAS_RES:
        R += row * stride_r
        RES_OUT += row * stride_ro
    cols = tl.arange(0, BLOCK)
    if SINGLE:
        mask = cols < H
        x = tl.load(X + cols, mask=mask, other=0.0).to(ACC)
        if HAS_RES:
            # normalise the rounded sum, exactly what the caller gets back as residual_out
            s = store_cast(x + tl.load(R + cols, mask=mask, other=0.0).to(ACC), RES_OUT.dtype.element_ty, BF16_RNE)
            tl.store(RES_OUT + cols, s, mask=mask)
            x = s.to(ACC)
        rstd = _inv_rms(tl.sum(x * x, axis=0), H, eps, ACC)
        tl.store(RSTD + row, rstd)
        w = tl.load(W + cols, mask=mask, other=0.0).to(ACC)
        tl.store(Y + cols, store_cast(x * rstd * w, Y.dtype.element_ty, BF16_RNE), mask=mask)
    else:
        acc = tl.zeros([BLOCK], dtype=ACC)
        for start in range(0, H, BLOCK):
            c = start + cols
            mask = c < H
            x = tl.load(X + c, mask=mask, other=0.0).to(ACC)
            if HAS_RES:
                s = store_cast(x + tl.load(R + c, mask=mask, other=0.0).to(ACC), RES_OUT.dtype.element_ty, BF16_RNE)
                tl.store(RES_OUT + c, s, mask=mask)
                x = s.to(ACC)
            acc += x * x
        rstd = _inv_rms(tl.sum(acc, axis=0), H, eps, ACC)
        tl.store(RSTD + row, rstd)
        for start in range(0, H, BLOCK):
            c = start + cols
            mask = c < H
            if HAS_RES:
                x = tl.load(RES_OUT + c, mask=mask, other=0.0).to(ACC)
            else:
                x = tl.load(X + c, mask=mask, other=0.0).to(ACC)
            w = tl.load(W + c, mask=mask, other=0.0).to(ACC)
            tl.store(Y + c, store_cast(x * rstd * w, Y.dtype.element_ty, BF16_RNE), mask=mask)


@triton.jit
def _rms_norm_bwd_kernel(
    DY, X, W, RSTD, DRES, DX, DW_PART,
    stride_dy, stride_x, stride_dres, stride_dx,
    rows, H, rows_per_program,
    HAS_DRES: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr, SINGLE: tl.constexpr, BF16_RNE: tl.constexpr,
):  # fmt: skip
    # dx = rstd * (g - xhat * mean(g * xhat)), g = dy * w, xhat = x * rstd.
    # dweight = sum over rows of dy * xhat: each program sums a contiguous range of rows into its own
    # row of DW_PART (no atomics, deterministic); the caller adds up the partials.
    pid = tl.program_id(0)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, rows)
    cols = tl.arange(0, BLOCK)
    DW_PART += pid.to(tl.int64) * H
    # row pointers advance by their strides (64-bit pointer arithmetic, no row * stride overflow)
    first = row_start.to(tl.int64)
    DY += first * stride_dy
    X += first * stride_x
    DX += first * stride_dx
    RSTD += first
    if HAS_DRES:
        DRES += first * stride_dres
    if SINGLE:
        mask = cols < H
        w = tl.load(W + cols, mask=mask, other=0.0).to(ACC)
        dw = tl.zeros([BLOCK], dtype=ACC)
        for _ in range(row_start, row_end):
            dy = tl.load(DY + cols, mask=mask, other=0.0).to(ACC)
            x = tl.load(X + cols, mask=mask, other=0.0).to(ACC)
            rstd = tl.load(RSTD).to(ACC)
            xhat = x * rstd
            g = dy * w
            c = tl.sum(g * xhat, axis=0) / H
            dx = (g - xhat * c) * rstd
            if HAS_DRES:
                dx += tl.load(DRES + cols, mask=mask, other=0.0).to(ACC)
                DRES += stride_dres
            tl.store(DX + cols, store_cast(dx, DX.dtype.element_ty, BF16_RNE), mask=mask)
            dw += dy * xhat
            DY += stride_dy
            X += stride_x
            DX += stride_dx
            RSTD += 1
        tl.store(DW_PART + cols, dw, mask=mask)
    else:
        # DW_PART starts zeroed; this program's row of it is private, so read-add-write is safe
        for _ in range(row_start, row_end):
            rstd = tl.load(RSTD).to(ACC)
            dot = tl.zeros([BLOCK], dtype=ACC)
            for start in range(0, H, BLOCK):
                c = start + cols
                mask = c < H
                dy = tl.load(DY + c, mask=mask, other=0.0).to(ACC)
                x = tl.load(X + c, mask=mask, other=0.0).to(ACC)
                w = tl.load(W + c, mask=mask, other=0.0).to(ACC)
                dot += dy * w * x
            k = tl.sum(dot, axis=0) * rstd / H
            for start in range(0, H, BLOCK):
                c = start + cols
                mask = c < H
                dy = tl.load(DY + c, mask=mask, other=0.0).to(ACC)
                x = tl.load(X + c, mask=mask, other=0.0).to(ACC)
                w = tl.load(W + c, mask=mask, other=0.0).to(ACC)
                xhat = x * rstd
                dx = (dy * w - xhat * k) * rstd
                if HAS_DRES:
                    dx += tl.load(DRES + c, mask=mask, other=0.0).to(ACC)
                tl.store(DX + c, store_cast(dx, DX.dtype.element_ty, BF16_RNE), mask=mask)
                part = tl.load(DW_PART + c, mask=mask, other=0.0)
                tl.store(DW_PART + c, part + dy * xhat, mask=mask)
            DY += stride_dy
            X += stride_x
            DX += stride_dx
            RSTD += 1
            if HAS_DRES:
                DRES += stride_dres


def _pow2_floor(n: int) -> int:
    return 1 << (max(n, 1).bit_length() - 1)


def _check_rows(name: str, t: torch.Tensor, like: torch.Tensor) -> None:
    # second line of defence: the public op has validated already; a wrong layout here would make
    # the kernel read out of bounds, so refuse it instead
    if t.shape != like.shape or t.dtype != like.dtype or t.device != like.device or t.stride(-1) != 1:
        raise ValueError(f"rms_norm (triton): {name} must match x (shape, dtype, device, unit column stride)")


def rms_norm_fwd(
    x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None, eps: float
) -> list[torch.Tensor | None]:
    if x.dim() != 2 or x.stride(-1) != 1:
        raise ValueError("rms_norm_fwd (triton): x must be 2-D with a unit column stride")
    if weight.dim() != 1 or weight.shape[0] != x.shape[1]:
        raise ValueError("rms_norm_fwd (triton): weight must be 1-D with x.shape[1] elements")
    if residual is not None:
        _check_rows("residual", residual, x)
    rows, H = x.shape
    weight = weight.contiguous()
    y = torch.empty((rows, H), dtype=x.dtype, device=x.device)
    res_out = torch.empty_like(y) if residual is not None else None
    rstd = torch.empty(rows, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32, device=x.device)
    if rows == 0 or H == 0:
        rstd.fill_(float("nan"))  # mean over an empty row, as the reference computes it
        if residual is not None:
            res_out.copy_(x + residual)
        return [y, res_out, rstd]
    max_block = _pow2_floor(MAX_FUSED_FWD_BYTES // x.element_size())
    single = next_pow2(H) <= max_block
    block = min(next_pow2(H), max_block)
    r = residual if residual is not None else x
    ro = res_out if res_out is not None else y
    _rms_norm_fwd_kernel[(rows,)](
        x, r, weight, y, ro, rstd,
        x.stride(0), r.stride(0), y.stride(0), ro.stride(0),
        H, float(eps),
        HAS_RES=residual is not None, ACC=acc_dtype(x.dtype), BLOCK=block, SINGLE=single,
        BF16_RNE=emulate_bf16_rounding(x.dtype),
        num_warps=num_warps(block),
    )  # fmt: skip
    return [y, res_out, rstd]


def rms_norm_bwd(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    rstd: torch.Tensor,
    dresidual_out: torch.Tensor | None,
) -> list[torch.Tensor]:
    if x.dim() != 2 or x.stride(-1) != 1:
        raise ValueError("rms_norm_bwd (triton): x must be 2-D with a unit column stride")
    _check_rows("dy", dy, x)
    if dresidual_out is not None:
        _check_rows("dresidual_out", dresidual_out, x)
    if weight.dim() != 1 or weight.shape[0] != x.shape[1]:
        raise ValueError("rms_norm_bwd (triton): weight must be 1-D with x.shape[1] elements")
    if rstd.shape != (x.shape[0],):
        raise ValueError("rms_norm_bwd (triton): rstd must have one element per row of x")
    rows, H = x.shape
    weight = weight.contiguous()
    rstd = rstd.contiguous()
    dx = torch.empty((rows, H), dtype=x.dtype, device=x.device)
    part_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    if rows == 0 or H == 0:
        if dresidual_out is not None:
            dx.copy_(dresidual_out)
        return [dx, torch.zeros_like(weight)]
    max_block = _pow2_floor(MAX_FUSED_BWD_ELEMS // (2 if x.dtype == torch.float64 else 1))
    single = next_pow2(H) <= max_block
    block = min(next_pow2(H), max_block)
    programs = min(rows, num_programs(x.device))
    rows_per_program = triton.cdiv(rows, programs)
    programs = triton.cdiv(rows, rows_per_program)
    alloc = torch.empty if single else torch.zeros
    dw_part = alloc((programs, H), dtype=part_dtype, device=x.device)
    dres = dresidual_out if dresidual_out is not None else dy
    _rms_norm_bwd_kernel[(programs,)](
        dy, x, weight, rstd, dres, dx, dw_part,
        dy.stride(0), x.stride(0), dres.stride(0), dx.stride(0),
        rows, H, rows_per_program,
        HAS_DRES=dresidual_out is not None, ACC=acc_dtype(x.dtype), BLOCK=block, SINGLE=single,
        BF16_RNE=emulate_bf16_rounding(x.dtype),
        num_warps=num_warps(block),
    )  # fmt: skip
    return [dx, dw_part.sum(0).to(weight.dtype)]
