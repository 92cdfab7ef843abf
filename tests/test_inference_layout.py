"""The bf16 inference layout (prepare_inference_, from_pretrained(..., inference=True)): the model
keeps only its decode panels, gives the logits of the bf16 model it came from, releases the linear
weights, refuses training, loads from a folder without holding the file's weights beside the panels,
and is what the terminal chat runs."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import internlm_fast
from internlm_fast.chat import load_model
from internlm_fast.infer import KVCache, decode, prefill
from internlm_fast.model import InternLMForCausalLM, projection
from internlm_fast.model.modeling import rotary_tables
from internlm_fast.model.weight_files import UnmappedReader, write_safetensors
from internlm_fast.ops import use_backend
from internlm_fast.ops.inference import few_rows_linear_bf16_panels, inference_kernels, unpair_panels, write_panels

from .conftest import ATOL, assert_matches_oracle
from .generate_helpers import one_thread, small_model, train_small_tokenizer  # noqa: F401 (fixture)
from .test_chat import _run_cli

pytestmark = pytest.mark.usefixtures("one_thread")


def _bf16_model(std: float = 0.1, **overrides) -> InternLMForCausalLM:
    return small_model(std=std, **overrides).to(torch.bfloat16)


def _laid_out(model: InternLMForCausalLM) -> InternLMForCausalLM:
    out = copy.deepcopy(model).prepare_inference_()
    assert out.inference_layout and all(p.laid_out for p in out.projections())
    return out


def _steps(model: InternLMForCausalLM, prompts: list[list[int]], steps: int = 4) -> list[torch.Tensor]:
    """The logits of a prefill of `prompts`, then of `steps` decode steps."""
    with torch.inference_mode():
        cache = KVCache.for_model(model, len(prompts), 64)
        out = [prefill(model, cache, prompts)]
        for s in range(steps):
            out.append(decode(model, cache, torch.tensor([3 + s, 200 - s][: len(prompts)])))
    return out


def test_decode_steps_equal_the_bf16_models():
    """Up to FEW_ROWS tokens the bf16 model also runs few_rows_linear_bf16 on the same panels: the
    same bits, prefill and decode steps."""
    assert inference_kernels(torch.empty(1, dtype=torch.bfloat16)).has_few_rows_linear_bf16(
        torch.empty(16, 1, dtype=torch.bfloat16)
    )
    model = _bf16_model()
    prompts = [[5, 9, 2, 7, 30, 11], [40, 41, 42, 43, 44, 45, 46]]
    for got, expect in zip(_steps(_laid_out(model), prompts), _steps(model, prompts)):
        assert torch.equal(got, expect)


@pytest.mark.parametrize("panel_rows", [projection.PANEL_ROWS, 4])
def test_long_inputs_follow_the_oracle(monkeypatch, panel_rows):
    """Prompts past FEW_ROWS tokens: through the kernel on the panels (up to PANEL_ROWS rows) or the
    rebuilt weight (past it, forced here with panel_rows 4); the 2x rule against the fp64 model, for
    the prefill, decode steps and the forward without a cache."""
    monkeypatch.setattr(projection, "PANEL_ROWS", panel_rows)
    model = _bf16_model()
    oracle = copy.deepcopy(model).double()
    oracle.rotary_cos, oracle.rotary_sin = (t.double() for t in rotary_tables(model.config))
    prompts = [list(range(40, 77)), [5, 9, 2, 7, 30, 11]]
    seqs = [list(p) for p in prompts]
    got, ref = _steps(_laid_out(model), prompts), _steps(model, prompts)
    for step, (g, r) in enumerate(zip(got, ref)):
        for b, seq in enumerate(seqs):
            with use_backend("ref"), torch.no_grad():
                full = oracle(torch.tensor([seq])).logits[0, -1]
            assert_matches_oracle(f"step {step} row {b}", g[b], r[b], full, ATOL[torch.bfloat16])
            seq.append([3 + step, 200 - step][b])
    ids = torch.tensor([list(range(5, 45))])
    with torch.no_grad():
        got, ref = _laid_out(model)(ids).logits, model(ids).logits
        with use_backend("ref"):
            full = oracle(ids).logits
    assert_matches_oracle("forward without a cache", got, ref, full, ATOL[torch.bfloat16])


def test_greedy_generation_equals_the_bf16_models():
    model = _bf16_model(std=0.3)
    ids = torch.tensor([[5, 9, 2, 7, 30], [3, 4, 5, 6, 7]])
    expect = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert torch.equal(_laid_out(model).generate(ids, max_new_tokens=12, do_sample=False), expect)


def _held_bytes(model: InternLMForCausalLM) -> int:
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    for proj in model.projections():
        if proj.laid_out:
            tensors.update((id(t), t) for t in proj._bf16[:2] if t is not None)
    return sum(t.numel() * t.element_size() for t in tensors.values())


def test_linear_weights_are_released_and_held_once_as_panels():
    model = _bf16_model()
    linears = [lin for proj in model.projections() for lin in proj.linears]
    biases = sum(lin.bias.numel() * 2 for lin in linears if lin.bias is not None)
    before = _held_bytes(model)
    model.prepare_inference_()
    assert all(lin.weight.numel() == 0 and not lin.weight.requires_grad for lin in linears)
    # the panels hold exactly the weights (the hidden size is even); the packed biases are a second copy
    assert _held_bytes(model) == before + biases
    for proj in model.projections():
        panels, _, k = proj._bf16
        assert torch.equal(unpair_panels(panels, k), proj.dense_weight())


def test_a_tied_head_keeps_the_embedding():
    model = _bf16_model(std=0.3, tie_word_embeddings=True)
    ids = torch.tensor([[5, 9, 2, 7, 30]])
    expect = model.generate(ids, max_new_tokens=8, do_sample=False)
    laid_out = _laid_out(model)
    assert (
        laid_out.model.embed_tokens.weight.numel() > 0 and laid_out.lm_head.weight is laid_out.model.embed_tokens.weight
    )
    assert torch.equal(laid_out.generate(ids, max_new_tokens=8, do_sample=False), expect)


def test_other_dtypes_are_left_as_they_are():
    model = small_model().prepare_inference_()
    assert not model.inference_layout and all(lin.weight.numel() for lin in model.head.linears)


def test_the_layout_refuses_training_and_saving(tmp_path):
    model = _laid_out(_bf16_model())
    ids = torch.tensor([[5, 9, 2, 7]])
    with pytest.raises(RuntimeError, match="laid out for inference"):
        model(ids, labels=ids)
    with pytest.raises(RuntimeError, match="laid out for inference"):
        model(ids)  # autograd on
    with torch.no_grad(), pytest.raises(RuntimeError, match="laid out for inference"):
        model(ids, labels=ids)
    with pytest.raises(ValueError, match="laid out for inference"):
        model.save_pretrained(tmp_path / "again")


def test_int8_quantization_of_the_layout_equals_the_float_models():
    model = _bf16_model(std=0.3)
    ids = torch.tensor([[5, 9, 2, 7, 30]])
    expect = copy.deepcopy(model).quantize_("int8").generate(ids, max_new_tokens=8, do_sample=False)
    quantized = _laid_out(model).quantize_("int8")
    assert all(not p.laid_out for p in quantized.projections())
    assert torch.equal(quantized.generate(ids, max_new_tokens=8, do_sample=False), expect)


def _same_panels(a: InternLMForCausalLM, b: InternLMForCausalLM) -> bool:
    return all(
        torch.equal(p._bf16[0], q._bf16[0]) and (p._bf16[1] is None or torch.equal(p._bf16[1], q._bf16[1]))
        for p, q in zip(a.projections(), b.projections(), strict=True)
    )


@pytest.mark.parametrize("tied", [False, True])
def test_from_pretrained_builds_the_panels_while_reading(tmp_path, tied):
    model = _bf16_model(tie_word_embeddings=tied)
    folder = model.save_pretrained(tmp_path / "bf16", max_shard_size="100KB")
    assert len(list(folder.glob("*.safetensors"))) > 1
    loaded = InternLMForCausalLM.from_pretrained(folder, inference=True)
    assert loaded.inference_layout and _same_panels(loaded, _laid_out(model))
    assert all(lin.weight.numel() == 0 for lin in loaded.model.layers[0].mlp.gate_up.linears)
    assert torch.equal(loaded.model.embed_tokens.weight, model.model.embed_tokens.weight)
    ids = torch.tensor([[5, 9, 2, 7, 30]])
    assert torch.equal(
        loaded.generate(ids, max_new_tokens=6, do_sample=False), model.generate(ids, max_new_tokens=6, do_sample=False)
    )


def test_from_pretrained_casts_fp32_and_reads_bin_files(tmp_path):
    fp32 = small_model(std=0.1)
    folder = fp32.save_pretrained(tmp_path / "fp32")
    expect = _laid_out(copy.deepcopy(fp32).to(torch.bfloat16))
    assert _same_panels(InternLMForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, inference=True), expect)
    assert not InternLMForCausalLM.from_pretrained(folder, inference=True).inference_layout  # fp32 stays trainable
    bin_folder = tmp_path / "bin"
    bin_folder.mkdir()
    (bin_folder / "config.json").write_text((folder / "config.json").read_text())
    torch.save(dict(fp32.state_dict()), bin_folder / "pytorch_model.bin")
    loaded = InternLMForCausalLM.from_pretrained(bin_folder, dtype=torch.bfloat16, inference=True)
    assert _same_panels(loaded, expect)
    assert torch.equal(loaded.model.norm.weight, expect.model.norm.weight)


def test_file_rows_read_what_the_file_holds(tmp_path):
    t = torch.randn(48, 10).to(torch.bfloat16)
    write_safetensors(tmp_path / "a.safetensors", {"x": torch.ones(3), "t": t})
    rows = UnmappedReader().rows(tmp_path / "a.safetensors", "t")
    assert rows.shape == t.shape and rows.dtype == torch.bfloat16
    assert torch.equal(rows[:], t) and torch.equal(rows[16:40], t[16:40]) and rows[47:60].shape == (1, 10)
    assert UnmappedReader().rows(tmp_path / "a.safetensors", "missing") is None
    panels = torch.empty(3, 5, 32, dtype=torch.bfloat16)
    write_panels(panels, 0, rows[:16])  # written in pieces, as lay_out_bf16_ does
    write_panels(panels, 1, rows[16:48])
    assert torch.equal(panels, few_rows_linear_bf16_panels(t))


_PEAK = r"""
import json, sys, torch
from internlm_fast.model import InternLMForCausalLM
inference = sys.argv[2] == "1"
model = InternLMForCausalLM.from_pretrained(sys.argv[1], inference=inference)
if not inference:
    model.prepare_inference_()
