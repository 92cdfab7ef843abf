"""Cross-entropy over a vocabulary, and the same loss fused with the lm_head projection.

cross_entropy(logits, labels) = mean (or sum) over the tokens whose label is not ignore_index of
    logsumexp(logits[t]) - logits[t, labels[t]]
fused_linear_cross_entropy(hidden, weight, labels) = cross_entropy(hidden @ weight.T, labels),
    computed chunk by chunk so the (tokens, vocab) logits never exist whole.

Deviation from torch: with reduction="mean" and every label ignored the loss is 0.0 with a zero
gradient (torch gives NaN), so a fully masked micro-batch does not poison training. NaN logits
still give a NaN loss. The loss is fp32 (fp64 for fp64 inputs) whatever the input dtype.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _checks, backend

REDUCTIONS = ("mean", "sum")
# tokens per chunk of the fused op; unset or 0 lets the backend choose (tests force small chunks)
CHUNK_ENV_VAR = "INTERNLM_FAST_FLCE_CHUNK"


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def cross_entropy_ref(logits: Tensor, labels: Tensor, ignore_index: int = -100, reduction: str = "mean") -> Tensor:
    """Pure-torch cross-entropy: the oracle. Computes in fp32 (fp64 for fp64 logits)."""
    lf = logits.reshape(-1, logits.shape[-1]).to(_acc(logits.dtype))
    lab = labels.reshape(-1)
    total = F.cross_entropy(lf, lab, ignore_index=ignore_index, reduction="sum")
    if reduction == "sum":
        return total
    return total / (lab != ignore_index).sum().clamp(min=1)


def fused_linear_cross_entropy_ref(
    hidden: Tensor, weight: Tensor, labels: Tensor, ignore_index: int = -100, reduction: str = "mean"
) -> Tensor:
    """Pure-torch linear + cross-entropy (materialises the logits, in hidden's dtype): the oracle."""
    return cross_entropy_ref(hidden @ weight.T, labels, ignore_index, reduction)


# ---- argument checks (Python, before any kernel) ----


def _check_options(ignore_index: object, reduction: object) -> None:
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(REDUCTIONS)}, got {reduction!r}")


def _check_labels(labels: object, lead_name: str, lead: Tensor) -> Tensor:
    labels = _checks.tensor("labels", labels, dtypes=(torch.int64,), min_dim=0)
    if labels.shape != lead.shape[:-1]:
        raise ValueError(
            f"labels has shape {tuple(labels.shape)} but {lead_name} has shape {tuple(lead.shape)}; "
            f"labels must have {lead_name}'s shape without its last dimension"
        )
    _checks.same_device(lead_name, lead, labels=labels)
    return labels


def _check_label_values(labels: Tensor, vocab: int, ignore_index: int) -> None:
    """Data-dependent, so it runs inside the custom ops (eagerly, also under torch.compile)."""
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        first = labels[bad][0].item()
        raise ValueError(f"labels must lie in [0, {vocab}) or equal ignore_index={ignore_index}; found {first}")


def _check_chunk_size(chunk_size: object) -> int:
    if chunk_size is None:
        env = os.environ.get(CHUNK_ENV_VAR, "").strip()
        if not env:
            return 0
        if not env.isdigit():
            raise ValueError(f"{CHUNK_ENV_VAR}={env!r}: expected a non-negative integer")
        return int(env)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise TypeError(f"chunk_size must be an int or None, got {type(chunk_size).__name__}")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
    return chunk_size


# ---- custom ops: forward and backward each a torch.library op, so torch.compile sees them ----


@torch.library.custom_op("internlm_fast::cross_entropy_fwd", mutates_args=())
def _ce_fwd(logits: Tensor, labels: Tensor, ignore_index: int, reduction: str, impl: str) -> tuple[Tensor, Tensor]:
    _check_label_values(labels, logits.shape[-1], ignore_index)
    loss, lse = backend.kernels(impl).cross_entropy_fwd(logits, labels, ignore_index, reduction)
    return loss, lse


