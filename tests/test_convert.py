"""`python -m internlm_fast.convert`: InternLM training checkpoints (packed Wqkv, pipeline shards), our
trainer checkpoints to Hugging Face, HF InternLM folders to ours, and its errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

import internlm_fast
from internlm_fast.convert.__main__ import main
from internlm_fast.data import Tokenizer, train_tokenizer
from internlm_fast.model import InternLMConfig, InternLMForCausalLM
from internlm_fast.model.pretrained import load_pretrained
from internlm_fast.train.checkpoint import save_checkpoint
from internlm_fast.train.config import config_to_dict, load_config

from .model_helpers import TINY_CONFIG

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

# three layers: the pipeline shards below hold two and one
SMALL = {**TINY_CONFIG, "num_hidden_layers": 3}


@pytest.fixture(scope="module")
def model() -> InternLMForCausalLM:
    torch.manual_seed(0)
    m = InternLMForCausalLM(InternLMConfig(**SMALL)).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.normal_(0.0 if name.endswith("bias") else 1.0, 0.1)
    return m


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    folder = tmp_path_factory.mktemp("tok")
    text = folder / "text.txt"
    text.write_text((Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py").read_text())
    return Tokenizer(train_tokenizer([text], folder / "tok.model", vocab_size=SMALL["vocab_size"]))


def _internlm_state(model: InternLMForCausalLM) -> dict[str, torch.Tensor]:
    """Our weights under InternLM's training names, Wqkv packed as (3, heads, head_dim, hidden)."""
    c, s = model.config, model.state_dict()
    out = {"embedding.weight": s["model.embed_tokens.weight"], "norm.weight": s["model.norm.weight"]}
    out["head.weight"] = s["lm_head.weight"]
    for i in range(c.num_hidden_layers):
        attn, p = f"model.layers.{i}.self_attn", f"blocks.{i}"
        heads, d = c.num_attention_heads, c.head_dim
        out[f"{p}.mixer.Wqkv.weight"] = torch.stack(
            [s[f"{attn}.{x}_proj.weight"].reshape(heads, d, c.hidden_size) for x in "qkv"]
        ).reshape(3 * heads * d, c.hidden_size)
        out[f"{p}.mixer.Wqkv.bias"] = torch.stack([s[f"{attn}.{x}_proj.bias"] for x in "qkv"]).reshape(-1)
        out[f"{p}.mixer.out_proj.weight"] = s[f"{attn}.o_proj.weight"]
        out[f"{p}.mixer.out_proj.bias"] = s[f"{attn}.o_proj.bias"]
        out[f"{p}.mixer.rotary_emb.inv_freq"] = torch.ones(d // 2)
        for w, hf in (("w1", "gate"), ("w2", "up"), ("w3", "down")):
            out[f"{p}.mlp.{w}.weight"] = s[f"model.layers.{i}.mlp.{hf}_proj.weight"]
        out[f"{p}.norm1.weight"] = s[f"model.layers.{i}.input_layernorm.weight"]
        out[f"{p}.norm2.weight"] = s[f"model.layers.{i}.post_attention_layernorm.weight"]
    return out


def _write_pipeline_shards(state: dict[str, torch.Tensor], folder: Path, first_stage_blocks: int) -> None:
    """Two pipeline stages with local block numbering and a `model.` prefix, as InternLM saves them."""
    folder.mkdir(parents=True)
    stages: list[dict] = [{}, {}]
    for key, t in state.items():
        if key.startswith("blocks."):
            i, rest = key.split(".", 2)[1:]
            stage = int(i) >= first_stage_blocks
            key = f"blocks.{int(i) - first_stage_blocks * stage}.{rest}"
        else:
            stage = key != "embedding.weight"
        stages[stage][f"model.{key}"] = t.clone()
    for pp, stage in enumerate(stages):
        torch.save(stage, folder / f"model_tp0_pp{pp}.pt")


def _assert_same_weights(a: InternLMForCausalLM, b: InternLMForCausalLM) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def test_internlm_training_checkpoint_with_pipeline_shards(tmp_path, model, capsys):
    src = tmp_path / "internlm"
    _write_pipeline_shards(_internlm_state(model), src, first_stage_blocks=2)
    (tmp_path / "config.json").write_text(json.dumps(SMALL))  # our field names
    assert main(["from-internlm", str(src), str(tmp_path / "a"), "--config", str(tmp_path / "config.json")]) == 0
    _assert_same_weights(model, load_pretrained(tmp_path / "a"))
    # a preset with --set overrides instead of a file
    sets = [f"--set={k}={v}" for k, v in SMALL.items()]
    assert main(["from-internlm", str(src), str(tmp_path / "b"), "--config", "tiny", *sets]) == 0
    _assert_same_weights(model, load_pretrained(tmp_path / "b"))
    # InternLM's own model_config.pt: no --config needed, sizes come from the tensors
    sizes = {k: SMALL[k] for k in ("num_attention_heads", "hidden_size", "vocab_size")}
    torch.save({**sizes, "num_layers": SMALL["num_hidden_layers"], "layer_norm_epsilon": 1e-6}, src / "model_config.pt")
    loaded = load_pretrained(src)
    assert loaded.config.max_position_embeddings == 2048
    with torch.no_grad():
        ids = torch.arange(40)[None] % SMALL["vocab_size"]
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    # wrong heads: the packed tensor does not fit, and the message says which file and key
    assert main(["from-internlm", str(src), str(tmp_path / "c"), "--config", "tiny"]) == 2
    err = capsys.readouterr().err
    assert "model_tp0_pp0.pt" in err and "Wqkv" in err and "num_attention_heads" in err
    assert not (tmp_path / "c").exists()


def test_internlm_checkpoint_errors(tmp_path, model):
    state = _internlm_state(model)
    state["blocks.1.mixer.extra.weight"] = torch.zeros(2)
    _write_pipeline_shards(state, tmp_path / "src", first_stage_blocks=2)
    config = InternLMConfig(**SMALL)
    with pytest.raises(ValueError, match=r"model_tp0_pp0\.pt: unexpected tensor 'blocks\.1\.mixer\.extra\.weight'"):
        load_pretrained(tmp_path / "src", config=config)
    (tmp_path / "src" / "model_tp0_pp1.pt").rename(tmp_path / "src" / "model_tp0_pp2.pt")
    with pytest.raises(ValueError, match=r"pipeline shards \[0, 2\]"):
        load_pretrained(tmp_path / "src", config=config)


def _trainer_checkpoint(model: InternLMForCausalLM, folder: Path, tokenizer: Tokenizer) -> Path:
    overrides = [f"--model.{k}={v}" for k, v in SMALL.items()] + [f"--data.tokenizer={tokenizer.model_path}"]
    cfg = load_config(None, overrides + ["--data.train=somewhere", "--data.seq_len=64"])
    state = {"loader": {}, "inf_nan_skip_batches": 0, "config": config_to_dict(cfg)}
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    return save_checkpoint(folder, 5, tensors, {"optimizer": {}}, state)


def test_trainer_checkpoint_to_hf_loads_in_transformers(tmp_path, model, tokenizer):
    ckpt = _trainer_checkpoint(model, tmp_path / "run" / "checkpoints", tokenizer)
    dst = tmp_path / "hf"
    # the run folder stands for its newest checkpoint; the tokenizer is the one its config names
    assert main(["to-hf", str(tmp_path / "run"), str(dst), "--dtype", "bf16", "--max-shard-size", "100KB"]) == 0
    assert (dst / "model.safetensors.index.json").is_file() and (dst / "tokenizer.model").is_file()
    hf = transformers.AutoModelForCausalLM.from_pretrained(dst, local_files_only=True, dtype=torch.float32).eval()
    ours = load_pretrained(dst)
    assert ours.lm_head.weight.dtype == torch.bfloat16
    ids = torch.tensor([tokenizer.encode("def f(x):\n    return x", bos=True)])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours.float()(ids).logits, atol=1e-4, rtol=0)
    hf_tok = transformers.AutoTokenizer.from_pretrained(dst, local_files_only=True)
    assert hf_tok("if x:\n\treturn 'y'")["input_ids"] == tokenizer.encode("if x:\n\treturn 'y'", bos=True)
    # fp32 from the checkpoint folder itself: bit-exact
    assert main(["to-hf", str(ckpt), str(tmp_path / "fp32"), "--no-progress"]) == 0
    _assert_same_weights(model, load_pretrained(tmp_path / "fp32"))


