"""Inference on top of the model's forward with a KV cache: the cache storage, packed prefill and
decode steps, sampling, stopping, streaming, generation and chat."""

from .cache_storage import KVCache
from .chat import CHAT_DEFAULTS, chat, chat_prompt_ids, stream_chat
from .generate import (
    Generation,
    GenerationConfig,
    Step,
    decode,
    generate_ids,
    generate_steps,
    generate_text,
    generate_tokens,
    prefill,
    stream_text,
)
from .sampling import SamplingConfig, select_tokens
from .streaming import IncrementalDetokenizer, StopStringFilter, TextStream

__all__ = [
    "CHAT_DEFAULTS",
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
    "decode",
    "generate_ids",
    "generate_steps",
    "generate_text",
    "generate_tokens",
    "prefill",
    "select_tokens",
    "stream_chat",
    "stream_text",
]