@torch.library.custom_op("internlm_fast::cross_entropy_bwd", mutates_args=())
def _ce_bwd(
    dloss: Tensor, logits: Tensor, labels: Tensor, lse: Tensor, ignore_index: int, reduction: str, impl: str
) -> Tensor:
    return backend.kernels(impl).cross_entropy_bwd(dloss, logits, labels, lse, ignore_index, reduction)


@_ce_fwd.register_fake
def _(logits, labels, ignore_index, reduction, impl):
    acc = _acc(logits.dtype)
    return logits.new_empty((), dtype=acc), logits.new_empty(logits.shape[0], dtype=acc)


@_ce_bwd.register_fake
def _(dloss, logits, labels, lse, ignore_index, reduction, impl):
    return torch.empty_like(logits)


def _ce_setup(ctx, inputs, output):
    logits, labels, ctx.ignore_index, ctx.reduction, ctx.impl = inputs
    ctx.save_for_backward(logits, labels, output[1])


def _ce_backward(ctx, dloss, _dlse):
    logits, labels, lse = ctx.saved_tensors
    dlogits = _ce_bwd(dloss, logits, labels, lse, ctx.ignore_index, ctx.reduction, ctx.impl)
    return dlogits, None, None, None, None


_ce_fwd.register_autograd(_ce_backward, setup_context=_ce_setup)


@torch.library.custom_op("internlm_fast::fused_linear_cross_entropy_fwd", mutates_args=())
def _flce_fwd(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    ignore_index: int,
    reduction: str,
    chunk_size: int,
    need_dhidden: bool,
    need_dweight: bool,
    impl: str,
) -> tuple[Tensor, Tensor, Tensor]:
    _check_label_values(labels, weight.shape[0], ignore_index)
    loss, dh, dw = backend.kernels(impl).fused_linear_cross_entropy_fwd(
        hidden, weight, labels, ignore_index, reduction, chunk_size, need_dhidden, need_dweight
    )
    return loss, dh, dw


@torch.library.custom_op("internlm_fast::fused_linear_cross_entropy_bwd", mutates_args=())
def _flce_bwd(dloss: Tensor, dhidden: Tensor, dweight: Tensor, impl: str) -> tuple[Tensor, Tensor]:
    dh, dw = backend.kernels(impl).fused_linear_cross_entropy_bwd(dloss, dhidden, dweight)
    return dh, dw


@_flce_fwd.register_fake
def _(hidden, weight, labels, ignore_index, reduction, chunk_size, need_dhidden, need_dweight, impl):
    loss = hidden.new_empty((), dtype=_acc(hidden.dtype))
    dh = torch.empty_like(hidden) if need_dhidden else hidden.new_empty(0)
    dw = torch.empty_like(weight) if need_dweight else weight.new_empty(0)
    return loss, dh, dw


@_flce_bwd.register_fake
def _(dloss, dhidden, dweight, impl):
    return torch.empty_like(dhidden), torch.empty_like(dweight)


def _flce_setup(ctx, inputs, output):
    # dhidden and dweight are outputs only to be saved: without this autograd would hand the
    # backward zero-filled gradients for them, a transient (V, H) + (tokens, H) allocation
    ctx.set_materialize_grads(False)
    ctx.impl = inputs[-1]
    ctx.need = (inputs[6], inputs[7])
    ctx.save_for_backward(output[1], output[2])


def _is_real_unit(dloss: Tensor) -> bool:
    """Whether dloss is a concrete CPU 1.0 (the usual loss.backward()): then the gradients the
    forward computed are returned as they are, with no pass over dweight and no copy of it (autograd
    moves them into .grad). Under tracing (fake or functional tensors) the answer is unknowable, so
    the scaling op always runs there. With retain_graph, .grad then shares the saved buffer: an
    in-place change to .grad before another backward is refused by autograd's version check."""
    return type(dloss) is torch.Tensor and dloss.device.type == "cpu" and dloss.item() == 1.0


