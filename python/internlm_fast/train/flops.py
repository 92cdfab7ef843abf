"""Training FLOPs per step by InternLM's formula, so our TFLOPS compare with InternLM's own.

InternLM (internlm/utils/common.py, get_megatron_flops) counts the matmuls only:

    FLOPs = c * [(8 + 4*m) * B*s*h^2 + 4 * B*s^2*h] * L + 6 * B*s*h*V,    m = 1.5 * mlp_ratio

Derivation, per layer and token in the forward (a (k x n) weight costs 2*k*n FLOPs per token):
- q, k, v, o projections, four (h x h) weights: 8*h^2;
- the SwiGLU MLP, gate and up (h x I) and down (I x h): 6*h*I = 4*m*h^2 with m = 1.5 * I/h. InternLM
  writes mlp_ratio for I/h (its 7B config: MLP_RATIO = 8/3, I = 11008 after rounding 10923 up to a
  multiple of 256), and the 1.5 is the third matrix of the gated MLP;
- attention, Q K^T and P V over all s keys: 2 * 2*s*h per token, so 4*B*s^2*h per layer. The causal
  mask is not discounted (nor is it in InternLM's count): a kernel that skips masked tiles does less
  work than the count says.
The backward costs two forwards (gradients of the input and of the weight), hence c = 3, and 4
when activation checkpointing recomputes each layer's forward. The lm_head, (h x V), costs
2*h*V per token forward, 6*B*s*h*V with its backward, and is never recomputed.

With grouped-query attention the k and v projections are (h x kv_heads*head_dim): the 8 becomes
4 + 4 * kv_heads / heads, which is InternLM's 8 for multi-head attention.
"""

from __future__ import annotations

from internlm_fast.model.config import InternLMConfig


def train_flops_per_step(config: InternLMConfig, batch: int, seqlen: int, checkpointing: bool) -> float:
    """FLOPs of one training step (forward, backward) on `batch` sequences of `seqlen` tokens."""
    if batch <= 0 or seqlen <= 0:
        raise ValueError(f"batch and seqlen must be positive, got batch={batch}, seqlen={seqlen}")
    b, s, h, v = batch, seqlen, config.hidden_size, config.vocab_size
    c = 4 if checkpointing else 3
    m = 1.5 * config.intermediate_size / h
    proj = 4 + 4 * config.num_key_value_heads / config.num_attention_heads
    per_layer = (proj + 4 * m) * b * s * h**2 + 4 * b * s**2 * h
    return c * per_layer * config.num_hidden_layers + 6 * b * s * h * v


def tflops(flops_per_step: float, seconds_per_step: float, world_size: int = 1) -> float:
    """Achieved TFLOPS per device (InternLM's TFLOPS = FLOPs / (time * world * 1e12))."""
    return flops_per_step / (seconds_per_step * world_size * 1e12)
