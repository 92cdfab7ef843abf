"""Batched generation: every sequence finishes on its own and equals its batch-1 generation; stop
ids, stop strings across token boundaries, the context limit, and errors that name the problem."""

from __future__ import annotations

import pytest
import torch

from internlm_fast.infer import GenerationConfig, generate_ids, generate_text, generate_tokens

from .generate_helpers import one_thread, small_model, train_small_tokenizer  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return small_model()


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_small_tokenizer(tmp_path_factory.mktemp("tok"))


PROMPTS = [[1, 50, 51, 52], list(range(100, 190)), [1], [7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7]]


def test_each_sequence_finishes_on_its_own_and_equals_batch_1(model):
    free = [g.ids for g in generate_ids(model, PROMPTS, GenerationConfig(max_new_tokens=30))]
    # stop ids each sequence meets at a different step (or never)
    eos = {free[0][3], free[2][17]}
    cfg = GenerationConfig(max_new_tokens=30, eos_token_id=sorted(eos))
    batch = generate_ids(model, PROMPTS, cfg)
    for prompt, got in zip(PROMPTS, batch):
        alone = generate_ids(model, [prompt], cfg)[0]
        assert got.ids == alone.ids and got.finish_reason == alone.finish_reason
        stops = [i for i, t in enumerate(got.ids) if t in eos]
        if stops:
            assert got.finish_reason == "eos" and stops == [len(got.ids) - 1]
        else:
            assert got.finish_reason == "length" and len(got.ids) == 30
    assert len(batch[0].ids) == 4 and len({len(g.ids) for g in batch}) > 1


def test_sampling_is_seeded(model):
    cfg = dict(max_new_tokens=20, do_sample=True, temperature=1.5, top_k=50, top_p=0.95, repetition_penalty=1.1)
    a = generate_ids(model, PROMPTS[:2], GenerationConfig(**cfg, seed=3))
    b = generate_ids(model, PROMPTS[:2], GenerationConfig(**cfg, seed=3))
    c = generate_ids(model, PROMPTS[:2], GenerationConfig(**cfg, seed=4))
    assert [g.ids for g in a] == [g.ids for g in b] != [g.ids for g in c]


def test_repetition_penalty_changes_greedy_output(model):
    plain = generate_ids(model, [[1, 2, 3]], GenerationConfig(max_new_tokens=40))[0].ids
    penalised = generate_ids(model, [[1, 2, 3]], GenerationConfig(max_new_tokens=40, repetition_penalty=5.0))[0].ids
    assert len(set(penalised)) > len(set(plain))


def test_generation_stops_at_the_context_limit(model):
    limit = model.config.max_position_embeddings
    prompt = list(range(3, 3 + limit - 5))
    g = generate_ids(model, [prompt], GenerationConfig(max_new_tokens=50))[0]
    assert len(g.ids) == 6 and g.finish_reason == "length"  # the 6th new token is the limit's last position
    full = generate_ids(model, [list(range(3, 3 + limit))], GenerationConfig(max_new_tokens=50))[0]
    assert len(full.ids) == 1


def test_stop_strings_across_token_boundaries(model, tokenizer):
    prompt = tokenizer.encode("Hello world", bos=True)
    free = generate_text(model, tokenizer, prompt, GenerationConfig(max_new_tokens=60))
    assert free.text == tokenizer.decode(free.ids)
    # a stop string from the last character of the first k tokens' text to the next two characters
    k = next(k for k in range(3, 40) if len(tokenizer.decode(free.ids[: k + 1])) > len(tokenizer.decode(free.ids[:k])))
    p = len(tokenizer.decode(free.ids[:k]))
    stop = free.text[p - 1 : p + 2]
    needed = next(n for n in range(len(free.ids)) if stop in tokenizer.decode(free.ids[:n]))
    assert len(tokenizer.decode(free.ids[: needed - 1])) > free.text.index(stop)  # it spans tokens
    cut = generate_text(model, tokenizer, prompt, GenerationConfig(max_new_tokens=60, stop_strings=[stop, "zzzz"]))
    assert cut.finish_reason == "stop_string"
    assert cut.text == free.text[: free.text.index(stop)]
    assert cut.ids == free.ids[:needed]  # generation ran until the token that completed it


def test_generate_tokens_for_the_trainer(model):
    greedy = generate_tokens(model, [1, 5, 7], 8, temperature=0)
    assert greedy == generate_ids(model, [[1, 5, 7]], GenerationConfig(max_new_tokens=8))[0].ids
    stopped = generate_tokens(model, [1, 5, 7], 8, temperature=0, stop_ids={greedy[2]})
    assert stopped == greedy[: greedy.index(greedy[2])]  # the stop token itself is left out
    sampled = generate_tokens(model, [1, 5, 7], 8, temperature=1.0, top_p=0.9, seed=1)
    assert sampled == generate_tokens(model, [1, 5, 7], 8, temperature=1.0, top_p=0.9, seed=1)
    model.train()  # the trainer calls it on a model in training mode
    assert generate_tokens(model, [1, 5, 7], 8, temperature=0) == greedy
    model.eval()


@pytest.mark.parametrize(
    "prompts, match",
    [
        ([[]], "prompt 0 is empty"),
        ([[1, 2], []], "prompt 1 is empty"),
        ([list(range(300))], "prompt 0 has 300 tokens, more than max_position_embeddings 256"),
        ([[1, 400]], "token id 400 outside the vocabulary"),
        ([], "non-empty list"),
    ],
)
def test_bad_prompts_are_named(model, prompts, match):
    with pytest.raises(ValueError, match=match):
        generate_ids(model, prompts, GenerationConfig())


def test_model_generate_errors(model, tokenizer):
    with pytest.raises(ValueError, match="input_ids must be an integer tensor"):
        model.generate(torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="attention_mask must have input_ids' shape"):
        model.generate(torch.tensor([[1, 2, 3]]), attention_mask=torch.ones(1, 2))
    with pytest.raises(ValueError, match="temperature must be a number > 0"):
        model.generate(torch.tensor([[1, 2]]), do_sample=True, temperature=0.0)
    with pytest.raises(ValueError, match="top_p must be a number in"):
        model.generate(torch.tensor([[1, 2]]), do_sample=True, top_p=2.0)
    with pytest.raises(ValueError, match="stop_strings need a tokenizer"):
        model.generate(torch.tensor([[1, 2]]), stop_strings=["x"])
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        model.generate(torch.tensor([[1, 2]]), attention_mask=torch.tensor([[0, 0]]))
    out = model.generate(torch.tensor([[1, 2]]), stop_strings="\n", tokenizer=tokenizer, max_new_tokens=3)
    assert out.shape[0] == 1 and 3 <= out.shape[1] <= 5
