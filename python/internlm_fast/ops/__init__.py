"""The public op API. The model calls these and nothing below them.

Every op picks its backend by device (see `backend`) and checks its arguments before any kernel.
"""

from . import registry
from .backend import BACKENDS, BackendUnavailable, available, use_backend
from .cross_entropy import (
    cross_entropy,
    cross_entropy_ref,
    fused_linear_cross_entropy,
    fused_linear_cross_entropy_ref,
)
from .flash_attn import attention_ref, attention_varlen_ref, flash_attn_func, flash_attn_varlen_func
from .flash_attn_kvcache import flash_attn_with_kvcache, flash_attn_with_kvcache_ref
from .flash_attn_packed import (
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
)
from .flatten_scale import flatten_scale_, flatten_scale_ref
from .linear import fp32_gemm, linear, use_fp32_gemm
from .rms_norm import rms_norm, rms_norm_ref
from .rotary import apply_rotary, apply_rotary_ref
from .swiglu import swiglu, swiglu_packed, swiglu_packed_ref, swiglu_ref

__all__ = [
    "registry",
    "BACKENDS",
    "BackendUnavailable",
    "available",
    "use_backend",
    "rms_norm",
    "rms_norm_ref",
    "apply_rotary",
    "apply_rotary_ref",
    "swiglu",
    "swiglu_packed",
    "swiglu_packed_ref",
    "swiglu_ref",
    "cross_entropy",
    "cross_entropy_ref",
    "fused_linear_cross_entropy",
    "fused_linear_cross_entropy_ref",
    "flatten_scale_",
    "flatten_scale_ref",
    "linear",
    "fp32_gemm",
    "use_fp32_gemm",
    "flash_attn_func",
    "flash_attn_varlen_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_with_kvcache",
    "attention_ref",
    "attention_varlen_ref",
    "flash_attn_with_kvcache_ref",
]
