"""Inference: KV-cache prefill and decode, sampling, stopping, streaming, generation and chat."""

from .chat import CHAT_DEFAULTS, chat, chat_prompt_ids, stream_chat
from .decoder import CachedDecoder
from .generate import (
    Generation,
    GenerationConfig,
    Step,
    generate_ids,
    generate_steps,
    generate_text,
    generate_tokens,
    stream_text,
)
from .kv_cache import KVCache
from .sampling import SamplingConfig, select_tokens
from .streaming import IncrementalDetokenizer, StopStringFilter, TextStream

__all__ = [
    "CHAT_DEFAULTS",
    "CachedDecoder",
    "Generation",
    "GenerationConfig",
    "IncrementalDetokenizer",
    "KVCache",
    "SamplingConfig",
    "Step",
    "StopStringFilter",
    "TextStream",
    "chat",
    "chat_prompt_ids",
    "generate_ids",
    "generate_steps",
    "generate_text",
    "generate_tokens",
    "select_tokens",
    "stream_chat",
    "stream_text",
]
