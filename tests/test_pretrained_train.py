"""The trainer and pretrained folders: the end-of-run export to final/, and model.init_from."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from internlm_fast.model import InternLMForCausalLM
from internlm_fast.model.pretrained import load_pretrained
from internlm_fast.train.checkpoint import load_checkpoint
from internlm_fast.train.config import ConfigError, load_config
from internlm_fast.train.trainer import Trainer

from .corpus_helpers import make_corpus
from .train_helpers import run_overrides


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    return make_corpus(tmp_path_factory.mktemp("corpus"), ("argparse.py", "textwrap.py", "shlex.py", "heapq.py"))


def _overrides(corpus, run_dir: Path, **extra) -> list[str]:
    return run_overrides(corpus, run_dir, **{"data.total_steps": 3, **extra})


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_training_ends_with_a_pretrained_folder(corpus, tmp_path, dtype):
    result = Trainer(load_config(None, _overrides(corpus, tmp_path / "run", **{"model.dtype": dtype}))).fit()
    assert result.final == tmp_path / "run" / "final"
    names = {p.name for p in result.final.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json"} <= names
    model = InternLMForCausalLM.from_pretrained(result.final)
    want = torch.bfloat16 if dtype == "bf16" else torch.float32
    assert model.lm_head.weight.dtype == want
    saved = load_checkpoint(result.checkpoint).model_state  # fp32 (the masters in a bf16 run)
    for name, t in model.state_dict().items():
        assert torch.equal(t, saved[name].to(want)), name
    # the checkpoint itself loads too, its config read from trainer.json
    from_ckpt = load_pretrained(result.checkpoint)
    assert from_ckpt.config == model.config and torch.equal(from_ckpt.lm_head.weight, saved["lm_head.weight"])


def test_init_from_continues_training_and_rejects_conflicting_fields(corpus, tmp_path):
    first = Trainer(load_config(None, _overrides(corpus, tmp_path / "a", **{"data.total_steps": 8}))).fit()
    fresh_loss = first.losses[0]
    # model fields come from the folder: no model.* keys needed, the preset is ignored
    keys = [o for o in _overrides(corpus, tmp_path / "b") if not o.startswith("model.")]
    cfg = load_config(None, keys + [f"model.init_from={first.final}", "model.max_position_embeddings=256"])
    trainer = Trainer(cfg)
    assert trainer.model_config.hidden_size == 64 and trainer.model_config.max_position_embeddings == 256
    loaded = load_pretrained(first.final)
    for name, t in loaded.state_dict().items():
        assert torch.equal(trainer.model.state_dict()[name], t), name
    second = trainer.fit()
    assert second.losses[0] < fresh_loss - 0.5, (second.losses[0], fresh_loss)
    assert load_pretrained(second.final).config.max_position_embeddings == 256
    with pytest.raises(ConfigError, match=r"model\.hidden_size=128 conflicts with 64 in model\.init_from"):
        load_config(None, keys + [f"model.init_from={first.final}", "model.hidden_size=128"])
    with pytest.raises(ConfigError, match=r"model\.init_from: .*does not exist"):
        load_config(None, keys + [f"model.init_from={tmp_path / 'nowhere'}"])


def test_readme_documents_init_from_in_the_generated_config_table():
    from internlm_fast.train.config import format_config_help

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = format_config_help(markdown=True)
    assert "| `model.init_from` | `None` |" in table
    assert table in readme, "README's config table is stale: paste format_config_help(markdown=True) into it"
    assert "## Converting to and from Hugging Face" in readme
