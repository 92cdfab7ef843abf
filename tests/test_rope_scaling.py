"""Rope scaling (transformers' linear and dynamic NTK): logits equal transformers'
LlamaForCausalLM(attention_bias=True, rope_scaling=...) on the same weights past max_position_embeddings,
in the full forward, a packed row and KV-cache decoding; chunked prefill equals one prefill; configs
load, save and fail with clear errors; the trainer trains with a scaling."""

from __future__ import annotations

import json

import pytest
import torch

from internlm_fast.infer import generate as gen
from internlm_fast.infer.cache_storage import KVCache
from internlm_fast.model import InternLMConfig, InternLMForCausalLM
from internlm_fast.model.hf_config import config_from_hf
from internlm_fast.model.pretrained import load_pretrained
from internlm_fast.model.rope import dynamic_rows

from .generate_helpers import one_thread  # noqa: F401 (fixture)
from .model_helpers import TINY_CONFIG

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

CFG = {**TINY_CONFIG, "max_position_embeddings": 32}
SCALINGS = {"linear": {"rope_type": "linear", "factor": 3.0}, "dynamic": {"rope_type": "dynamic", "factor": 2.5}}
TOL = dict(rtol=1e-4, atol=1e-4)


def _pair(scaling: dict | None) -> tuple[torch.nn.Module, InternLMForCausalLM]:
    """transformers' model and ours with the same random weights; a fresh transformers model each
    time, since its dynamic frequencies depend on the forwards it ran before."""
    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(**CFG, attention_bias=True, tie_word_embeddings=False, rope_scaling=scaling)
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.2) if p.dim() > 1 else p.add_(0.1 * torch.randn_like(p))
    ours = InternLMForCausalLM(InternLMConfig(**CFG, rope_scaling=scaling)).eval()
    missing, unexpected = ours.load_state_dict(hf.state_dict(), strict=False)
    assert not missing and all("rotary" in k for k in unexpected), (missing, unexpected)
    return hf, ours


