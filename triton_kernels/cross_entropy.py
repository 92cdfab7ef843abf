"""Cross-entropy over a vocabulary in Triton, and the same loss fused with the lm_head GEMM.

Kernel contract (identical to internlm_fast._C.cpu, see cpp/cpu/ops_cpu.h and cross_entropy.cpp):
    cross_entropy_fwd(logits, labels, ignore_index, reduction) -> [loss, lse]
    cross_entropy_bwd(dloss, logits, labels, lse, ignore_index, reduction) -> dlogits
    fused_linear_cross_entropy_fwd(hidden, weight, labels, ignore_index, reduction, chunk_size,
                                   need_dhidden, need_dweight) -> [loss, dhidden, dweight]
    fused_linear_cross_entropy_bwd(dloss, dhidden, dweight) -> [dloss * dhidden, dloss * dweight]
logits (rows, V) and hidden (rows, H) with a unit column stride, weight (V, H) of hidden's dtype,
labels int64 (rows,). reduction "mean" (over the rows whose label is not ignore_index; 0.0 with a
zero gradient when there are none) or "sum". loss is 0-d and lse (rows,) (0 for ignored rows), both
fp32 (fp64 for fp64 inputs); gradients in the inputs' dtype, for a unit incoming gradient in the
fused forward. Labels outside [0, V) that are not ignore_index: ValueError, checked on the host
before any launch, since the forward reads logits[row, label]. NaN logits give a NaN loss.
Reference: internlm_fast/ops/cross_entropy.py::{cross_entropy_ref, fused_linear_cross_entropy_ref}.

One kernel does every row-wise pass: a program owns BLOCK_R rows (1 for real vocabularies, several
when V is small) and walks the vocabulary in coalesced BLOCK_V blocks keeping a running max and
sum-of-exp per row (online softmax, one exp per element, as Liger-Kernel's kernel). The gradient
pass reads the row once more (from L2 on a GPU) and writes (softmax - onehot) * scale, in place over
the logits in the fused op. The fused op loops over token chunks on the host: logits chunk by
torch.mm (cuBLAS), the kernel, then dhidden and dweight (fp32 accumulation) by GEMMs, so the
gradients are finished in the forward and the backward only scales them.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._common import acc_dtype, emulate_bf16_rounding, next_pow2, num_warps, store_cast

# Widest vocabulary block a program holds at once, and elements per program when several short
# rows share one. Module attributes so tests can shrink them to exercise the multi-block loop.
MAX_BLOCK_V = 16384
TILE = 4096

_LOWEST = {tl.float32: -3.4028234663852886e38, tl.float64: -1.7976931348623157e308}
_REDUCTIONS = ("mean", "sum")


@triton.jit
def _xent_kernel(
    X, G, LABELS, LSE, LOSS, DLOSS,
    stride_x, stride_g, rows, V, ignore_index, divisor,
    FWD: tl.constexpr, STORE_LSE: tl.constexpr, GRAD: tl.constexpr, HAS_DLOSS: tl.constexpr,
    ACC: tl.constexpr, LOWEST: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr,
    BF16_RNE: tl.constexpr,
):  # fmt: skip
    # FWD: lse and per-row loss from the logits (else lse comes from LSE). GRAD: G = (softmax - onehot)
    # * scale with scale = dloss / divisor (1 / divisor without DLOSS); G may be X itself.
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    row_ok = r < rows
    label = tl.load(LABELS + r, mask=row_ok, other=ignore_index)
    # ignored rows are never read (a NaN there must not reach the loss), only zeroed in G
    live = row_ok & (label != ignore_index)
    xrow = X + r[:, None] * stride_x
    cols = tl.arange(0, BLOCK_V)[None, :]
    if FWD:
        # lowest, not -inf: -inf - -inf would be NaN for a row that starts with masked (-inf) logits.
        # A NaN logit makes its exp term NaN whatever max() does with it, so the sum and loss are NaN.
        m = tl.full([BLOCK_R], LOWEST, ACC)
        d = tl.zeros([BLOCK_R], dtype=ACC)
        for start in range(0, V, BLOCK_V):
            c = start + cols
            x = tl.load(xrow + c, mask=live[:, None] & (c < V), other=float("-inf")).to(ACC)
            m_new = tl.maximum(m, tl.max(x, axis=1))
            d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new[:, None]), axis=1)
            m = m_new
        lse = tl.where(live, m + tl.log(tl.where(live, d, 1.0)), 0.0)
        # before the gradient pass: in place, that pass overwrites logits[row, label]
        xl = tl.load(X + r * stride_x + label, mask=live, other=0.0).to(ACC)
        # per-row loss in fp64, as the C++ kernel, so the host's sum over rows adds no fp32 error
        loss = tl.where(live, lse.to(tl.float64) - xl.to(tl.float64), 0.0)
        tl.store(LOSS + r, loss, mask=row_ok)
        if STORE_LSE:
            tl.store(LSE + r, lse, mask=row_ok)
    else:
        lse = tl.load(LSE + r, mask=row_ok, other=0.0).to(ACC)
    if GRAD:
        if HAS_DLOSS:
            scale = tl.load(DLOSS).to(ACC) / divisor
        else:
            scale = tl.full([], 1.0, ACC) / divisor
        grow = G + r[:, None] * stride_g
        for start in range(0, V, BLOCK_V):
            c = start + cols
            x = tl.load(xrow + c, mask=live[:, None] & (c < V), other=0.0).to(ACC)
            p = tl.exp(x - lse[:, None])
            g = tl.where(c == label[:, None], p - 1.0, p) * scale
            g = tl.where(live[:, None], g, 0.0)
            tl.store(grow + c, store_cast(g, G.dtype.element_ty, BF16_RNE), mask=row_ok[:, None] & (c < V))


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_reduction(reduction: str, fn: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{fn}: reduction must be 'mean' or 'sum', got {reduction!r}")


def _check_rows(x: torch.Tensor, name: str, fn: str) -> None:
    if x.dim() != 2 or (x.shape[1] > 1 and x.stride(1) != 1) or x.stride(0) < 0:
        raise ValueError(f"{fn}: {name} must be 2-D with a unit column stride")


def _check_labels(labels: torch.Tensor, rows: int, like: torch.Tensor, name: str, fn: str) -> None:
    if labels.dim() != 1 or labels.dtype != torch.int64 or labels.shape[0] != rows or labels.device != like.device:
        raise ValueError(f"{fn}: labels must be int64 with one entry per {name} row, on {name}'s device")


def _count_valid(labels: torch.Tensor, V: int, ignore_index: int, fn: str) -> int:
    """Rows that count, and the bounds check the forward's logits[row, label] read relies on: one
    device-to-host transfer for both."""
    keep = labels != ignore_index
    bad = keep & ((labels < 0) | (labels >= V))
    valid, n_bad = torch.stack([keep.sum(), bad.sum()]).tolist()
    if n_bad:
        raise ValueError(f"{fn}: labels must lie in [0, {V}) or equal ignore_index")
    return valid


def _launch(x, g, labels, lse, loss, dloss, ignore_index, divisor, *, fwd, store_lse, grad):
    rows, V = x.shape
    if rows == 0:
        return
    block_v = min(next_pow2(V), MAX_BLOCK_V)
    block_r = min(max(TILE // block_v, 1), next_pow2(rows))
    acc = acc_dtype(x.dtype)
    g = g if g is not None else x
    _xent_kernel[(triton.cdiv(rows, block_r),)](
        x, g, labels, lse if lse is not None else loss, loss if loss is not None else lse,
        dloss if dloss is not None else labels,
        x.stride(0), g.stride(0), rows, V, ignore_index, max(int(divisor), 1),
        FWD=fwd, STORE_LSE=store_lse, GRAD=grad, HAS_DLOSS=dloss is not None,
        ACC=acc, LOWEST=_LOWEST[acc], BLOCK_R=block_r, BLOCK_V=block_v,
        BF16_RNE=emulate_bf16_rounding(g.dtype), num_warps=num_warps(block_r * block_v),
    )  # fmt: skip


def _reduce(loss_rows: torch.Tensor, valid: int, reduction: str, dtype: torch.dtype) -> torch.Tensor:
    total = loss_rows.sum()  # fp64: the sum over rows adds no error of the accumulation dtype
    if reduction == "mean":
        # mean over no tokens is 0, not torch's NaN: a fully masked micro-batch must not poison training
        total = total / valid if valid > 0 else torch.zeros_like(total)
    return total.to(_acc(dtype))


def cross_entropy_fwd(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, reduction: str
) -> list[torch.Tensor]:
    fn = "cross_entropy_fwd (triton)"
    _check_rows(logits, "logits", fn)
    _check_labels(labels, logits.shape[0], logits, "logits", fn)
    _check_reduction(reduction, fn)
    rows, V = logits.shape
    labels = labels.contiguous()
    valid = _count_valid(labels, V, ignore_index, fn)
    lse = torch.empty(rows, dtype=_acc(logits.dtype), device=logits.device)
    loss_rows = torch.zeros(rows, dtype=torch.float64, device=logits.device)
    _launch(logits, None, labels, lse, loss_rows, None, ignore_index, 1, fwd=True, store_lse=True, grad=False)
    return [_reduce(loss_rows, valid, reduction, logits.dtype), lse]


def cross_entropy_bwd(
    dloss: torch.Tensor,
    logits: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    ignore_index: int,
    reduction: str,
) -> torch.Tensor:
    fn = "cross_entropy_bwd (triton)"
    _check_rows(logits, "logits", fn)
    _check_labels(labels, logits.shape[0], logits, "logits", fn)
    if dloss.numel() != 1:
        raise ValueError(f"{fn}: dloss must be a scalar")
    _check_reduction(reduction, fn)
    rows, V = logits.shape
    acc = _acc(logits.dtype)
    if lse.shape != (rows,) or lse.dtype != acc or lse.device != logits.device:
        raise ValueError(f"{fn}: lse must be the forward's log-sum-exp")
    labels = labels.contiguous()
    valid = _count_valid(labels, V, ignore_index, fn)
    # dloss stays on the device: the scale is read by the kernel, no host sync for it
    dl = dloss.reshape(()).to(device=logits.device, dtype=acc)
    dlogits = torch.empty((rows, V), dtype=logits.dtype, device=logits.device)
    divisor = valid if reduction == "mean" else 1
    lse = lse.contiguous()
    _launch(logits, dlogits, labels, lse, None, dl, ignore_index, divisor, fwd=False, store_lse=False, grad=True)
    return dlogits


def _auto_chunk(rows: int, V: int, H: int, device: torch.device) -> int:
    # Liger-Kernel's choice: a chunk's logits about as large as the hidden states, so the op never
    # holds much more than its inputs. Clamped below because dweight += dlogits^T @ hidden re-reads
    # and rewrites all of the fp32 dweight once per chunk: that GEMM needs K in the hundreds (CPU,
    # as the C++ backend) to a thousand or more (H100: ~3 TB/s against ~700 TFLOP/s) to stay
    # compute-bound. Capped at 4096: (4096, 103168) bf16 logits are 0.8 GB.
    ratio = max(1, triton.cdiv(V, H))
    want = next_pow2(triton.cdiv(rows, ratio))
    return min(max(want, 1024 if device.type == "cuda" else 512), 4096)


@functools.cache
def _mixed_addmm(device_type: str, dtype: torch.dtype) -> bool:
    """Whether torch.addmm takes bf16/fp16 inputs into an fp32 output (cuBLAS does, torch >= 2.8 on
    CUDA): dweight then accumulates in fp32 at the half-precision GEMM rate, with no fp32 copies of
    the chunk. Elsewhere the chunk is cast to fp32 first (what the C++ backend does)."""
    if device_type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return False
    try:
        a = torch.ones(4, 4, dtype=dtype, device=device_type)
        c = torch.ones(4, 4, dtype=torch.float32, device=device_type)
        torch.addmm(c, a, a, beta=0.0, out_dtype=torch.float32, out=c)
        torch.addmm(c, a, a, beta=1.0, out_dtype=torch.float32, out=c)
        return bool((c == 8).all())
    except (RuntimeError, TypeError):
        return False


def fused_linear_cross_entropy_fwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int,
    reduction: str,
    chunk_size: int,
    need_dhidden: bool,
    need_dweight: bool,
) -> list[torch.Tensor]:
    fn = "fused_linear_cross_entropy_fwd (triton)"
    _check_rows(hidden, "hidden", fn)
    if (
        weight.dim() != 2
        or weight.shape[1] != hidden.shape[1]
        or weight.dtype != hidden.dtype
        or weight.device != hidden.device
    ):
        raise ValueError(f"{fn}: weight must be (V, H) of hidden's dtype and device")
    _check_labels(labels, hidden.shape[0], hidden, "hidden", fn)
    _check_reduction(reduction, fn)
    if chunk_size < 0:
        raise ValueError(f"{fn}: chunk_size must be >= 0")
    labels = labels.contiguous()
    with torch.no_grad():  # the GEMMs below are internal; autograd sees only the custom op
        return _flce_fwd(hidden, weight, labels, ignore_index, reduction, chunk_size, need_dhidden, need_dweight, fn)


def _flce_fwd(hidden, weight, labels, ignore_index, reduction, chunk_size, need_dhidden, need_dweight, fn):
    N, H = hidden.shape
    V = weight.shape[0]
    dtype, device = hidden.dtype, hidden.device
    acc = _acc(dtype)
    valid = _count_valid(labels, V, ignore_index, fn)
    need_grad = need_dhidden or need_dweight

    # Only tokens with a label go through the GEMMs: prompt tokens in fine-tuning cost nothing.
    all_valid = valid == N
    if not all_valid:
        rows_idx = torch.nonzero(labels != ignore_index).squeeze(1)
        labels = labels.index_select(0, rows_idx)
    weight = weight.contiguous() if weight.stride(-1) != 1 else weight

    chunk = chunk_size if chunk_size > 0 else _auto_chunk(valid, V, H, device)
    chunk = max(1, min(chunk, valid))
    divisor = valid if reduction == "mean" else 1

    dhidden = torch.empty_like(hidden) if need_dhidden else hidden.new_empty(0)
    if need_dhidden and not all_valid:
        dhidden.zero_()  # ignored tokens get no gradient
    dweight = torch.empty_like(weight) if need_dweight else weight.new_empty(0)
    dw_acc = None
    if need_dweight:
        # dweight sums over every chunk: in fp32 even for bf16/fp16 weights
        dw_acc = dweight if dtype == acc else torch.empty((V, H), dtype=acc, device=device)
        if valid == 0:
            dw_acc.zero_()
    mixed = need_dweight and dtype != acc and _mixed_addmm(device.type, dtype)

    loss_rows = torch.empty(valid, dtype=torch.float64, device=device)
    buf = torch.empty((chunk, V), dtype=dtype, device=device) if valid > 0 else None
    wt = weight.t()
    for start in range(0, valid, chunk):
        c = min(chunk, valid - start)
        idx = None if all_valid else rows_idx.narrow(0, start, c)
        hc = hidden.narrow(0, start, c) if all_valid else hidden.index_select(0, idx)
        lc = buf.narrow(0, 0, c)
        torch.mm(hc, wt, out=lc)
        _launch(
            lc, lc, labels.narrow(0, start, c), None, loss_rows.narrow(0, start, c), None,
            ignore_index, divisor, fwd=True, store_lse=False, grad=need_grad,
        )  # fmt: skip
        if need_dhidden:
            if all_valid:
                torch.mm(lc, weight, out=dhidden.narrow(0, start, c))
            else:
                dhidden.index_copy_(0, idx, torch.mm(lc, weight))
        if need_dweight:
            beta = 0.0 if start == 0 else 1.0  # beta 0 ignores dw_acc's uninitialised contents
            if mixed:
                torch.addmm(dw_acc, lc.t(), hc, beta=beta, out_dtype=acc, out=dw_acc)
            else:
                lt = lc.t() if dtype == acc else lc.to(acc).t()
                ha = hc if dtype == acc else hc.to(acc)
                torch.addmm(dw_acc, lt, ha, beta=beta, out=dw_acc)
    if need_dweight and dtype != acc:
        dweight.copy_(dw_acc)
    return [_reduce(loss_rows, valid, reduction, dtype), dhidden, dweight]


def fused_linear_cross_entropy_bwd(
    dloss: torch.Tensor, dhidden: torch.Tensor, dweight: torch.Tensor
) -> list[torch.Tensor]:
    if dloss.numel() != 1:
        raise ValueError("fused_linear_cross_entropy_bwd (triton): dloss must be a scalar")
    # as the C++ kernel: dloss rounded to the gradients' dtype, one multiply; stays on the device
    return [t * dloss.reshape(()).to(device=t.device, dtype=t.dtype) for t in (dhidden, dweight)]
