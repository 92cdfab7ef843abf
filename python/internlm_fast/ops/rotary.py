"""Rotary position embedding (flash-attn's `apply_rotary_emb` semantics).

For token t of sequence b at position p = seqlen_offsets[b] + t, each pair (x0, x1) of the first
rotary_dim = 2 * cos.shape[1] dims of every head is rotated by the angle whose cosine and sine are
cos[p, i], sin[p, i]:

    x0' = x0 * cos - x1 * sin,   x1' = x0 * sin + x1 * cos

Pairs are (i, i + rotary_dim / 2) by default (GPT-NeoX / LLaMA / InternLM, "rotate_half") or
(2i, 2i + 1) with interleaved=True (GPT-J). Dims past rotary_dim pass through unchanged.
The gradient is the same rotation with sin negated; cos and sin get no gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _checks, backend

_INDEX_DTYPES = (torch.int32, torch.int64)


def _positions(x: Tensor, seqlen_offsets: int | Tensor, cu_seqlens: Tensor | None) -> Tensor:
    """Position of every token: (batch, seqlen) for padded x, (total,) for packed x."""
    if cu_seqlens is None:
        batch, seqlen = x.shape[:2]
        t = torch.arange(seqlen, device=x.device).expand(batch, seqlen)
        off = seqlen_offsets[:, None] if isinstance(seqlen_offsets, Tensor) else seqlen_offsets
        return t + off
    cu = cu_seqlens.long()
    lens = cu[1:] - cu[:-1]
    seq = torch.repeat_interleave(torch.arange(len(lens), device=x.device), lens)
    t = torch.arange(x.shape[0], device=x.device) - cu[seq]
    return t + (seqlen_offsets[seq] if isinstance(seqlen_offsets, Tensor) else seqlen_offsets)


def apply_rotary_ref(
    x: Tensor,
    cos: Tensor,
    sin: Tensor,
    interleaved: bool = False,
    inplace: bool = False,
    seqlen_offsets: int | Tensor = 0,
    cu_seqlens: Tensor | None = None,
    max_seqlen: int | None = None,
) -> Tensor:
    """Pure-torch rotary embedding: the oracle. Computes in fp32 (fp64 for fp64 inputs)."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    rd = 2 * cos.shape[1]
    pos = _positions(x, seqlen_offsets, cu_seqlens)
    c = cos.to(acc)[pos].unsqueeze(-2)  # (..., 1, rd / 2): one row per token, shared by the heads
    s = sin.to(acc)[pos].unsqueeze(-2)
    xr = x[..., :rd].to(acc)
    if interleaved:
        x0, x1 = xr[..., 0::2], xr[..., 1::2]
        rotated = torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1).flatten(-2)
    else:
        x0, x1 = xr.chunk(2, dim=-1)
        rotated = torch.cat((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1)
    out = torch.cat((rotated.to(x.dtype), x[..., rd:]), dim=-1)
    if inplace:
        return x.copy_(out)
    return out


def _check(x, cos, sin, interleaved, inplace, seqlen_offsets, cu_seqlens, max_seqlen) -> None:
    """Everything that can be checked without reading tensor values."""
    varlen = cu_seqlens is not None
    _checks.tensor("x", x)
    if varlen and x.dim() != 3:
        raise ValueError(f"x must be (total_tokens, nheads, headdim) with cu_seqlens, got shape {tuple(x.shape)}")
    if not varlen and x.dim() != 4:
        raise ValueError(f"x must be (batch, seqlen, nheads, headdim), got shape {tuple(x.shape)}")
    headdim = x.shape[-1]
    if headdim > 1 and x.stride(-1) != 1:
        raise ValueError(f"x must be contiguous in its last dimension (strides {tuple(x.stride())})")
    _checks.tensor("cos", cos, dim=2)
    _checks.tensor("sin", sin, dim=2)
    _checks.same_shape("cos", cos, sin=sin)
    _checks.same_dtype("cos", cos, sin=sin)
    if cos.dtype not in (x.dtype, torch.float32):
        raise TypeError(f"cos has dtype {cos.dtype}; expected x's dtype {x.dtype} or float32")
    rd = 2 * cos.shape[1]
    if rd == 0:
        raise ValueError("cos has 0 columns: cos/sin must be (seqlen_ro, rotary_dim / 2) with rotary_dim >= 2")
    if rd > headdim:
        raise ValueError(
            f"cos has shape {tuple(cos.shape)}: rotary_dim = 2 * {cos.shape[1]} = {rd} exceeds x's headdim "
            f"{headdim}; cos/sin must be (seqlen_ro, rotary_dim / 2) with rotary_dim even and <= headdim"
        )
    _checks.same_device("x", x, cos=cos, sin=sin)
    for name, flag in (("interleaved", interleaved), ("inplace", inplace)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    if varlen:
        _checks.tensor("cu_seqlens", cu_seqlens, dtypes=(torch.int32,), dim=1)
        if cu_seqlens.shape[0] < 1:
            raise ValueError("cu_seqlens must have batch + 1 >= 1 elements, got 0")
        _checks.same_device("x", x, cu_seqlens=cu_seqlens)
    batch = cu_seqlens.shape[0] - 1 if varlen else x.shape[0]
    if isinstance(seqlen_offsets, Tensor):
        _checks.tensor("seqlen_offsets", seqlen_offsets, dtypes=_INDEX_DTYPES)
        if tuple(seqlen_offsets.shape) != (batch,):
            raise ValueError(f"seqlen_offsets has shape {tuple(seqlen_offsets.shape)}; expected (batch,) = ({batch},)")
        _checks.same_device("x", x, seqlen_offsets=seqlen_offsets)
    elif isinstance(seqlen_offsets, bool) or not isinstance(seqlen_offsets, int):
        raise TypeError(f"seqlen_offsets must be an int or a tensor, got {type(seqlen_offsets).__name__}")
    elif seqlen_offsets < 0:
        raise ValueError(f"seqlen_offsets must be >= 0, got {seqlen_offsets}")
    if max_seqlen is not None:
        if not varlen:
            raise ValueError("max_seqlen is only used with cu_seqlens")
        if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 0:
            raise ValueError(f"max_seqlen must be a non-negative int, got {max_seqlen!r}")


def _check_values(total: int, seqlen: int, seqlen_ro: int, offsets: Tensor, cu_seqlens: Tensor | None) -> None:
    """The checks that read tensor values (few host reads when all is well). They run inside the
    forward op, before the kernel, so torch.compile(fullgraph=True) never sees a data-dependent
    branch."""
    if cu_seqlens is None:
        if offsets.numel() == 0:
            return
        lo, hi = offsets.aminmax()  # two scalar reads: this runs on every decode step
        if int(lo) >= 0 and (seqlen == 0 or int(hi) + seqlen <= seqlen_ro):
            return
        lens = torch.full_like(offsets, seqlen)
        cu_bad = False
    else:
        cu = cu_seqlens.long()
        lens = cu[1:] - cu[:-1]
        cu_bad = (cu[0] != 0) | (cu[-1] != total) | (lens < 0).any()
    last = torch.where(lens > 0, offsets + lens, 0)  # one past the last position of each sequence
    if not bool(cu_bad | (offsets < 0).any() | (last > seqlen_ro).any()):
        return
    if cu_seqlens is not None:
        if int(cu_seqlens[0]) != 0:
            raise ValueError(f"cu_seqlens must start at 0, got {int(cu_seqlens[0])}")
        if bool((lens < 0).any()):
            raise ValueError(f"cu_seqlens must be non-decreasing, got {cu_seqlens.tolist()}")
        if int(cu_seqlens[-1]) != total:
            raise ValueError(f"cu_seqlens must end at x's total_tokens {total}, got {int(cu_seqlens[-1])}")
    if bool((offsets < 0).any()):
        raise ValueError(f"seqlen_offsets must be >= 0, got {offsets.tolist()}")
    b = int(last.argmax())
    raise ValueError(
        f"sequence {b} reaches position {int(last[b]) - 1} (seqlen_offsets {int(offsets[b])} + "
        f"{int(lens[b])} tokens) but cos/sin have only seqlen_ro = {seqlen_ro} rows"
    )


def _check_op_values(x: Tensor, cos: Tensor, offsets: Tensor, cu_seqlens: Tensor | None) -> None:
    seqlen = x.shape[1] if cu_seqlens is None else 0
    _check_values(x.shape[0], seqlen, cos.shape[0], offsets, cu_seqlens)


# ---- custom ops: forward and backward each a torch.library op, so torch.compile sees them ----


@torch.library.custom_op("internlm_fast::rotary_fwd", mutates_args=())
def _fwd(
    x: Tensor, cos: Tensor, sin: Tensor, offsets: Tensor, cu_seqlens: Tensor | None, interleaved: bool, impl: str
) -> Tensor:
    _check_op_values(x, cos, offsets, cu_seqlens)
    return backend.kernels(impl).rotary_fwd(x, cos, sin, offsets, cu_seqlens, interleaved, False, None)


@torch.library.custom_op("internlm_fast::rotary_fwd_inplace", mutates_args=("x",))
def _fwd_inplace(
    x: Tensor, cos: Tensor, sin: Tensor, offsets: Tensor, cu_seqlens: Tensor | None, interleaved: bool, impl: str
) -> None:
    _check_op_values(x, cos, offsets, cu_seqlens)
    backend.kernels(impl).rotary_fwd(x, cos, sin, offsets, cu_seqlens, interleaved, False, x)


@torch.library.custom_op("internlm_fast::rotary_bwd", mutates_args=())
def _bwd(
    dy: Tensor, cos: Tensor, sin: Tensor, offsets: Tensor, cu_seqlens: Tensor | None, interleaved: bool, impl: str
) -> Tensor:
    # offsets and cu_seqlens were checked by the forward that saved them
    return backend.kernels(impl).rotary_bwd(dy, cos, sin, offsets, cu_seqlens, interleaved, False, None)


@_fwd.register_fake
def _(x, cos, sin, offsets, cu_seqlens, interleaved, impl):
    return x.new_empty(x.shape)  # contiguous, like the kernel's output


@_fwd_inplace.register_fake
def _(x, cos, sin, offsets, cu_seqlens, interleaved, impl):
    return None


@_bwd.register_fake
def _(dy, cos, sin, offsets, cu_seqlens, interleaved, impl):
    return dy.new_empty(dy.shape)


def _rows(t: Tensor) -> Tensor:
    """Kernels need a contiguous last dim; autograd may hand over an expanded or transposed grad."""
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def _setup(ctx, inputs, output):
    _, cos, sin, offsets, cu_seqlens, interleaved, impl = inputs
    ctx.interleaved, ctx.impl = interleaved, impl
    ctx.save_for_backward(cos, sin, offsets, cu_seqlens)


def _backward(ctx, dy):
    cos, sin, offsets, cu_seqlens = ctx.saved_tensors
    dx = _bwd(_rows(dy), cos, sin, offsets, cu_seqlens, ctx.interleaved, ctx.impl)
    return dx, None, None, None, None, None, None


def _double_backward(ctx, ddx):
    # the backward is linear in dy: its gradient is the forward rotation
    cos, sin, offsets, cu_seqlens = ctx.saved_tensors
    ddy = _fwd(_rows(ddx), cos, sin, offsets, cu_seqlens, ctx.interleaved, ctx.impl)
    return ddy, None, None, None, None, None, None


_fwd.register_autograd(_backward, setup_context=_setup)
_bwd.register_autograd(_double_backward, setup_context=_setup)


def apply_rotary(
    x: Tensor,
    cos: Tensor,
    sin: Tensor,
    interleaved: bool = False,
    inplace: bool = False,
    seqlen_offsets: int | Tensor = 0,
    cu_seqlens: Tensor | None = None,
    max_seqlen: int | None = None,
) -> Tensor:
    """Rotary embedding of `x`, flash-attn's `apply_rotary_emb`.

    x: (batch, seqlen, nheads, headdim), or (total_tokens, nheads, headdim) with `cu_seqlens`
        (int32, (batch + 1,)); any strides except the last dim, which must be contiguous (q or k
        sliced out of a packed qkv works without a copy).
    cos, sin: (seqlen_ro, rotary_dim / 2), x's dtype or fp32; rotary_dim <= headdim.
    seqlen_offsets: int, or int32/int64 tensor (batch,): token t of sequence b is at position
        seqlen_offsets[b] + t, which must be < seqlen_ro. With `cu_seqlens`, each sequence's
        positions restart at 0 (+ its offset).
    max_seqlen: accepted for flash-attn compatibility and type-checked; no backend reads it
        (the kernels find each token's sequence from cu_seqlens).
    inplace: write the result into x and return x. Without autograd recording (no grad mode, or
        x not requiring grad) the kernel writes into x directly, no temporary. When autograd
        records x, the result is computed out of place and copied into x with `x.copy_`, so
        autograd sees an ordinary in-place op (x must then not be a leaf, as for any in-place op).

    Returns a contiguous tensor of x's shape and dtype (x itself when inplace).
    """
    _check(x, cos, sin, interleaved, inplace, seqlen_offsets, cu_seqlens, max_seqlen)
    impl = backend.select("rotary", x)
    if impl == "ref":
        if not torch.compiler.is_compiling():
            _check_op_values(x, cos, _offsets_tensor(x, seqlen_offsets, cu_seqlens), cu_seqlens)
        return apply_rotary_ref(x, cos, sin, interleaved, inplace, seqlen_offsets, cu_seqlens, max_seqlen)
    cos = cos.contiguous()
    sin = sin.contiguous()
    offsets = _offsets_tensor(x, seqlen_offsets, cu_seqlens)
    if cu_seqlens is not None:
        cu_seqlens = cu_seqlens.contiguous()
    if inplace and not (torch.is_grad_enabled() and x.requires_grad):
        _fwd_inplace(x, cos, sin, offsets, cu_seqlens, interleaved, impl)
        return x
    out = _fwd(x, cos, sin, offsets, cu_seqlens, interleaved, impl)
    return x.copy_(out) if inplace else out


def _offsets_tensor(x: Tensor, seqlen_offsets: int | Tensor, cu_seqlens: Tensor | None) -> Tensor:
    """Offsets as the kernels take them: int64 (batch,)."""
    if isinstance(seqlen_offsets, Tensor):
        return seqlen_offsets.to(torch.int64).contiguous()
    batch = x.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    return torch.full((batch,), seqlen_offsets, dtype=torch.int64, device=x.device)