with open("/proc/self/status") as f:
    peak = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
print(json.dumps({"peak": peak, "laid_out": model.inference_layout}))
"""


def test_loading_does_not_keep_the_file_resident(tmp_path):
    """A model of 67 MB of linear weights: laid out while read, the process peaks at least 60% of
    that below the memory-mapped load laid out afterwards, whose touched file pages stay resident
    (measured: 61 MB below)."""
    model = _bf16_model(hidden_size=512, intermediate_size=2048, vocab_size=512, num_hidden_layers=8)
    linear_bytes = sum(lin.weight.numel() * 2 for p in model.projections() for lin in p.linears)
    assert linear_bytes > 60e6
    folder = model.save_pretrained(tmp_path / "m")
    del model
    env = {**os.environ, "PYTHONPATH": str(Path(internlm_fast.__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    peaks = {}
    for inference in ("1", "0"):
        out = subprocess.run(
            [sys.executable, "-c", _PEAK, str(folder), inference], capture_output=True, text=True, env=env, timeout=120
        )
        assert out.returncode == 0, out.stderr
        result = json.loads(out.stdout.strip().splitlines()[-1])
        assert result["laid_out"]
        peaks[inference] = result["peak"]
    assert peaks["1"] < peaks["0"] - 0.6 * linear_bytes, peaks


def test_chat_loads_bf16_models_laid_out(tmp_path):
    model = _bf16_model(std=0.3)
    tokenizer = train_small_tokenizer(tmp_path)
    folder = model.save_pretrained(tmp_path / "model", tokenizer=tokenizer)
    loaded, _ = load_model(folder)
    assert loaded.inference_layout
    args = ["--model", str(folder), "--greedy", "--max-new-tokens", "12"]
    out = _run_cli(args, "hello\n", tmp_path)
    assert out.returncode == 0, out.stderr
    expected, _ = model.chat(tokenizer, "hello", do_sample=False, max_new_tokens=12)
    assert out.stdout == f"Bot: {expected}\n"


def test_the_serving_engine_runs_the_layout(tmp_path):
    """Continuous batching and a prefill after a reused prefix, on the panels: each request gets what
    generating it alone gives."""
    import asyncio

    from internlm_fast.infer import GenerationConfig, generate_ids
    from internlm_fast.serve.engine import Engine
    from internlm_fast.serve.requests import SamplingParams

    model = _laid_out(_bf16_model(std=0.3))
    tokenizer = train_small_tokenizer(tmp_path)
    engine = Engine(model, tokenizer, max_batch=3, block_size=4, prefix_cache=True)
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    first = list(range(1, 30))
    prompts = [first, [5, 9, 2, 7], list(range(60, 80)), first + [7, 8, 9]]

    async def one(prompt):
        req = engine.submit(prompt, params)
        return [out.token_id async for out in req], req.cached_tokens

    async def main():
        head = await one(prompts[0])
        return [head, *await asyncio.gather(*(one(p) for p in prompts[1:]))]

    engine.start()
    try:
        got = asyncio.run(main())
    finally:
        engine.shutdown()
    assert got[-1][1] > 0  # the last prompt continues the first one's cached blocks
    for prompt, (ids, _) in zip(prompts, got):
        assert ids == generate_ids(model, [prompt], GenerationConfig(max_new_tokens=8))[0].ids
