"""Logits processing equals transformers' logits processors; sampling is seeded and follows the
distribution; bad options are refused by name."""

from __future__ import annotations

import pytest
import torch

from internlm_fast.infer import GenerationConfig, SamplingConfig, select_tokens
from internlm_fast.infer.sampling import apply_repetition_penalty, apply_top_k, apply_top_p, process_logits

transformers = pytest.importorskip("transformers")
from transformers.generation import logits_process as hf  # noqa: E402

VOCAB = 97


def _logits(batch=4, seed=0):
    return torch.randn(batch, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3


def _seen(input_ids: torch.Tensor) -> torch.Tensor:
    seen = torch.zeros(input_ids.shape[0], VOCAB, dtype=torch.bool)
    seen.scatter_(1, input_ids, True)
    return seen


@pytest.mark.parametrize("penalty", [1.3, 0.7])
def test_repetition_penalty_matches_transformers(penalty):
    logits = _logits()
    ids = torch.randint(0, VOCAB, (4, 30), generator=torch.Generator().manual_seed(1))
    expected = hf.RepetitionPenaltyLogitsProcessor(penalty)(ids, logits.clone())
    torch.testing.assert_close(apply_repetition_penalty(logits, _seen(ids), penalty), expected, rtol=0, atol=0)


@pytest.mark.parametrize("top_k", [1, 5, 50, VOCAB, 500])
def test_top_k_matches_transformers(top_k):
    logits = _logits()
    expected = hf.TopKLogitsWarper(top_k)(None, logits.clone())
    assert torch.equal(apply_top_k(logits, top_k), expected)


@pytest.mark.parametrize("top_p", [0.01, 0.3, 0.8, 0.95, 1.0])
def test_top_p_matches_transformers(top_p):
    logits = _logits()
    expected = hf.TopPLogitsWarper(top_p)(None, logits.clone())
    assert torch.equal(apply_top_p(logits, top_p), expected)


def test_the_chain_matches_transformers_in_its_order():
    logits = _logits(seed=3)
    ids = torch.randint(0, VOCAB, (4, 12), generator=torch.Generator().manual_seed(4))
    chain = hf.LogitsProcessorList(
        [
            hf.RepetitionPenaltyLogitsProcessor(1.2),
            hf.TemperatureLogitsWarper(0.7),
            hf.TopKLogitsWarper(20),
            hf.TopPLogitsWarper(0.9),
        ]
    )
    cfg = SamplingConfig(do_sample=True, temperature=0.7, top_k=20, top_p=0.9, repetition_penalty=1.2)
    torch.testing.assert_close(process_logits(logits, cfg, _seen(ids)), chain(ids, logits.clone()))


def test_greedy_ignores_the_warpers_but_not_the_penalty():
    logits = torch.tensor([[1.0, 3.0, 2.9, -5.0]])
    greedy = SamplingConfig(temperature=0.1, top_p=0.5)
    assert select_tokens(logits, greedy).tolist() == [1]
    seen = torch.tensor([[False, True, False, False]])
    assert select_tokens(logits, SamplingConfig(repetition_penalty=2.0), seen).tolist() == [2]


def test_sampling_is_seeded_and_follows_the_distribution():
    probs = torch.tensor([0.5, 0.3, 0.2])
    logits = probs.log().expand(4000, 3)
    cfg = SamplingConfig(do_sample=True)
    draw = lambda seed: select_tokens(logits, cfg, generator=torch.Generator().manual_seed(seed))  # noqa: E731
    a = draw(7)
    assert torch.equal(a, draw(7)) and not torch.equal(a, draw(8))
    torch.testing.assert_close(torch.bincount(a, minlength=3) / 4000, probs, atol=0.03, rtol=0)
    # top_p 0.6 needs the two likeliest (0.5 + 0.3) to reach it; the third is never drawn
    cut = select_tokens(logits, SamplingConfig(do_sample=True, top_p=0.6), generator=torch.Generator().manual_seed(0))
    assert set(cut.tolist()) == {0, 1}


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(temperature=0.0), "temperature"),
        (dict(temperature=-1), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-1), "top_k"),
        (dict(top_k=2.5), "top_k"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(max_new_tokens=-1), "max_new_tokens"),
        (dict(eos_token_id=[2, -1]), "eos_token_id"),
        (dict(stop_strings=["ok", ""]), "stop_strings"),
    ],
)
def test_bad_options_are_named(kwargs, name):
    with pytest.raises(ValueError, match=name):
        GenerationConfig(**kwargs)
