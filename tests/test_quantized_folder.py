"""int8 model folders (model.quantized_folder): save/load round trips give the in-memory int8 model
bit for bit, loading never makes the linears' float weights, convert --quantize int8 writes them,
chat loads them, and damaged folders fail naming the file and the tensor."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.utils._python_dispatch import TorchDispatchMode

from internlm_fast.chat.loading import load_model
from internlm_fast.convert.__main__ import main as convert_main
from internlm_fast.model import InternLMForCausalLM
from internlm_fast.model.modeling import rotary_tables
from internlm_fast.model.quantize import resident_bytes
from internlm_fast.model.quantized_folder import QUANT_METHOD
from internlm_fast.ops.inference import INT8_GROUP, dequantize_int8

from .generate_helpers import one_thread, small_model, train_small_tokenizer  # noqa: F401 (fixture)
from .test_chat import _run_cli

pytestmark = pytest.mark.usefixtures("one_thread")

IDS = torch.tensor([[5, 9, 2, 7, 30, 11, 40, 3]])
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
LINEARS += ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _float_model(dtype: torch.dtype = torch.float32, **overrides) -> InternLMForCausalLM:
    model = small_model(**overrides).to(dtype)
    # as from_pretrained gives them: fp32 rotary tables whatever the dtype, so saved and loaded
    # models compute the same function
    model.rotary_cos, model.rotary_sin = rotary_tables(model.config)
    return model


def _logits(model: InternLMForCausalLM) -> torch.Tensor:
    with torch.inference_mode():
        return model(IDS).logits


def _greedy(model: InternLMForCausalLM) -> torch.Tensor:
    return model.generate(IDS, max_new_tokens=8, do_sample=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tied", [False, True])
def test_round_trip_gives_the_in_memory_int8_model(tmp_path, dtype, tied):
    quantized = _float_model(dtype, tie_word_embeddings=tied).quantize_("int8")
    folder = quantized.save_pretrained(tmp_path / "int8")
    config = json.loads((folder / "config.json").read_text())
    assert config["quantization_config"] == {
        "quant_method": QUANT_METHOD,
        "bits": 8,
        "group_size": INT8_GROUP,
        "sym": True,
        "scale_dtype": "float32",
        "format_version": 1,
    }
    loaded = InternLMForCausalLM.from_pretrained(folder)
    assert loaded.quantization == "int8"
    for a, b in zip(quantized.projections(), loaded.projections()):
        for x, y in zip(a._int8, b._int8):
            assert (x is None and y is None) or torch.equal(x, y)
    assert torch.equal(_logits(loaded), _logits(quantized))
    assert torch.equal(_greedy(loaded), _greedy(quantized))
    assert resident_bytes(loaded) == resident_bytes(quantized)
    # quantize="int8" on an int8 folder is what it already is
    again = InternLMForCausalLM.from_pretrained(folder, quantize="int8")
    assert torch.equal(_logits(again), _logits(quantized))


def test_file_holds_canonical_int8_weights_and_scales(tmp_path):
    """The documented layout: (out, in) int8 and (out, ceil(in / 64)) fp32 per linear, which
    dequantize to what the model computes with; float tensors as they are; no tied lm_head."""
    model = _float_model()
    quantized = _float_model().quantize_("int8")
    folder = quantized.save_pretrained(tmp_path / "int8", max_shard_size="40KB")
    assert (folder / "model.safetensors.index.json").is_file()  # sharded like a float folder
    tensors = {}
    for f in sorted(folder.glob("model-*.safetensors")):
        tensors.update(load_file(f))
    state = model.state_dict()
    for layer in range(model.config.num_hidden_layers):
        for lin in LINEARS:
            name = f"model.layers.{layer}.{lin}"
            w, q, s = state[f"{name}.weight"], tensors[f"{name}.weight"], tensors[f"{name}.weight_scale"]
            out, k = w.shape
            assert q.dtype == torch.int8 and q.shape == (out, k)
            assert s.dtype == torch.float32 and s.shape == (out, -(-k // INT8_GROUP))
            dequantized = q.float() * s.repeat_interleave(INT8_GROUP, dim=1)[:, :k]
            assert (dequantized - w).abs().max() <= s.max() / 2 + 1e-7
            if f"{name}.bias" in state:
                assert torch.equal(tensors[f"{name}.bias"], state[f"{name}.bias"])
    q, s = tensors["lm_head.weight"], tensors["lm_head.weight_scale"]
    panels, scales, _ = quantized.head._int8
    dequantized = q.float() * s.repeat_interleave(INT8_GROUP, dim=1)[:, : q.shape[1]]
    assert torch.equal(dequantized, dequantize_int8(panels, scales, q.shape[1]))
    for name in ("model.embed_tokens.weight", "model.norm.weight", "model.layers.0.input_layernorm.weight"):
        assert torch.equal(tensors[name], state[name])
    tied = _float_model(tie_word_embeddings=True).quantize_("int8").save_pretrained(tmp_path / "tied")
    with safe_open(str(tied / "model.safetensors"), framework="pt") as f:
        assert not any(k.startswith("lm_head.") for k in f.keys())


class _FloatAllocations(TorchDispatchMode):
    """Records the shapes of the floating-point tensors that ops allocate (views and the tensors
    read from a file excluded)."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor) and t.is_floating_point() and t.device.type != "meta":
                    self.shapes.append(tuple(t.shape))
        return out


