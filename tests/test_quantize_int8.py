"""Weight-only int8 inference: the quantized model's logits against the same quantization in pure
torch, greedy generation, memory, refusals, and the terminal chat with --quantize int8."""

from __future__ import annotations

import copy

import pytest
import torch

from internlm_fast.infer import KVCache, decode, prefill
from internlm_fast.model import InternLMForCausalLM
from internlm_fast.model.modeling import rotary_tables
from internlm_fast.model.quantize import resident_bytes
from internlm_fast.ops import use_backend
from internlm_fast.ops.inference import INT8_GROUP, dequantize_int8, inference_kernels, quantize_int8

from .conftest import ATOL, assert_matches_oracle
from .generate_helpers import one_thread, small_model, train_small_tokenizer  # noqa: F401 (fixture)
from .test_chat import _run_cli

pytestmark = pytest.mark.usefixtures("one_thread")


def _quantization_oracle(model: InternLMForCausalLM) -> InternLMForCausalLM:
    """The float model with every projection's weights replaced by what int8 keeps of them, in fp64."""
    oracle = copy.deepcopy(model).double()
    with torch.no_grad():
        for proj in oracle.projections():
            for lin in proj.linears:
                lin.weight.copy_(dequantize_int8(*quantize_int8(lin.weight), lin.in_features))
    oracle.rotary_cos, oracle.rotary_sin = (t.double() for t in rotary_tables(model.config))
    return oracle


def _last_logits(model: InternLMForCausalLM, seq: list[int]) -> torch.Tensor:
    with use_backend("ref"), torch.no_grad():
        return model(torch.tensor([seq])).logits[0, -1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logits_follow_the_quantization_oracle(dtype):
    """Prefill and decode steps of the int8 model against the same int8 model in pure torch (the
    dequantized weights, each linear's input rounded by int8_activations as the kernel rounds it) and
    the float model holding the dequantized weights in fp64: the 2x rule on each step's logits."""
    assert inference_kernels(torch.empty(1)).has_few_rows_linear_int8()  # decode steps run the kernel
    model = small_model(std=0.1).to(dtype)
    oracle = _quantization_oracle(model)
    quantized = copy.deepcopy(model).quantize_("int8")
    prompts = [[5, 9, 2, 7, 30, 11], list(range(40, 77))]
    seqs = [list(p) for p in prompts]
    with torch.inference_mode():
        caches = [KVCache.for_model(quantized, 2, 64) for _ in range(2)]
        got = prefill(quantized, caches[0], prompts)
        with use_backend("ref"):
            ref = prefill(quantized, caches[1], prompts)
        for step in range(4):
            for b, seq in enumerate(seqs):
                assert_matches_oracle(f"step {step} row {b}", got[b], ref[b], _last_logits(oracle, seq), ATOL[dtype])
            tokens = torch.tensor([3 + step, 200 - step])
            for b, t in enumerate(tokens.tolist()):
                seqs[b].append(t)
            got = decode(quantized, caches[0], tokens)
            with use_backend("ref"):
                ref = decode(quantized, caches[1], tokens)


def test_full_forward_of_a_quantized_model_follows_its_cached_one():
    """The cached prefill (six rows: the decode kernel) against the full forward (the dequantized
    GEMMs), both against the quantization oracle: their activations are rounded alike, so each errs
    by the rounding of its own."""
    model = small_model()
    oracle = _quantization_oracle(model)
    model.quantize_("int8")
    seq = [5, 9, 2, 7, 30, 11]
    with torch.inference_mode():
        cached = prefill(model, KVCache.for_model(model, 1, 16), [seq])[0]
        full = model(torch.tensor([seq])).logits[0, -1]
    assert_matches_oracle("cached prefill", cached, full, _last_logits(oracle, seq), ATOL[torch.float32])
    assert_matches_oracle("full forward", full, cached, _last_logits(oracle, seq), ATOL[torch.float32])


def test_greedy_generation_equals_fp32():
    model = small_model()
    ids = torch.tensor([[5, 9, 2, 7, 30], [3, 4, 5, 6, 7]])
    expect = model.generate(ids, max_new_tokens=16, do_sample=False)
    got = copy.deepcopy(model).quantize_("int8").generate(ids, max_new_tokens=16, do_sample=False)
    assert torch.equal(got, expect)


def test_memory_drops_to_the_int8_weights_and_scales():
    model = small_model()
    before = resident_bytes(model)
    linears = [lin for proj in model.projections() for lin in proj.linears]
    weights = sum(lin.weight.numel() for lin in linears)
    scales = sum(lin.weight.shape[0] * -(-lin.weight.shape[1] // INT8_GROUP) for lin in linears)
    biases = sum(lin.bias.numel() for lin in linears if lin.bias is not None)
    model.quantize_("int8")
    # fp32 weights (4 bytes) become int8 (1 byte) + one fp32 scale per INT8_GROUP; the packed biases
    # are a second copy of the (float) biases
    assert resident_bytes(model) == before - 4 * weights + weights + 4 * scales + 4 * biases
    assert all(lin.weight.numel() == 0 for lin in linears)


def test_a_tied_head_keeps_the_embedding():
    model = small_model(tie_word_embeddings=True)
    ids = torch.tensor([[5, 9, 2, 7, 30]])
    expect = model.generate(ids, max_new_tokens=8, do_sample=False)
    model.quantize_("int8")
    assert model.model.embed_tokens.weight.numel() > 0
    assert torch.equal(model.generate(ids, max_new_tokens=8, do_sample=False), expect)


def test_a_quantized_model_refuses_training():
    model = small_model().quantize_("int8")
    ids = torch.tensor([[5, 9, 2, 7]])
    with pytest.raises(RuntimeError, match="quantize"):
        model(ids, labels=ids)
    with pytest.raises(RuntimeError, match="quantize"):
        model(ids)  # autograd on
    with torch.no_grad(), pytest.raises(RuntimeError, match="quantize"):
        model(ids, labels=ids)
    with pytest.raises(ValueError, match="already quantized"):
        model.quantize_("int8")


def test_unknown_methods_are_refused(tmp_path):
    model = small_model()
    with pytest.raises(ValueError, match="quantize must be one of"):
        model.quantize_("int4")
    with pytest.raises(ValueError, match="quantize must be one of"):
        InternLMForCausalLM.from_pretrained(tmp_path, quantize="int4")  # before reading the folder


def test_from_pretrained_and_terminal_chat_with_int8(tmp_path):
    model = small_model()
    tokenizer = train_small_tokenizer(tmp_path)
    folder = model.save_pretrained(tmp_path / "model", tokenizer=tokenizer)
    quantized = InternLMForCausalLM.from_pretrained(folder, quantize="int8")
    assert quantized.quantization == "int8"
    args = ["--model", str(folder), "--greedy", "--max-new-tokens", "12", "--quantize", "int8"]
    out = _run_cli(args, "hello\n", tmp_path)
    assert out.returncode == 0, out.stderr
    expected, _ = quantized.chat(tokenizer, "hello", do_sample=False, max_new_tokens=12)
    assert out.stdout == f"Bot: {expected}\n"
