"""Flash attention with flash-attn's interface (flash_attn_interface.py, v2): dense, packed
variable-length, their qkv/kv-packed forms, and (in flash_attn_kvcache.py) decoding against a preallocated KV
cache. Every flash-attn argument is accepted with flash-attn's name, position and default.

Layout as in flash-attn: q (batch, seqlen_q, heads, head_dim), k/v (batch, seqlen_k, kv_heads,
head_dim); varlen: (total_tokens, heads, head_dim) with int32 cu_seqlens (batch + 1,). GQA/MQA when
kv_heads divides heads. Causal masks are aligned bottom-right: query i of a sequence sees key j when
j <= i + seqlen_k - seqlen_q. A query row that sees no key outputs zeros (its lse is +inf).

Not implemented, and refused with a ValueError naming the argument when given anything but
flash-attn's default: dropout (dropout_p), sliding windows (window_size), softcapping (softcap),
ALiBi (alibi_slopes) and paged KV (block_table). deterministic is accepted and has nothing to
switch on: every backward here is deterministic already (no atomics: in the cpu and triton kernels
each dq/dk/dv row has one writer, partial sums are added in a fixed order; the reference is plain
torch), and an attention kernel added to a backend must keep that property. The compiled backends
(cpu, cuda, triton) compute in fp32/bf16/fp16; fp64 attention (gradcheck) runs on the ref backend,
under ``use_backend("ref")``, and the others refuse it with a TypeError that says so.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import _checks, backend

ATTN_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def attention_ref(
    q: Tensor, k: Tensor, v: Tensor, causal: bool = False, softmax_scale: float | None = None
) -> tuple[Tensor, Tensor]:
    """Plain attention on dense (batch, seqlen, heads, head_dim) tensors: the oracle.

    Computed the way a plain torch implementation does it in the inputs' dtype (as transformers'
    eager attention): matmuls in that dtype, softmax in fp32 (fp64 for fp64). Run in fp64 it is the
    oracle; run in bf16 it is the low-precision baseline of the 2x rule, as in flash-attn's tests.
    Returns (out in q's dtype, lse (batch, heads, seqlen_q) in fp32, fp64 for fp64)."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    group = q.shape[2] // k.shape[2]
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # (b, h, s, d)
    kt, vt = kt.repeat_interleave(group, dim=1), vt.repeat_interleave(group, dim=1)
    scores = (torch.matmul(qt, kt.transpose(-1, -2)) * scale).to(acc)
    sq, sk = q.shape[1], k.shape[1]
    if causal:
        i = torch.arange(sq, device=q.device)[:, None]
        j = torch.arange(sk, device=q.device)[None, :]
        scores = scores.masked_fill(j > i + (sk - sq), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse[..., None]).nan_to_num(0.0)  # rows with no visible key -> 0
    lse = lse.masked_fill(torch.isneginf(lse), float("inf"))
    out = torch.matmul(probs.to(q.dtype), vt).transpose(1, 2).to(q.dtype)
    return out, lse


def attention_varlen_ref(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    causal: bool = False,
    softmax_scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """The dense reference applied sequence by sequence. Returns (out, lse (heads, total_q))."""
    outs, lses = [], []
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for b in range(len(cq) - 1):
        o, lse = attention_ref(
            q[None, cq[b] : cq[b + 1]], k[None, ck[b] : ck[b + 1]], v[None, ck[b] : ck[b + 1]], causal, softmax_scale
        )
        outs.append(o[0])
        lses.append(lse[0])
    out = torch.cat(outs) if outs else q.new_empty(q.shape)
    lse = torch.cat(lses, dim=-1) if lses else q.new_empty(q.shape[1], 0, dtype=torch.float32)
    return out, lse


# ---------------------------------------------------------------------------------------------
# checks


def _check_qkv(q: object, k: object, v: object, ndim: int, same_batch: bool = True) -> None:
    q = _checks.tensor("q", q, dtypes=ATTN_DTYPES + (torch.float64,), dim=ndim)
    k = _checks.tensor("k", k, dtypes=ATTN_DTYPES + (torch.float64,), dim=ndim)
    v = _checks.tensor("v", v, dtypes=ATTN_DTYPES + (torch.float64,), dim=ndim)
    _checks.same_dtype("q", q, k=k, v=v)
    _checks.same_device("q", q, k=k, v=v)
    if k.shape != v.shape:
        raise ValueError(f"k has shape {tuple(k.shape)} but v has shape {tuple(v.shape)}; they must match")
    d = q.shape[-1]
    if k.shape[-1] != d:
        raise ValueError(f"k has head_dim {k.shape[-1]} but q has head_dim {d}")
    if d % 8 != 0 or not 8 <= d <= 256:
        raise ValueError(f"head_dim must be a multiple of 8 between 8 and 256, got {d}")
    hq, hk = q.shape[-2], k.shape[-2]
    if hk == 0 or hq % hk != 0:
        raise ValueError(f"q has {hq} heads, which is not a multiple of k/v's {hk} heads (GQA/MQA need a divisor)")
    if ndim == 4 and same_batch and k.shape[0] != q.shape[0]:
        raise ValueError(f"k has batch {k.shape[0]} but q has batch {q.shape[0]}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        _checks.unit_last_stride(name, t)


def _check_cu_seqlens(name: str, cu: object, total: int, device: torch.device) -> Tensor:
    cu = _checks.tensor(name, cu, dtypes=(torch.int32,), dim=1)
    if cu.device != device:
        raise ValueError(f"{name} is on {cu.device} but q is on {device}")
    if cu.numel() < 1:
        raise ValueError(f"{name} must hold batch + 1 >= 1 offsets, got an empty tensor")
    host = cu.cpu()
    if host[0].item() != 0:
        raise ValueError(f"{name} must start at 0, got {host[0].item()}")
    if host.numel() > 1 and bool((host[1:] < host[:-1]).any()):
        raise ValueError(f"{name} must be non-decreasing, got {host.tolist()}")
    if host[-1].item() != total:
        raise ValueError(f"{name} ends at {host[-1].item()} but the packed tensor holds {total} tokens")
    return cu.contiguous()


def _scale(softmax_scale: object, d: int) -> float:
    if softmax_scale is None:
        return 1.0 / math.sqrt(d)
    return _checks.finite_float("softmax_scale", softmax_scale, positive=True)


def _reject_unsupported(
    dropout_p: object = 0.0,
    window_size: object = (-1, -1),
    softcap: object = 0.0,
    alibi_slopes: object = None,
    block_table: object = None,
) -> None:
    """Features flash-attn has and these kernels do not: accepted at flash-attn's default only."""
    if dropout_p != 0.0:
        raise ValueError(f"dropout_p={dropout_p!r}: attention dropout is not supported (use 0.0)")
    try:
        window = tuple(window_size)
    except TypeError:
        raise TypeError(f"window_size must be a pair (left, right), got {window_size!r}") from None
    if window != (-1, -1):
        raise ValueError(f"window_size={window_size!r}: sliding-window attention is not supported (use (-1, -1))")
    if softcap != 0.0:
        raise ValueError(f"softcap={softcap!r}: softcapping is not supported (use 0.0)")
    _reject_given("alibi_slopes", alibi_slopes, "ALiBi")
    _reject_given("block_table", block_table, "a paged KV cache")


def _reject_given(name: str, value: object, feature: str) -> None:
    """The optional tensor of a feature these kernels lack: only its default, None, is accepted."""
    if value is not None:
        what = f"a tensor of shape {tuple(value.shape)}" if isinstance(value, Tensor) else repr(value)
        raise ValueError(f"{name}={what}: {feature} is not supported (use None)")


def _kernel_dtype(impl: str, q: Tensor) -> None:
    """fp64 is the reference's precision: the compiled kernels tile fp32/bf16/fp16 only."""
    if impl != "ref" and q.dtype == torch.float64:
        raise TypeError(
            f"q has dtype float64, which the {impl!r} backend's attention kernels do not run (fp32, bf16, "
            'fp16 only); fp64 attention (e.g. for gradcheck) runs on the ref backend: with use_backend("ref")'
        )


def _returns(out: Tensor, lse: Tensor, return_lse: bool, return_attn_probs: bool):
    if return_attn_probs:
        return out, lse, None
    return (out, lse) if return_lse else out


# ---------------------------------------------------------------------------------------------
# custom ops (varlen layout is the one kernel; dense calls it with uniform cu_seqlens)


@torch.library.custom_op("internlm_fast::flash_attn_fwd", mutates_args=())
def _fwd(
    q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor, scale: float, causal: bool, impl: str
) -> tuple[Tensor, Tensor]:
    out, lse = backend.kernels(impl).flash_attn_fwd(q, k, v, cu_q, cu_k, scale, causal)
    return out, lse


@_fwd.register_fake
def _(q, k, v, cu_q, cu_k, scale, causal, impl):
    return q.new_empty(q.shape), q.new_empty(q.shape[1], q.shape[0], dtype=torch.float32)


@torch.library.custom_op("internlm_fast::flash_attn_bwd", mutates_args=())
def _bwd(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    cu_q: Tensor,
    cu_k: Tensor,
    scale: float,
    causal: bool,
    impl: str,
) -> tuple[Tensor, Tensor, Tensor]:
    dq, dk, dv = backend.kernels(impl).flash_attn_bwd(dout, q, k, v, out, lse, cu_q, cu_k, scale, causal)
    return dq, dk, dv


@_bwd.register_fake
def _(dout, q, k, v, out, lse, cu_q, cu_k, scale, causal, impl):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup(ctx, inputs, output):
    q, k, v, cu_q, cu_k, scale, causal, impl = inputs
    ctx.scale, ctx.causal, ctx.impl = scale, causal, impl
    ctx.save_for_backward(q, k, v, output[0], output[1], cu_q, cu_k)


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    dq, dk, dv = _bwd(dout, q, k, v, out, lse, cu_q, cu_k, ctx.scale, ctx.causal, ctx.impl)
    return dq, dk, dv, None, None, None, None, None


_fwd.register_autograd(_backward, setup_context=_setup)


def _attention(q, k, v, cu_q, cu_k, scale, causal, impl) -> tuple[Tensor, Tensor]:
    # Eager and without a gradient to record, the kernel is called directly: the custom op is for
    # autograd and torch.compile, and its first call imports torch._dynamo (about 150 MB and a second
    # of start-up, sympy and triton included), which an inference-only process never needs.
    needs_op = torch.compiler.is_compiling() or (
        torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    )
    if not needs_op:
        return tuple(backend.kernels(impl).flash_attn_fwd(q, k, v, cu_q, cu_k, scale, causal))
    return _fwd(q, k, v, cu_q, cu_k, scale, causal, impl)


def _uniform_cu(batch: int, seqlen: int, device: torch.device) -> Tensor:
    return torch.arange(0, (batch + 1) * seqlen, seqlen, dtype=torch.int32, device=device)


def _flatten(t: Tensor) -> Tensor:
    """(b, s, h, d) -> (b*s, h, d), a view when the strides allow it (q, k, v as slices of one qkv
    projection do). A view and not an as_strided: the latter's backward zeroes a buffer the size of
    the whole storage and scatters into it, per tensor, which cost a training step 1.5%."""
    b, s, h, d = t.shape
    if b > 1 and t.stride(0) != s * t.stride(1):
        t = t.contiguous()
    return t.view(b * s, h, d)


def flash_attn_func(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    *,
    return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor] | tuple[Tensor, Tensor, None]:
    """Attention over (batch, seqlen, heads, head_dim) tensors, flash-attn's `flash_attn_func`
    (same arguments, order and defaults; see the module docstring for the ones refused).

    Returns out (batch, seqlen_q, heads, head_dim). With return_lse (ours, keyword-only) also the
    log-sum-exp of the scaled scores, (batch, heads, seqlen_q) fp32: (out, lse). With
    return_attn_probs, flash-attn's triple (out, softmax_lse, S_dmask) with S_dmask None: flash-attn
    fills S_dmask only when dropout_p > 0 (it carries the dropout pattern), and dropout is refused
    here, so its answer at dropout_p=0 is None too. return_attn_probs wins over return_lse.
    """
    _check_qkv(q, k, v, 4)
    _reject_unsupported(dropout_p, window_size, softcap, alibi_slopes)
    scale = _scale(softmax_scale, q.shape[-1])
    impl = backend.select("flash_attn", q)
    _kernel_dtype(impl, q)
    if impl == "ref":
        out, lse = attention_ref(q, k, v, bool(causal), scale)
        return _returns(out, lse, return_lse, return_attn_probs)
    b, sq, hq, d = q.shape
    sk = k.shape[1]
    out, lse = _attention(
        _flatten(q),
        _flatten(k),
        _flatten(v),
        _uniform_cu(b, sq, q.device),
        _uniform_cu(b, sk, q.device),
        scale,
        bool(causal),
        impl,
    )
    return _returns(out.view(b, sq, hq, d), lse.view(hq, b, sq).transpose(0, 1), return_lse, return_attn_probs)


def flash_attn_varlen_func(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    block_table: Tensor | None = None,
    *,
    return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor] | tuple[Tensor, Tensor, None]:
    """Attention over packed sequences, flash-attn's `flash_attn_varlen_func`: q (total_q, heads,
    head_dim), k/v (total_k, kv_heads, head_dim), sequence b at rows cu_seqlens[b]:cu_seqlens[b+1].
    No attention crosses a sequence boundary. lse is (heads, total_q); return_lse and
    return_attn_probs return as in `flash_attn_func` ((out, lse) and (out, lse, None))."""
    _check_qkv(q, k, v, 3)
    _reject_unsupported(dropout_p, window_size, softcap, alibi_slopes, block_table)
    cu_q = _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], q.device)
    cu_k = _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], q.device)
    if cu_q.numel() != cu_k.numel():
        raise ValueError(f"cu_seqlens_q has {cu_q.numel()} offsets but cu_seqlens_k has {cu_k.numel()}")
    lq, lk = (cu_q[1:] - cu_q[:-1]), (cu_k[1:] - cu_k[:-1])
    for name, lens, m in (("max_seqlen_q", lq, max_seqlen_q), ("max_seqlen_k", lk, max_seqlen_k)):
        if isinstance(m, bool) or not isinstance(m, int) or (lens.numel() and m < int(lens.max())):
            raise ValueError(f"{name}={m!r} must be an int >= the longest sequence")
    scale = _scale(softmax_scale, q.shape[-1])
    impl = backend.select("flash_attn", q)
    _kernel_dtype(impl, q)
    if impl == "ref":
        out, lse = attention_varlen_ref(q, k, v, cu_q, cu_k, bool(causal), scale)
    else:
        out, lse = _attention(q, k, v, cu_q, cu_k, scale, bool(causal), impl)
    return _returns(out, lse, return_lse, return_attn_probs)