def _flce_backward(ctx, dloss, _ddh, _ddw):
    if dloss is None:
        return (None,) * 9
    dh, dw = ctx.saved_tensors
    if not _is_real_unit(dloss):
        dh, dw = _flce_bwd(dloss, dh, dw, ctx.impl)
    need_dh, need_dw = ctx.need
    return (dh if need_dh else None), (dw if need_dw else None), None, None, None, None, None, None, None


_flce_fwd.register_autograd(_flce_backward, setup_context=_flce_setup)


# ---- public API ----


def cross_entropy(logits: Tensor, labels: Tensor, ignore_index: int = -100, reduction: str = "mean") -> Tensor:
    """Cross-entropy of `logits` (..., V) against int64 `labels` (...), ignoring `ignore_index`.

    reduction "mean" averages over the non-ignored tokens (0.0 if there are none), "sum" sums them
    (exact gradient accumulation across micro-batches). Returns a 0-d fp32 loss (fp64 for fp64
    logits); the gradient flows to `logits` only, in logits' dtype.
    """
    logits = _checks.tensor("logits", logits)
    labels = _check_labels(labels, "logits", logits)
    _check_options(ignore_index, reduction)
    if logits.shape[-1] == 0:
        raise ValueError("logits has an empty last (vocabulary) dimension")
    impl = backend.select("cross_entropy", logits)
    if impl == "ref":
        if not torch.compiler.is_compiling():
            _check_label_values(labels, logits.shape[-1], ignore_index)
        return cross_entropy_ref(logits, labels, ignore_index, reduction)
    x2 = _checks.last_dim_contiguous("logits", logits).view(-1, logits.shape[-1])
    loss, _ = _ce_fwd(x2, labels.reshape(-1).contiguous(), ignore_index, reduction, impl)
    return loss


def fused_linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    chunk_size: int | None = None,
) -> Tensor:
    """cross_entropy(hidden @ weight.T, labels) without materialising the (tokens, V) logits.

    hidden (..., H), weight (V, H) (the lm_head, same dtype as hidden), labels int64 (...).
    The gradients for hidden and weight are computed during the forward and only scaled in the
    backward. chunk_size: tokens per chunk (default: the backend's choice, or the environment
    variable INTERNLM_FAST_FLCE_CHUNK).
    """
    hidden = _checks.tensor("hidden", hidden)
    weight = _checks.tensor("weight", weight, dim=2)
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight has shape {tuple(weight.shape)} but hidden's last dimension is {hidden.shape[-1]}; "
            "weight must be (vocab, hidden)"
        )
    if weight.shape[0] == 0:
        raise ValueError("weight has an empty vocabulary (first) dimension")
    _checks.same_dtype("hidden", hidden, weight=weight)
    _checks.same_device("hidden", hidden, weight=weight)
    labels = _check_labels(labels, "hidden", hidden)
    _check_options(ignore_index, reduction)
    chunk = _check_chunk_size(chunk_size)
    impl = backend.select("fused_linear_cross_entropy", hidden)
    if impl == "ref":
        if not torch.compiler.is_compiling():
            _check_label_values(labels, weight.shape[0], ignore_index)
        return fused_linear_cross_entropy_ref(hidden, weight, labels, ignore_index, reduction)
    grad = torch.is_grad_enabled()
    h2 = _checks.last_dim_contiguous("hidden", hidden).view(-1, hidden.shape[-1])
    w = _checks.last_dim_contiguous("weight", weight)
    loss, _, _ = _flce_fwd(
        h2,
        w,
        labels.reshape(-1).contiguous(),
        ignore_index,
        reduction,
        chunk,
        grad and hidden.requires_grad,
        grad and weight.requires_grad,
        impl,
    )
    return loss