def _ids(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, CFG["vocab_size"], (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", SCALINGS)
def test_forward_matches_transformers_past_max_positions(kind):
    hf, ours = _pair(SCALINGS[kind])
    ids = _ids(80)
    with torch.no_grad():
        expected = hf(ids).logits
        got = ours(ids).logits
    torch.testing.assert_close(got, expected, **TOL)
    _, plain = _pair(None)
    with torch.no_grad():
        unscaled = plain(ids[:, :32]).logits
        # dynamic scaling leaves a sequence within max_position_embeddings alone, linear does not
        assert torch.allclose(ours(ids[:, :32]).logits, unscaled, atol=1e-5) == (kind == "dynamic")
        assert not torch.allclose(got[:, :32], unscaled, atol=1e-2)


def test_dynamic_packed_row_scales_each_document_by_its_own_length():
    hf, ours = _pair(SCALINGS["dynamic"])
    docs = [_ids(70, 2), _ids(20, 3), _ids(45, 4)]
    cu = torch.tensor([0, 70, 90, 135], dtype=torch.int32)
    with torch.no_grad():
        got = ours(torch.cat(docs, dim=1), cu_seqlens=cu).logits[0]
        for doc, a, b in zip(docs, cu[:-1], cu[1:]):
            hf_doc = _pair(SCALINGS["dynamic"])[0]  # fresh: transformers keeps the longest length seen
            torch.testing.assert_close(got[a:b], hf_doc(doc).logits[0], **TOL)
    del hf


def _hf_decode(hf, ids: torch.Tensor, steps: int) -> tuple[list[torch.Tensor], list[int]]:
    """transformers' greedy KV-cache decoding: the logits of every step and the tokens chosen."""
    logits, tokens = [], []
    with torch.no_grad():
        out = hf(ids, use_cache=True)
        for _ in range(steps):
            last = out.logits[0, -1]
            logits.append(last)
            tokens.append(int(last.argmax()))
            out = hf(torch.tensor([[tokens[-1]]]), past_key_values=out.past_key_values, use_cache=True)
    return logits, tokens


def _our_decode(model, prompt: list[int], tokens: list[int]) -> list[torch.Tensor]:
    """Our logits of every step, fed transformers' tokens."""
    with torch.inference_mode():
        cache = KVCache.for_model(model, 1, len(prompt) + len(tokens))
        out = [gen.prefill(model, cache, [prompt])[0]]
        for t in tokens[:-1]:
            out.append(gen.decode(model, cache, torch.tensor([t]))[0])
    return out


@pytest.mark.parametrize("kind", SCALINGS)
@pytest.mark.parametrize("prompt_len", [20, 40])
def test_kvcache_decoding_matches_transformers(kind, prompt_len):
    """Prompts shorter and longer than max_position_embeddings, decoded past it at batch 1."""
    hf, ours = _pair(SCALINGS[kind])
    ids = _ids(prompt_len, 5)
    expected, tokens = _hf_decode(hf, ids, 80 - prompt_len)
    got = _our_decode(ours, ids[0].tolist(), tokens)
    for step, (g, e) in enumerate(zip(got, expected)):
        torch.testing.assert_close(g, e, **TOL, msg=lambda m, step=step: f"step {step}: {m}")
    generated = ours.generate(ids, max_new_tokens=80 - prompt_len)[0, prompt_len:].tolist()
    assert generated == tokens


@pytest.mark.parametrize("kind", [None, "dynamic"])
def test_chunked_prefill_gives_the_logits_of_one_prefill(kind, monkeypatch):
    _, model = _pair(SCALINGS.get(kind))
    lengths = [60 if kind else 30, 7, 25]  # past max_position_embeddings where the scaling allows it
    prompts = [_ids(n, 10 + n)[0].tolist() for n in lengths]

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        with torch.inference_mode():
            cache = KVCache.for_model(model, 3, 80)
            first = gen.prefill(model, cache, prompts)
            assert cache.lens.tolist() == lengths and cache.batch == 3
            return first, gen.decode(model, cache, first.argmax(-1))

    one = run()
    monkeypatch.setattr(gen, "PREFILL_CHUNK", 16)
    chunked = run()
    torch.testing.assert_close(chunked[0], one[0], **TOL)
    torch.testing.assert_close(chunked[1], one[1], **TOL)


def test_context_length_is_max_positions_times_factor():
    _, ours = _pair(SCALINGS["linear"])
    assert ours.config.context_length == 96
    gen.check_prompts(ours, [[5] * 96])
    with pytest.raises(ValueError, match="more than max_position_embeddings 32 times the rope_scaling factor: 96"):
        gen.check_prompts(ours, [[5] * 97])
    with pytest.raises(ValueError, match="exceeds max_position_embeddings 32 times the rope_scaling factor: 96"):
        ours(_ids(97))
    out = ours.generate(_ids(90), max_new_tokens=20)  # stops at the context length
    assert out.shape == (1, 97)


# -- configs ---------------------------------------------------------------------------------------


def _hf_dict(**extra) -> dict:
    return {"model_type": "llama", **CFG, **extra}


@pytest.mark.parametrize(
    "given, expected",
    [
        ({"rope_type": "dynamic", "factor": 2}, {"rope_type": "dynamic", "factor": 2.0}),
        ({"type": "linear", "factor": 4.0}, {"rope_type": "linear", "factor": 4.0}),
        ({"rope_type": "dynamic", "factor": 1.0, "rope_theta": 10000.0}, {"rope_type": "dynamic", "factor": 1.0}),
        ({"rope_type": "default"}, None),
        (None, None),
    ],
)
def test_rope_scaling_is_normalised(given, expected):
    assert InternLMConfig(**CFG, rope_scaling=given).rope_scaling == expected
    assert config_from_hf(_hf_dict(rope_scaling=given), "config.json").rope_scaling == expected


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"rope_type": "yarn", "factor": 2.0}, "rope_scaling rope_type 'yarn' is not supported"),
        ({"rope_type": "dynamic"}, "rope_scaling of rope_type 'dynamic' needs a factor"),
        ({"rope_type": "linear", "factor": 0.5}, "rope_scaling factor must be a finite number >= 1, got 0.5"),
        ({"rope_type": "linear", "factor": "2"}, "rope_scaling factor must be a finite number >= 1"),
        ({"factor": 2.0}, "rope_scaling rope_type None is not supported"),
        ([2.0], "rope_scaling must be a dict"),
    ],
)
def test_bad_rope_scaling_names_the_field(bad, message):
    with pytest.raises(ValueError, match=message):
        InternLMConfig(**CFG, rope_scaling=bad)
    with pytest.raises(ValueError, match="config.json: " + message):
        config_from_hf(_hf_dict(rope_scaling=bad), "config.json")


