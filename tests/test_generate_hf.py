"""generate() returns what transformers' LlamaForCausalLM(attention_bias=True).generate returns on
the same weights: greedy, 64 tokens, batch 1 and a padded batch with early eos."""

from __future__ import annotations

import pytest
import torch

from internlm_fast.model import InternLMConfig, InternLMForCausalLM

from .generate_helpers import one_thread  # noqa: F401 (fixture)
from .model_helpers import TINY_CONFIG

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

CFG = {**TINY_CONFIG, "hidden_size": 128, "intermediate_size": 344, "max_position_embeddings": 256}


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(**CFG, attention_bias=True, tie_word_embeddings=False)
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    with torch.no_grad():  # sharper than HF's init (std 0.02), so greedy choices are not near-ties
        for p in hf.parameters():
            p.normal_(0, 0.2) if p.dim() > 1 else p.add_(0.1 * torch.randn_like(p))
    hf.generation_config.eos_token_id = None
    ours = InternLMForCausalLM(InternLMConfig(**CFG)).eval()
    missing, unexpected = ours.load_state_dict(hf.state_dict(), strict=False)
    assert not missing and all("rotary" in k for k in unexpected), (missing, unexpected)
    return hf, ours


def _hf_generate(hf, ids, **kw):
    with torch.no_grad():
        return hf.generate(ids, do_sample=False, **kw)


def test_greedy_matches_transformers_for_64_tokens(pair):
    hf, ours = pair
    ids = torch.randint(3, CFG["vocab_size"], (1, 37), generator=torch.Generator().manual_seed(1))
    expected = _hf_generate(hf, ids, max_new_tokens=64, pad_token_id=0)
    got = ours.generate(ids, max_new_tokens=64)
    assert got.shape == (1, 37 + 64)
    assert torch.equal(got, expected)


def test_left_padded_batch_with_eos_matches_transformers(pair):
    hf, ours = pair
    g = torch.Generator().manual_seed(2)
    lengths = [20, 7, 13]
    width = max(lengths)
    ids = torch.zeros(3, width, dtype=torch.long)
    mask = torch.zeros(3, width, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, width - n :] = torch.randint(3, CFG["vocab_size"], (n,), generator=g)
        mask[b, width - n :] = 1
    free = ours.generate(ids, attention_mask=mask, max_new_tokens=24)
    eos = int(free[1, width + 5])  # a token row 1 produces at step 5: it must stop there
    kw = dict(attention_mask=mask, max_new_tokens=24, eos_token_id=eos, pad_token_id=1)
    expected = _hf_generate(hf, ids, **kw)
    got = ours.generate(ids, **kw)
    assert torch.equal(got, expected)
    assert got[1, width + 5] == eos and (got[1, width + 6 :] == 1).all()


def test_right_padding_gives_each_row_its_unpadded_generation(pair):
    _, ours = pair
    a, b = [5, 6, 7, 8, 9], [10, 11]
    ids = torch.tensor([a, b + [0, 0, 0]])
    mask = torch.tensor([[1] * 5, [1, 1, 0, 0, 0]])
    got = ours.generate(ids, attention_mask=mask, max_new_tokens=6)
    assert torch.equal(got[:, :5], ids)
    assert torch.equal(got[0, 5:], ours.generate(torch.tensor([a]), max_new_tokens=6)[0, 5:])
    assert torch.equal(got[1, 5:], ours.generate(torch.tensor([b]), max_new_tokens=6)[0, 2:])
