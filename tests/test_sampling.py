"""Temperature / top-p sampling and the plain generation loop."""

from __future__ import annotations

import pytest
import torch

from internlm_fast.infer import generate_tokens, sample_next_token
from internlm_fast.model import InternLMForCausalLM, preset


def test_greedy_and_top_p_support():
    logits = torch.tensor([0.0, 3.0, 2.9, -5.0])
    assert sample_next_token(logits, temperature=0) == 1
    g = torch.Generator().manual_seed(0)
    # top_p small enough that only the most likely token survives
    assert {sample_next_token(logits, 1.0, 0.1, g) for _ in range(50)} == {1}
    # with top_p 0.9 the two likely tokens are drawn, the tail never
    drawn = {sample_next_token(logits, 1.0, 0.9, g) for _ in range(200)}
    assert drawn == {1, 2}


def test_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.2]))
    g = torch.Generator().manual_seed(1)
    counts = torch.bincount(torch.tensor([sample_next_token(logits, 1.0, 1.0, g) for _ in range(4000)]), minlength=3)
    assert torch.allclose(counts / 4000, torch.tensor([0.5, 0.3, 0.2]), atol=0.03)


@pytest.mark.parametrize("kwargs", [dict(temperature=-1.0), dict(top_p=0.0), dict(top_p=1.5)])
def test_bad_sampling_arguments(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        sample_next_token(torch.zeros(4), **kwargs)


def test_generate_is_seeded_and_stops():
    torch.manual_seed(0)
    model = InternLMForCausalLM(
        preset("tiny", vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4)
    )
    a = generate_tokens(model, [1, 5, 7], 12, temperature=1.0, top_p=1.0, seed=3)
    b = generate_tokens(model, [1, 5, 7], 12, temperature=1.0, top_p=1.0, seed=3)
    assert a == b and len(a) == 12
    greedy = generate_tokens(model, [1, 5, 7], 5, temperature=0)
    # the greedy continuation matches argmax of a full forward at each step
    ids = [1, 5, 7]
    for token in greedy:
        assert token == int(model(torch.tensor([ids])).logits[0, -1].argmax())
        ids.append(token)
    stopped = generate_tokens(model, [1, 5, 7], 5, temperature=0, stop_ids={greedy[2]})
    assert stopped == greedy[: greedy.index(greedy[2])]
    with pytest.raises(ValueError, match="prompt_ids"):
        generate_tokens(model, [], 3)
