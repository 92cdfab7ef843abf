"""Triton kernels for internlm_fast: a file per op, named after it, each exposing the op's kernels
(`<op>_fwd` / `<op>_bwd`, or the op's name for a decode-only op) with the same arguments as the C++
backend (internlm_fast._C.cpu), so `internlm_fast.ops.backend` can swap one for the other.

Installed as the package internlm_fast.triton_kernels (setup.py maps this folder there); in a
source checkout run with PYTHONPATH=python, internlm_fast.ops.backend loads this folder under that
same name. On CPU tensors the kernels run only in Triton's interpreter (TRITON_INTERPRET=1, set
before triton is imported).
"""

from .cross_entropy import (
    cross_entropy_bwd,
    cross_entropy_fwd,
    fused_linear_cross_entropy_bwd,
    fused_linear_cross_entropy_fwd,
)
from .decode_rotary_append import decode_rotary_append
from .flash_attn import flash_attn_bwd, flash_attn_fwd
from .flash_attn_kvcache import flash_attn_kvcache_fwd
from .flatten_scale import flatten_scale_fwd
from .rms_norm import rms_norm_bwd, rms_norm_fwd
from .rotary import rotary_bwd, rotary_fwd
from .swiglu import swiglu_bwd, swiglu_fwd

__all__ = [
    "cross_entropy_bwd",
    "cross_entropy_fwd",
    "decode_rotary_append",
    "flash_attn_bwd",
    "flash_attn_fwd",
    "flash_attn_kvcache_fwd",
    "fused_linear_cross_entropy_bwd",
    "flatten_scale_fwd",
    "fused_linear_cross_entropy_fwd",
    "rms_norm_bwd",
    "rms_norm_fwd",
    "rotary_bwd",
    "rotary_fwd",
    "swiglu_bwd",
    "swiglu_fwd",
]
