"""The serving engine in process: continuous batching gives each request what generating it alone
gives, the paged pool makes requests wait (never fail) when full and gets every block back,
cancellation frees a slot, and prefix reuse shares cached blocks without changing a token."""

from __future__ import annotations

import asyncio

import pytest
import torch

from internlm_fast.infer import GenerationConfig, generate_ids
from internlm_fast.serve.block_pool import BlockPool
from internlm_fast.serve.engine import Engine
from internlm_fast.serve.requests import QueueFull, SamplingParams

from .generate_helpers import one_thread, small_model, train_small_tokenizer  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_small_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def model():
    return small_model()


def run(engine: Engine, jobs: list[tuple[list[int], SamplingParams]], cancel_after: dict | None = None):
    """Submits every job at once; returns each one's (token ids, finish reason, cached tokens)."""

    async def one(prompt, params, i):
        req = engine.submit(prompt, params)
        ids, reason = [], None
        async for out in req:
            ids.append(out.token_id)
            reason = out.finish_reason
            if cancel_after and cancel_after.get(i) == len(ids):
                req.cancel()
                break
        return ids, reason, req.cached_tokens

    async def main():
        return await asyncio.gather(*(one(p, s, i) for i, (p, s) in enumerate(jobs)))

    engine.start()
    try:
        return asyncio.run(main())
    finally:
        engine.shutdown()


def alone(model, prompt, n, tokenizer):
    cfg = GenerationConfig(max_new_tokens=n, eos_token_id=sorted(tokenizer.stop_ids))
    return generate_ids(model, [prompt], cfg)[0].ids


PROMPTS = [[5, 6, 7], list(range(20, 61)), [9] * 13, [100, 3], list(range(1, 30)), [42]]


def test_continuous_batching_gives_each_request_its_own_generation(model, tokenizer):
    lengths = [12, 3, 20, 7, 1, 15]
    engine = Engine(model, tokenizer, max_batch=3, block_size=4)
    got = run(engine, [(p, SamplingParams(max_tokens=n, temperature=0)) for p, n in zip(PROMPTS, lengths)])
    for (ids, reason, _), p, n in zip(got, PROMPTS, lengths):
        assert ids == alone(model, p, n, tokenizer)
        assert reason == ("stop" if ids[-1] in tokenizer.stop_ids else "length")
    assert engine.pool.used == 0 and engine.pool.reserved == 0


def test_a_full_pool_makes_requests_wait_not_fail(model, tokenizer):
    # room for one sequence of max_model_len at a time: the others wait for its blocks
    engine = Engine(model, tokenizer, max_batch=4, block_size=8, max_model_len=64, cache_tokens=64)
    jobs = [(p, SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)) for p in PROMPTS[:4]]
    got = run(engine, jobs)
    for (ids, reason, _), (p, _) in zip(got, jobs):
        assert reason == "length" and len(ids) == 64 - len(p)
    assert engine.pool.used == 0 and engine.pool.reserved == 0


def test_cancel_frees_the_slot_and_the_blocks(model, tokenizer):
    engine = Engine(model, tokenizer, max_batch=1, block_size=4)
    long = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)
    got = run(engine, [(PROMPTS[1], long), (PROMPTS[0], SamplingParams(max_tokens=5, temperature=0))], {0: 3})
    assert len(got[0][0]) == 3 and got[0][1] is None  # cancelled after 3 tokens
    assert got[1][0] == alone(model, PROMPTS[0], 5, tokenizer)  # the slot went to the next request
    assert engine.pool.used == 0 and engine.pool.reserved == 0


def test_prefix_reuse_shares_blocks_and_changes_no_token(model, tokenizer):
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    first = list(range(1, 40))
    reuse, fresh = (Engine(model, tokenizer, block_size=4, prefix_cache=on) for on in (True, False))
    ((answer, _, cached0),) = run(reuse, [(first, params)])
    assert cached0 == 0
    follow = first + answer + [7, 8, 9]
    got = run(reuse, [(follow, params)])[0]
    expect = run(fresh, [(follow, params)])[0]
    assert got[0] == expect[0] == alone(model, follow, 10, tokenizer)
    # the prompt and the answer's cached tokens (the last answer token was never fed), whole blocks
    assert got[2] == (len(first) + len(answer) - 1) // 4 * 4 and expect[2] == 0
    assert reuse.pool.used == 0 and len(reuse.pool.cached) > 0


