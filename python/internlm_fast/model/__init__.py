"""InternLM: configuration and the decoder model, built on internlm_fast.ops only."""

from .config import PRESETS, InternLMConfig, preset
from .modeling import CausalLMOutput, InternLMForCausalLM

__all__ = ["PRESETS", "InternLMConfig", "preset", "CausalLMOutput", "InternLMForCausalLM"]
