"""Loading and saving Hugging Face folders against real transformers (offline): logits equal both ways,
bit-exact round trips, .bin / safetensors / sharded, InternLM configs, tokenizer ids, memory mapping."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import pytest
import torch

from internlm_fast.data import Tokenizer, train_tokenizer
from internlm_fast.model import InternLMConfig, InternLMForCausalLM
from internlm_fast.model.pretrained import load_pretrained, save_pretrained

from .model_helpers import TINY_CONFIG

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

SMALL = TINY_CONFIG
VOCAB = SMALL["vocab_size"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    folder = tmp_path_factory.mktemp("tok")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    text = folder / "text.txt"
    text.write_text((stdlib / "textwrap.py").read_text() + (stdlib / "shlex.py").read_text())
    return Tokenizer(train_tokenizer([text], folder / "tok.model", vocab_size=VOCAB))


def _hf_model(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**{**SMALL, "attention_bias": True, **overrides})
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # biases and norms start at 0 / 1: make them matter
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.normal_(0.0 if name.endswith("bias") else 1.0, 0.1)
    return model


def _our_model(seed: int = 0, **overrides) -> InternLMForCausalLM:
    torch.manual_seed(seed)
    model = InternLMForCausalLM(InternLMConfig(**{**SMALL, **overrides})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.normal_(0.0 if name.endswith("bias") else 1.0, 0.1)
    return model


def _ids(batch: int = 2, seqlen: int = 37) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seqlen), generator=torch.Generator().manual_seed(1))


def _save_bin(model, folder: Path, shards: int = 1) -> None:
    """What transformers 4 wrote with safe_serialization=False: pytorch_model.bin, or shards + index."""
    model.config.save_pretrained(folder)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if shards == 1:
        torch.save(state, folder / "pytorch_model.bin")
        return
    names = list(state)
    weight_map = {}
    for i in range(shards):
        file = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {k: state[k] for k in names[i::shards]}
        torch.save(part, folder / file)
        weight_map.update(dict.fromkeys(part, file))
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.mark.parametrize("layout", ["safetensors", "sharded-safetensors", "bin", "sharded-bin", "gqa"])
def test_hf_llama_loads_with_equal_logits(tmp_path, layout):
    hf = _hf_model(num_key_value_heads=2 if layout == "gqa" else None)
    if layout.endswith("bin"):
        _save_bin(hf, tmp_path, shards=3 if layout.startswith("sharded") else 1)
    else:
        hf.save_pretrained(tmp_path, max_shard_size="100KB" if layout.startswith("sharded") else "5GB")
    assert (tmp_path / "model.safetensors.index.json").exists() == (layout == "sharded-safetensors")
    ours = load_pretrained(tmp_path)
    assert ours.config.bias and ours.config.num_key_value_heads == hf.config.num_key_value_heads
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf(ids).logits, atol=1e-4, rtol=0)


def test_ours_to_hf_folder_loads_in_transformers_with_equal_logits_and_token_ids(tmp_path, tokenizer):
    ours = _our_model()
    save_pretrained(ours, tmp_path, tokenizer=tokenizer, progress=False)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["attention_bias"] is True
    assert config["model_type"] == "llama" and config["mlp_bias"] is False and config["torch_dtype"] == "float32"
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True).eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids).logits, atol=1e-4, rtol=0)

    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert "Llama" in type(hf_tok).__name__
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [
        "hello world",
        "  def f(x):\n\treturn x * 2  # 12345\n\n",
        " leading space and trailing  ",
        "unicode: é 中文 😀 ∑",
        (stdlib / "heapq.py").read_text()[:6000],
    ]
    for text in texts:
        assert hf_tok(text)["input_ids"] == tokenizer.encode(text, bos=True), text[:40]
        assert hf_tok.decode(tokenizer.encode(text), skip_special_tokens=True) == text
    assert hf_tok.bos_token_id == tokenizer.bos_id and hf_tok.eos_token_id == tokenizer.eos_id
    generation = json.loads((tmp_path / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [tokenizer.eos_id, tokenizer.eoa_id]
    assert Tokenizer.from_pretrained(tmp_path).encode("x = 1") == tokenizer.encode("x = 1")


def test_tokenizer_save_and_from_pretrained(tmp_path, tokenizer):
    folder = tokenizer.save_pretrained(tmp_path / "tok")
    assert sorted(p.name for p in folder.iterdir()) == [
        "special_tokens_map.json",
        "tokenizer.model",
        "tokenizer_config.json",
    ]
    again = Tokenizer.from_pretrained(folder)
    text = "for i in range(10):\n    print(i)"
    assert again.encode(text) == tokenizer.encode(text) and again.eoa_id == tokenizer.eoa_id
    hf_tok = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    assert hf_tok(text)["input_ids"] == tokenizer.encode(text, bos=True)
    with pytest.raises(FileNotFoundError, match="has no tokenizer.model"):
        Tokenizer.from_pretrained(tmp_path)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ours_to_hf_to_ours_is_bit_exact(tmp_path, dtype):
    ours = _our_model()
    cos, sin = ours.rotary_cos, ours.rotary_sin
    ours.to(dtype)
    ours.rotary_cos, ours.rotary_sin = cos, sin  # fp32 tables, as the trainer and the loader keep them
    ours.save_pretrained(tmp_path / "a", max_shard_size="60KB")
    assert len(list((tmp_path / "a").glob("model-*.safetensors"))) > 1
    back = InternLMForCausalLM.from_pretrained(tmp_path / "a")
    a, b = ours.state_dict(), back.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert b[k].dtype == dtype and torch.equal(a[k], b[k]), k
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, back(ids).logits)
    # saved again over the sharded folder as one file: the stale shards and index go
    save_pretrained(back, tmp_path / "a", progress=False)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
    ]
    assert load_pretrained(tmp_path / "a", dtype=torch.float32).lm_head.weight.dtype == torch.float32


def test_tied_embeddings_round_trip_through_transformers(tmp_path):
    hf = _hf_model(tie_word_embeddings=True)
    hf.save_pretrained(tmp_path / "hf")
    ours = load_pretrained(tmp_path / "hf")
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    ours.save_pretrained(tmp_path / "ours")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", local_files_only=True).eval()
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf(ids).logits, atol=1e-4, rtol=0)
        torch.testing.assert_close(again(ids).logits, hf(ids).logits, atol=1e-4, rtol=0)


def test_internlm_config_folder_loads(tmp_path):
    """HF InternLM (model_type internlm, remote code): `bias`, `rotary`, and inv_freq buffers in the weights."""
    hf = _hf_model()
    state = dict(hf.state_dict())
    head_dim = SMALL["hidden_size"] // SMALL["num_attention_heads"]
    for i in range(SMALL["num_hidden_layers"]):
        state[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = torch.ones(head_dim // 2)
    torch.save(state, tmp_path / "pytorch_model.bin")
    config = {
        "architectures": ["InternLMForCausalLM"],
        "auto_map": {"AutoModelForCausalLM": "modeling_internlm.InternLMForCausalLM"},
        "model_type": "internlm",
        "bias": True,
        "rotary": {"base": 10000, "type": "dynamic"},
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "torch_dtype": "float32",
        **SMALL,
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    ours = load_pretrained(tmp_path)
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf(ids).logits, atol=1e-4, rtol=0)


def test_errors_name_the_file_and_the_tensor(tmp_path):
    from safetensors.torch import load_file, save_file

    _our_model().save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    state = load_file(weights)
    save_file({k: v for k, v in state.items() if k != "model.layers.1.mlp.up_proj.weight"}, weights)
    with pytest.raises(KeyError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*model\.safetensors"):
        load_pretrained(tmp_path)
    save_file({**state, "model.layers.0.mlp.gate_proj.weight": torch.zeros(95, 64)}, weights)
    with pytest.raises(ValueError, match=r"model\.safetensors.*gate_proj\.weight.*\(95, 64\).*\(96, 64\)"):
        load_pretrained(tmp_path)
    save_file({**state, "model.layers.0.extra.weight": torch.zeros(1)}, weights)
    with pytest.raises(KeyError, match=r"model\.safetensors.*unexpected tensor 'model\.layers\.0\.extra\.weight'"):
        load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match=r"config\.json: model_type 'gpt2' is not supported"):
        load_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pretrained(tmp_path / "nowhere")


def _anon_mib() -> float:
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("RssAnon")) / 1024


def _mapped_files(address: int) -> list[str]:
    """The file mapped at `address` in this process (from /proc/self/maps), [] if it is anonymous memory."""
    found = []
    for line in open("/proc/self/maps"):
        fields = line.split()
        lo, hi = (int(x, 16) for x in fields[0].split("-"))
        if lo <= address < hi and len(fields) > 5:
            found.append(fields[5])
    return found


def test_loading_is_memory_mapped(tmp_path):
    """A ~200 MB checkpoint: every weight of the loaded model lies in a memory map of the file, and
    reading all of them grows the process' anonymous memory by far less than their size."""
    config = InternLMConfig(**{**SMALL, "vocab_size": 24576, "hidden_size": 1024, "num_attention_heads": 8})
    with torch.device("meta"):
        model = InternLMForCausalLM(config)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(-0.01, 0.01)
    save_pretrained(model, tmp_path, progress=False)
    del model
    before = _anon_mib()
    loaded = load_pretrained(tmp_path)
    weights_mib = sum(p.numel() * p.element_size() for p in loaded.parameters()) / 2**20
    assert weights_mib > 180 and all(p.sum().isfinite() for p in loaded.parameters())  # every page read
    grown_mib = _anon_mib() - before
    assert grown_mib < 0.1 * weights_mib, (weights_mib, grown_mib)
    weights_file = str(tmp_path / "model.safetensors")
    for name, p in loaded.named_parameters():
        assert _mapped_files(p.data_ptr()) == [weights_file], name