def test_loading_never_makes_the_float_weights_of_the_linears(tmp_path):
    model = _float_model()
    quantized = _float_model().quantize_("int8")
    folder = quantized.save_pretrained(tmp_path / "int8")
    smallest = min(lin.weight.numel() for proj in model.projections() for lin in proj.linears)
    with _FloatAllocations() as spy:
        loaded = InternLMForCausalLM.from_pretrained(folder)
    big = [s for s in spy.shapes if torch.Size(s).numel() >= smallest]
    assert not big, f"loading allocated float tensors as large as a linear's weight: {big}"
    assert all(lin.weight.numel() == 0 for proj in loaded.projections() for lin in proj.linears)
    assert resident_bytes(loaded) == resident_bytes(quantized) < resident_bytes(model) / 2


def test_convert_quantize_int8_end_to_end(tmp_path, capsys):
    model = _float_model()
    tokenizer = train_small_tokenizer(tmp_path)
    src = model.save_pretrained(tmp_path / "float", tokenizer=tokenizer)
    dst = tmp_path / "int8"
    assert convert_main(["from-hf", str(src), str(dst), "--quantize", "int8", "--no-progress"]) == 0
    assert "int8 linears" in capsys.readouterr().err
    assert (dst / "tokenizer.model").is_file() and (dst / "generation_config.json").is_file()
    expected = InternLMForCausalLM.from_pretrained(src, quantize="int8")
    loaded = InternLMForCausalLM.from_pretrained(dst)
    assert torch.equal(_logits(loaded), _logits(expected))

    # --dtype casts before quantizing, as from_pretrained(dtype=..., quantize=...) does; scales stay fp32
    assert convert_main(["to-hf", str(src), str(tmp_path / "bf16"), "--quantize", "int8", "--dtype", "bf16"]) == 0
    with safe_open(str(tmp_path / "bf16" / "model.safetensors"), framework="pt") as f:
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16
        assert f.get_tensor("model.layers.0.self_attn.q_proj.weight_scale").dtype == torch.float32
    bf16 = InternLMForCausalLM.from_pretrained(src, dtype=torch.bfloat16, quantize="int8")
    assert torch.equal(_logits(InternLMForCausalLM.from_pretrained(tmp_path / "bf16")), _logits(bf16))

    # an int8 source: rewritten with --quantize int8, refused without (no silent dequantization)
    assert convert_main(["to-hf", str(dst), str(tmp_path / "again"), "--quantize", "int8"]) == 0
    assert torch.equal(_logits(InternLMForCausalLM.from_pretrained(tmp_path / "again")), _logits(expected))
    capsys.readouterr()
    assert convert_main(["to-hf", str(dst), str(tmp_path / "float2")]) == 2
    assert "is an int8 folder" in capsys.readouterr().err and not (tmp_path / "float2").exists()


def test_chat_loads_an_int8_folder_with_or_without_quantize(tmp_path):
    tokenizer = train_small_tokenizer(tmp_path)
    folder = _float_model().quantize_("int8").save_pretrained(tmp_path / "int8", tokenizer=tokenizer)
    for quantize in (None, "int8"):  # serve loads through the same load_model
        loaded, _ = load_model(folder, quantize=quantize)
        assert loaded.quantization == "int8"
    expected, _ = InternLMForCausalLM.from_pretrained(folder).chat(
        tokenizer, "hello", do_sample=False, max_new_tokens=12
    )
    out = _run_cli(
        ["--model", str(folder), "--greedy", "--max-new-tokens", "12", "--quantize", "int8"], "hello\n", tmp_path
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == f"Bot: {expected}\n"


def _rewrite(folder: Path, edit) -> None:
    path = folder / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


Q = "model.layers.1.self_attn.q_proj"


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.__setitem__(f"{Q}.weight_scale", t[f"{Q}.weight_scale"][:, :0]), "has shape"),
        (lambda t: t.pop(f"{Q}.weight_scale"), "missing tensor"),
        (lambda t: t.__setitem__(f"{Q}.weight", t[f"{Q}.weight"].float()), "torch.float32; an int8 folder stores"),
        (lambda t: t.__setitem__(f"{Q}.weight_scale", -t[f"{Q}.weight_scale"]), "negative or non-finite"),
        (lambda t: t.__setitem__(f"{Q}.weight_zero", t[f"{Q}.weight_scale"].clone()), "unexpected tensor"),
    ],
    ids=["scale-shape", "missing-scale", "float-weight", "negative-scale", "unexpected"],
)
def test_damaged_tensors_name_the_file_and_the_tensor(tmp_path, edit, message):
    folder = _float_model().quantize_("int8").save_pretrained(tmp_path / "int8")
    _rewrite(folder, edit)
    with pytest.raises(ValueError, match=message) as err:
        InternLMForCausalLM.from_pretrained(folder)
    assert str(folder / "model.safetensors") in str(err.value)
    assert Q in str(err.value)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"quant_method": "gptq", "bits": 8}, "quant_method 'gptq' is not supported"),
        ({"quant_method": QUANT_METHOD, "bits": 4}, "bits 4 is not supported"),
        ({"quant_method": QUANT_METHOD, "group_size": 128}, "group_size 128 is not supported"),
        ({"quant_method": QUANT_METHOD, "format_version": 2}, "format_version 2 is not supported"),
        ("int8", "must be an object"),
    ],
)
def test_unknown_quantization_configs_are_refused(tmp_path, entry, message):
    folder = _float_model().quantize_("int8").save_pretrained(tmp_path / "int8")
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = entry
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message) as err:
        InternLMForCausalLM.from_pretrained(folder)
    assert str(folder / "config.json") in str(err.value)