def test_internlm_rotary_dict_maps_to_dynamic_scaling():
    d = {"model_type": "internlm", **CFG, "bias": True}
    rotary = {"base": 20000, "type": "dynamic", "scaling_factor": 2.0}
    config = config_from_hf({**d, "rotary": rotary}, "config.json")
    assert config.rope_scaling == {"rope_type": "dynamic", "factor": 2.0} and config.rope_theta == 20000.0
    config = config_from_hf({**d, "rotary": {"base": 10000, "type": "dynamic"}}, "config.json")
    assert config.rope_scaling == {"rope_type": "dynamic", "factor": 1.0}
    assert config_from_hf({**d, "rotary": {"base": 10000, "type": "origin"}}, "config.json").rope_scaling is None
    with pytest.raises(ValueError, match="config.json: rotary type 'ntk' is not supported"):
        config_from_hf({**d, "rotary": {"base": 10000, "type": "ntk"}}, "config.json")


def test_save_and_load_keep_the_scaling_and_transformers_reads_it(tmp_path):
    hf, ours = _pair(SCALINGS["dynamic"])
    ours.save_pretrained(tmp_path / "m")
    written = json.loads((tmp_path / "m" / "config.json").read_text())
    assert written["rope_scaling"] == {"rope_type": "dynamic", "factor": 2.5}
    loaded = load_pretrained(tmp_path / "m")
    assert loaded.config.rope_scaling == ours.config.rope_scaling
    theirs = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert theirs.config.rope_parameters["rope_type"] == "dynamic"
    ids = _ids(70, 7)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, theirs(ids).logits, **TOL)
        torch.testing.assert_close(loaded(ids).logits, hf(ids).logits, **TOL)


def test_trainer_runs_a_step_with_rope_scaling(tmp_path, monkeypatch):
    from internlm_fast.model import modeling
    from internlm_fast.train.config import load_config
    from internlm_fast.train.trainer import Trainer

    built = []
    monkeypatch.setattr(modeling, "dynamic_rows", lambda *a: built.append(a) or dynamic_rows(*a))

    overrides = {
        "data.seq_len": 48,
        "data.micro_bsz": 1,
        "data.total_steps": 1,
        "model.preset": "nano",
        "model.vocab_size": 512,
        "model.hidden_size": 64,
        "model.intermediate_size": 96,
        "model.num_hidden_layers": 1,
        "model.max_position_embeddings": 32,
        "model.rope_scaling": '{"rope_type": "dynamic", "factor": 2.0}',
        "log.eval_every": 0,
        "log.eval_batches": 1,
        "log.progress": False,
        "log.tensorboard": False,
        "generate.max_new_tokens": 0,
        "log.folder": tmp_path / "run",
        "threads": 1,
    }
    cfg = load_config(None, [f"{k}={v}" for k, v in overrides.items()])
    assert cfg.model.build().rope_scaling == {"rope_type": "dynamic", "factor": 2.0}
    result = Trainer(cfg).fit()
    assert len(result.losses) == 1 and torch.isfinite(torch.tensor(result.losses)).all()
    assert built  # rows of 48 tokens reach past max_position_embeddings 32