def test_chat_prompt_spells_a_generated_answer_with_its_ids(model, tokenizer):
    engine = Engine(model, tokenizer, block_size=4)
    params = SamplingParams(max_tokens=12, temperature=0)
    q1 = [{"role": "user", "content": "Hello world"}]
    out = asyncio.run(_text(engine, engine.chat_prompt(q1), params))
    turn2 = q1 + [{"role": "assistant", "content": out}, {"role": "user", "content": "and more"}]
    engine2 = Engine(model, tokenizer, block_size=4)  # a fresh engine re-encodes the text
    prompt = engine.chat_prompt(turn2)
    assert prompt[: len(engine.chat_prompt(q1))] == engine.chat_prompt(q1)
    assert engine2.chat_prompt(turn2) == tokenizer.chat_prompt(turn2)


async def _text(engine, prompt, params):
    engine.start()
    try:
        return "".join([o.text async for o in engine.submit(prompt, params)])
    finally:
        engine.shutdown()


def test_seeded_sampling_repeats_and_bad_prompts_are_refused(model, tokenizer):
    engine = Engine(model, tokenizer, max_batch=4, max_queue=2, max_model_len=50)
    p = SamplingParams(max_tokens=8, temperature=1.0, top_p=0.9, seed=3)
    a, b = run(engine, [(PROMPTS[0], p), (PROMPTS[0], p)])
    assert a[0] == b[0]

    async def refused():
        with pytest.raises(ValueError, match="prompt has 50 tokens; this model's context is 50"):
            engine.submit([1] * 50, p)
        with pytest.raises(ValueError, match="outside the vocabulary"):
            engine.submit([10**6], p)
        engine.submit([1], p), engine.submit([1], p)  # not started: they wait
        with pytest.raises(QueueFull):
            engine.submit([1], p)

    asyncio.run(refused())


def test_block_pool_evicts_least_recently_used_cached_blocks():
    pool = BlockPool(4, page=2, max_cached=2)
    assert pool.reserve(3)
    a = [pool.allocate() for _ in range(3)]
    for i, b in enumerate(a):
        pool.publish(b, 100 + i)
    pool.release(a)
    assert len(pool.cached) == 2 and pool.used == 0  # the oldest published block was evicted
    assert pool.reserve(4) and not pool.reserve(1)
    torch.testing.assert_close(torch.tensor(sorted(pool.allocate() for _ in range(4))), torch.arange(4))


def test_prefix_cache_tokens_bound_what_is_kept(model, tokenizer):
    engine = Engine(model, tokenizer, block_size=4, prefix_cache_tokens=8)
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    run(engine, [(list(range(1, 40)), params), (list(range(50, 90)), params)])
    assert len(engine.pool.cached) == 2 and engine.pool.used == 0  # 8 tokens: two blocks of 4


def test_a_failed_forward_fails_its_requests_and_the_engine_goes_on(model, tokenizer, monkeypatch):
    engine = Engine(model, tokenizer, block_size=4)
    real = model.forward_cached
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("injected failure")
        return real(*args, **kwargs)

    monkeypatch.setattr(model, "forward_cached", flaky)
    params = SamplingParams(max_tokens=4, temperature=0)

    async def main():
        engine.start()
        try:
            with pytest.raises(RuntimeError, match="injected failure"):
                async for _ in engine.submit(PROMPTS[0], params):
                    pass
            return [o.token_id async for o in engine.submit(PROMPTS[0], params)]
        finally:
            engine.shutdown()

    assert asyncio.run(main()) == alone(model, PROMPTS[0], 4, tokenizer)
    assert engine.pool.used == 0 and engine.pool.reserved == 0


def test_a_bf16_kv_cache_serves_the_same_greedy_tokens(model, tokenizer):
    engine = Engine(model, tokenizer, block_size=4, kv_dtype="bf16")
    assert engine.cache.kv[0].dtype == torch.bfloat16
    ((ids, _, _),) = run(engine, [(PROMPTS[1], SamplingParams(max_tokens=8, temperature=0))])
    assert ids == alone(model, PROMPTS[1], 8, tokenizer)


def test_long_prompts_are_prefilled_in_chunks_after_a_reused_prefix(model, tokenizer, monkeypatch):
    import internlm_fast.infer.generate as generate

    monkeypatch.setattr(generate, "PREFILL_CHUNK", 8)  # every prompt here spans several chunks
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    engine = Engine(model, tokenizer, block_size=4)
    first = list(range(1, 30))
    ((answer, _, _),) = run(engine, [(first, params)])
    follow = first + answer + [7, 8, 9, 10, 11, 12, 13, 14, 15]
    got = run(engine, [(follow, params), (PROMPTS[1], params)])
    assert got[0][2] > 0  # a reused prefix, then the rest in chunks
    assert got[0][0] == alone(model, follow, 6, tokenizer) and got[1][0] == alone(model, PROMPTS[1], 6, tokenizer)