def test_from_hf_internlm_folder(tmp_path, model, tokenizer):
    src = tmp_path / "internlm-hf"
    src.mkdir()
    state = dict(model.state_dict())
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    torch.save(state, src / "pytorch_model.bin")
    hf_config = {"model_type": "internlm", "architectures": ["InternLMForCausalLM"], "bias": True, **SMALL}
    (src / "config.json").write_text(json.dumps(hf_config))
    (src / "tokenizer.model").write_bytes(tokenizer.model_path.read_bytes())
    (src / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "InternLMTokenizer", "auto_map": {}}))
    assert main(["from-hf", str(src), str(tmp_path / "ours")]) == 0
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert config["model_type"] == "llama" and config["attention_bias"] is True
    assert json.loads((tmp_path / "ours" / "tokenizer_config.json").read_text())["tokenizer_class"] == "LlamaTokenizer"
    _assert_same_weights(model, load_pretrained(tmp_path / "ours"))


def test_destination_is_never_overwritten_without_force(tmp_path, model, capsys):
    model.save_pretrained(tmp_path / "src")
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    assert main(["from-hf", str(tmp_path / "src"), str(dst)]) == 2
    assert "not empty" in capsys.readouterr().err and (dst / "keep.txt").read_text() == "mine"
    assert main(["from-hf", str(tmp_path / "src"), str(dst), "--force"]) == 0
    assert not (dst / "keep.txt").exists() and (dst / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary folders left
    # a failed conversion leaves no destination behind
    (tmp_path / "src" / "config.json").write_text(
        json.dumps({**json.loads((dst / "config.json").read_text()), "num_hidden_layers": 4})
    )
    assert main(["from-hf", str(tmp_path / "src"), str(tmp_path / "new")]) == 2
    assert "missing tensor(s) model.layers.3." in capsys.readouterr().err and not (tmp_path / "new").exists()


def test_cli_help_runs_as_a_module():
    src = str(Path(internlm_fast.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)}
    out = subprocess.run(
        [sys.executable, "-m", "internlm_fast.convert", "--help"], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0 and "from-internlm" in out.stdout and "to-hf" in out.stdout
