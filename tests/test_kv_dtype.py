"""A KV cache in another dtype than the model's (kv_dtype): a bf16 cache for an fp32 model holds half
the bytes, and decodes within the flash-attn rule of the pure-torch reference with the same cache."""

from __future__ import annotations

import pytest
import torch

from internlm_fast.infer import GenerationConfig, KVCache, decode, generate_ids, prefill
from internlm_fast.ops import use_backend

from .conftest import assert_matches_oracle
from .generate_helpers import one_thread, small_model  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = [list(range(3, 40)), [5, 6, 7], [9] * 20]


def _logits(model, kv_dtype, steps=6):
    """Prefill logits and those of a few greedy decode steps, stacked (steps + 1, batch, vocab)."""
    with torch.inference_mode():
        cache = KVCache.for_model(model, len(PROMPTS), 64, kv_dtype)
        out = [prefill(model, cache, PROMPTS)]
        for _ in range(steps):
            out.append(decode(model, cache, out[-1].argmax(-1)))
    return torch.stack(out), cache


def test_a_bf16_cache_halves_the_bytes_and_keeps_the_flash_attn_rule():
    model = small_model()
    got, cache = _logits(model, torch.bfloat16)
    with use_backend("ref"):
        fp64, _ = _logits(small_model().double(), None)  # the oracle: everything in fp64
        ref, _ = _logits(model, torch.bfloat16)
    assert cache.kv[0].dtype == torch.bfloat16
    full, _ = _logits(model, None)
    assert cache.kv[0].element_size() * 2 == full.element_size() == 4
    assert_matches_oracle("logits", got, ref, fp64.float(), 1e-4)
    assert not torch.equal(got, full)  # the cache really is bf16: the logits moved


def test_generation_and_the_engine_take_kv_dtype():
    model = small_model()
    base = GenerationConfig(max_new_tokens=10)
    plain = generate_ids(model, PROMPTS, base)
    half = generate_ids(model, PROMPTS, GenerationConfig(max_new_tokens=10, kv_dtype="bf16"))
    # a clear-cut random model: rounding the cache to bf16 moves no greedy choice
    assert [g.ids for g in half] == [g.ids for g in plain]
    with pytest.raises(ValueError, match="kv_dtype must be one of fp32, bf16, fp16"):
        GenerationConfig(kv_dtype="int4")
