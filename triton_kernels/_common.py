"""Launch-configuration helpers shared by the Triton kernels."""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl


def acc_dtype(dtype: torch.dtype) -> tl.dtype:
    """fp32 accumulation for fp32/bf16/fp16 storage, fp64 for fp64 (as the C++ kernels do)."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def num_warps(block_elems: int) -> int:
    """Warps for a program that holds `block_elems` elements of a row: ~8 to 32 elements per thread,
    so wide rows do not spill registers and narrow rows do not leave lanes idle."""
    if block_elems >= 16384:
        return 16
    return min(max(block_elems // 256, 1), 8)


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_programs(device: torch.device, per_sm: int = 4) -> int:
    """How many persistent programs fill the device: a few per SM on a GPU; on the CPU (Triton's
    interpreter runs programs one after another) a handful, so partial buffers stay small."""
    if device.type == "cuda":
        return per_sm * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 4


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def interpreted() -> bool:
    """Whether kernels run in Triton's CPU interpreter rather than compiled for a GPU."""
    return bool(triton.knobs.runtime.interpret)


def emulate_bf16_rounding(dtype: torch.dtype) -> bool:
    """Triton's interpreter (3.x) casts fp32 to bf16 by truncating the mantissa, where a GPU rounds
    to nearest even; that doubles the storage error and fails the 2x accuracy rule. Kernels round by
    hand (`store_cast`) only in that case, so compiled GPU code keeps the native conversion."""
    return dtype == torch.bfloat16 and interpreted()


@triton.jit
def store_cast(x, DTYPE: tl.constexpr, BF16_RNE: tl.constexpr):
    """x converted to the storage dtype DTYPE, rounding to nearest even."""
    if BF16_RNE:
        # round the fp32 bits to their top 16 (ties to even) so the truncating cast is exact
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True).to(DTYPE)
    else:
        return x.to(DTYPE)
