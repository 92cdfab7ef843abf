"""decode_layer: a decode step's decoder layer in one call, for projections in decode-GEMM layout (int8,
bf16, or a small fp32 model's column-panel copies). It runs the kernels the model otherwise calls one
by one, in the same order: the logits and the cache it writes must be the same to the bit, for int8,
bf16 and fp32 weights, GQA, a batch of sequences of different lengths, a paged cache and rope
scaling; and the step must take it where it applies."""

from __future__ import annotations

import copy

import pytest
import torch

from internlm_fast.infer import KVCache, decode, prefill
from internlm_fast.model import InternLMForCausalLM, modeling
from internlm_fast.ops import available
from internlm_fast.ops.inference import inference_kernels

from .generate_helpers import one_thread, small_model  # noqa: F401 (fixture)

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(not available("cpu"), reason="the C++ kernels are not built"),
]

PROMPTS = [[5, 9, 2, 7, 30], list(range(40, 77)), [8]]


def _model(layout: str, **overrides) -> InternLMForCausalLM:
    model = small_model(std=0.1, **overrides)
    if layout == "bf16":
        return model.to(torch.bfloat16).prepare_inference_()
    if layout == "int8 bf16":
        return model.to(torch.bfloat16).quantize_("int8")
    if layout == "fp32":  # decodes on the fp32 column panels each prefill checks
        return model
    return model.quantize_("int8")


def _cache(model: InternLMForCausalLM, paged: bool) -> KVCache:
    """Zeroed, so the rows no token was written to compare equal too."""
    if paged:
        page, blocks = 8, 8  # 64 tokens a sequence, its pages spread over the pool in shuffled order
        cache = KVCache.pool_for_model(model, len(PROMPTS) * blocks, page)
        table = torch.randperm(len(PROMPTS) * blocks, generator=torch.Generator().manual_seed(0)).to(torch.int32)
        cache.set_rows(table.view(len(PROMPTS), blocks), torch.zeros(len(PROMPTS), dtype=torch.int64))
    else:
        cache = KVCache.for_model(model, len(PROMPTS), 64)
    for rows in cache.flat:
        rows.zero_()
    return cache


def _run(model: InternLMForCausalLM, paged: bool, steps: int = 5) -> tuple[list[torch.Tensor], KVCache]:
    with torch.inference_mode():
        cache = _cache(model, paged)
        logits = [prefill(model, cache, PROMPTS)]
        for _ in range(steps):
            logits.append(decode(model, cache, logits[-1].argmax(-1)))
    return logits, cache


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize(
    "layout, overrides",
    [
        ("int8", {}),
        ("int8", {"num_key_value_heads": 2}),
        ("int8 bf16", {}),
        ("bf16", {"num_key_value_heads": 2}),
        ("bf16", {"max_position_embeddings": 32, "rope_scaling": {"type": "dynamic", "factor": 2.0}}),
        ("fp32", {}),
        ("fp32", {"num_key_value_heads": 2, "rope_scaling": {"type": "linear", "factor": 2.0}}),
    ],
    ids=["int8", "int8-gqa", "int8-bf16-activations", "bf16-gqa", "bf16-dynamic-rope", "fp32", "fp32-gqa-linear-rope"],
)
def test_one_call_equals_the_ops_one_by_one(monkeypatch, layout, overrides, paged):
    model = _model(layout, **overrides)
    kernels = inference_kernels(model.lm_head.weight)
    fused, calls = kernels.decode_layer, []
    assert fused is not None, "decode_layer should serve CPU tensors where the C++ kernels are built"

    def counted(*args):
        calls.append(1)
        return fused(*args)

    monkeypatch.setattr(kernels, "decode_layer", counted)
    one_call, one_call_cache = _run(model, paged)
    layers = model.config.num_hidden_layers
    assert len(calls) == 5 * layers, f"{len(calls)} decode_layer calls for 5 steps of {layers} layers"

    monkeypatch.setattr(kernels, "decode_layer", None)
    by_op, by_op_cache = _run(copy.deepcopy(model), paged)
    for step, (a, b) in enumerate(zip(one_call, by_op)):
        assert torch.equal(a, b), f"step {step}: logits differ by up to {(a - b).abs().max().item():.3g}"
    for layer in range(layers):
        assert torch.equal(one_call_cache.flat[layer], by_op_cache.flat[layer]), f"layer {layer}'s cache differs"


def test_not_taken_where_it_does_not_apply(monkeypatch):
    """An fp32 model too large for decoding copies (its projections on the parameters themselves),
    or a cache in another dtype than the activations, decodes op by op."""
    kernels = inference_kernels(torch.empty(1))
    calls = []
    monkeypatch.setattr(kernels, "decode_layer", lambda *a: calls.append(1))
    model = small_model(std=0.1)
    with torch.inference_mode():
        q8 = copy.deepcopy(model).quantize_("int8")
        cache = KVCache.for_model(q8, 1, 16, torch.bfloat16)
        decode(q8, cache, prefill(q8, cache, [[5, 9]]).argmax(-1))
        monkeypatch.setattr(modeling, "MAX_COPY_BYTES", 0)
        cache = KVCache.for_model(model, 1, 16)
        decode(model, cache, prefill(model, cache, [[5, 9]]).argmax(-1))
        assert all(p.decode_weights is None for p in model.projections())
    assert not calls
