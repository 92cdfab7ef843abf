"""The OpenAI-compatible server end to end: the real `openai` client against `python -m
internlm_fast.serve` running a small random model on loopback."""

from __future__ import annotations

import asyncio
import math
import re
import time

import httpx
import openai
import pytest

from internlm_fast.data import Tokenizer

from .serve_helpers import MODEL_NAME, running_server, served_model_dir, server_url  # noqa: F401

HI = [{"role": "user", "content": "Hello world, the model answers questions"}]
GREEDY = {"temperature": 0, "max_tokens": 8}


@pytest.fixture(scope="module")
def client(server_url: str) -> openai.OpenAI:  # noqa: F811
    return openai.OpenAI(base_url=server_url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def tokenizer(served_model_dir) -> Tokenizer:  # noqa: F811
    return Tokenizer.from_pretrained(served_model_dir)


def _metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = re.escape(name + (f"{{{want}}}" if labels else "")) + r" (\S+)"
    m = re.search(r"^" + pattern + r"$", text, re.MULTILINE)
    return float(m.group(1)) if m else 0.0


# -- models, chat, completions ------------------------------------------------------------------------


def test_models_list_and_retrieve(client):
    assert [m.id for m in client.models.list().data] == [MODEL_NAME]
    assert client.models.retrieve(MODEL_NAME).id == MODEL_NAME
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_chat_completion_shape_and_usage(client, tokenizer):
    r = client.chat.completions.create(model=MODEL_NAME, messages=HI, **GREEDY)
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion" and r.model == MODEL_NAME
    (choice,) = r.choices
    assert choice.index == 0 and choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length") and choice.logprobs is None
    assert r.usage.prompt_tokens == len(tokenizer.chat_prompt(HI))
    assert 1 <= r.usage.completion_tokens <= GREEDY["max_tokens"]
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    if choice.finish_reason == "length":
        assert r.usage.completion_tokens == GREEDY["max_tokens"]


def test_greedy_is_deterministic_and_streams_the_same_text(client):
    kw = dict(model=MODEL_NAME, messages=HI, temperature=0, max_tokens=12)
    first = client.chat.completions.create(**kw).choices[0]
    second = client.chat.completions.create(**kw).choices[0]
    assert first.message.content == second.message.content
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == first.message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == first.finish_reason and not any(finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)


def test_content_parts_and_the_developer_role(client):
    plain = [{"role": "system", "content": "Be brief."}, *HI]
    parts = [
        {"role": "developer", "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}]},
        {"role": "user", "content": [{"type": "text", "text": HI[0]["content"]}]},
    ]
    a = client.chat.completions.create(model=MODEL_NAME, messages=plain, **GREEDY)
    b = client.chat.completions.create(model=MODEL_NAME, messages=parts, **GREEDY)
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.usage.prompt_tokens == b.usage.prompt_tokens


def test_the_next_chat_turn_reports_its_cached_prefix(client):
    first = client.chat.completions.create(model=MODEL_NAME, messages=HI, **GREEDY)
    answer = {"role": "assistant", "content": first.choices[0].message.content}
    turn = [*HI, answer, {"role": "user", "content": "and then?"}]
    second = client.chat.completions.create(model=MODEL_NAME, messages=turn, **GREEDY)
    cached = second.usage.prompt_tokens_details.cached_tokens
    # whole cache blocks of the first turn's prompt and answer, never the whole prompt
    assert first.usage.prompt_tokens // 16 * 16 <= cached < second.usage.prompt_tokens


def test_completions_prompt_forms_and_usage(client, tokenizer):
    r = client.completions.create(model=MODEL_NAME, prompt=["Hello", "def main"], n=2, **GREEDY)
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    # greedy: the two choices of one prompt agree
    assert r.choices[0].text == r.choices[1].text and r.choices[2].text == r.choices[3].text
    prompt_tokens = len(tokenizer.encode("Hello", bos=True)) + len(tokenizer.encode("def main", bos=True))
    assert r.usage.prompt_tokens == prompt_tokens  # once per prompt, not per choice
    ids = tokenizer.encode("Hello", bos=True)
    by_ids = client.completions.create(model=MODEL_NAME, prompt=ids, **GREEDY)
    assert by_ids.choices[0].text == r.choices[0].text and by_ids.usage.prompt_tokens == len(ids)
    lists = client.completions.create(model=MODEL_NAME, prompt=[ids, ids[:2]], **GREEDY)
    assert len(lists.choices) == 2 and lists.usage.prompt_tokens == len(ids) + 2


def test_completion_streaming_matches_non_streaming(client):
    kw = dict(model=MODEL_NAME, prompt="Hello world", temperature=0, max_tokens=10)
    full = client.completions.create(**kw).choices[0]
    chunks = list(client.completions.create(**kw, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == full.text
    assert chunks[-1].choices[0].finish_reason == full.finish_reason


def test_n_choices_with_a_seed_are_seeded_seed_plus_i(client):
    kw = dict(model=MODEL_NAME, messages=HI, temperature=1.0, max_tokens=10, logprobs=True)
    both = client.chat.completions.create(**kw, n=2, seed=1234)
    assert [c.index for c in both.choices] == [0, 1]
    again = client.chat.completions.create(**kw, n=2, seed=1234)
    assert [c.message.content for c in again.choices] == [c.message.content for c in both.choices]
    second = client.chat.completions.create(**kw, seed=1235)
    assert second.choices[0].message.content == both.choices[1].message.content
    assert both.usage.completion_tokens == sum(len(c.logprobs.content) for c in both.choices)
    assert both.usage.prompt_tokens == second.usage.prompt_tokens  # once per prompt, not per choice


def test_n_choices_interleave_in_one_stream(client):
    stream = client.completions.create(
        model=MODEL_NAME, prompt="Hello", n=3, seed=5, max_tokens=8, stream=True, extra_body={"ignore_eos": True}
    )
    texts, finishes = {0: "", 1: "", 2: ""}, {}
    for chunk in stream:
        (c,) = chunk.choices
        assert c.index not in finishes, "a chunk after the choice's finish_reason"
        texts[c.index] += c.text
        if c.finish_reason:
            finishes[c.index] = c.finish_reason
    assert finishes == {0: "length", 1: "length", 2: "length"}
    single = client.completions.create(
        model=MODEL_NAME, prompt="Hello", seed=7, max_tokens=8, extra_body={"ignore_eos": True}
    )
    assert single.choices[0].text == texts[2]


def _stop_candidate(text: str) -> str | None:
    """A 2-character piece of `text`, after its start, whose first occurrence is where it is taken."""
    for k in range(2, len(text) - 1):
        piece = text[k : k + 2]
        if "\ufffd" not in piece and piece.strip() and text.index(piece) == k:
            return piece
    return None


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_stop_strings_cut_the_text(client, endpoint):
    def ask(**extra):
        kw = dict(model=MODEL_NAME, temperature=0, max_tokens=40, extra_body={"ignore_eos": True}, **extra)
        if endpoint == "chat":
            c = client.chat.completions.create(messages=HI, **kw).choices[0]
            return c.message.content, c.finish_reason
        c = client.completions.create(prompt="Hello world", **kw).choices[0]
        return c.text, c.finish_reason

    free, _ = ask()
    stop = _stop_candidate(free)
    assert stop is not None, f"no usable stop string in {free!r}"
    text, finish = ask(stop=[stop, "never-generated"])
    assert text == free[: free.index(stop)] and stop not in text and finish == "stop"


def test_chat_logprobs_shapes_and_values(client):
    r = client.chat.completions.create(model=MODEL_NAME, messages=HI, logprobs=True, top_logprobs=3, **GREEDY)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for entry in content:
        tops = [t.logprob for t in entry.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True) and all(lp <= 0 for lp in tops)
        # greedy: the chosen token is the likeliest
        assert entry.token == entry.top_logprobs[0].token and math.isclose(entry.logprob, tops[0], abs_tol=1e-5)
        assert isinstance(entry.bytes, list) and all(0 <= b < 256 for b in entry.bytes)
    sampled = client.chat.completions.create(
        model=MODEL_NAME, messages=HI, logprobs=True, top_logprobs=2, temperature=1, seed=3, max_tokens=8
    )
    for entry in sampled.choices[0].logprobs.content:
        assert entry.logprob <= entry.top_logprobs[0].logprob + 1e-5
    plain = client.chat.completions.create(model=MODEL_NAME, messages=HI, logprobs=True, **GREEDY)
    assert all(e.top_logprobs == [] for e in plain.choices[0].logprobs.content)


def test_completion_logprobs_shapes(client):
    r = client.completions.create(model=MODEL_NAME, prompt="Hello", logprobs=2, **GREEDY)
    c = r.choices[0]
    lp = c.logprobs
    n = r.usage.completion_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    for token, chosen, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert token in top and top[token] == chosen and 1 <= len(top) <= 3
        assert math.isclose(chosen, max(top.values()), abs_tol=1e-5)  # greedy


def test_streamed_chat_logprobs(client):
    chunks = list(
        client.chat.completions.create(
            model=MODEL_NAME, messages=HI, logprobs=True, top_logprobs=1, stream=True, **GREEDY
        )
    )
    entries = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    full = client.chat.completions.create(model=MODEL_NAME, messages=HI, logprobs=True, top_logprobs=1, **GREEDY)
    assert [e.token for e in entries] == [e.token for e in full.choices[0].logprobs.content]


# -- the context ------------------------------------------------------------------------------------


def test_max_tokens_is_cut_to_the_context_and_longer_prompts_are_400(client):
    limit = client.models.list().data[0].model_extra["max_model_len"]
    prompt = [5] * (limit - 3)
    r = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=100, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL_NAME, prompt=[5] * limit, max_tokens=1)
    assert e.value.code == "context_length_exceeded"


# -- errors -------------------------------------------------------------------------------------------


def test_invalid_fields_are_400_naming_the_field(client):
    cases = [
        ({"temperature": 2.5}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"n": 0}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"top_logprobs": 3}, "top_logprobs"),
    ]
    for fields, param in cases:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=MODEL_NAME, messages=HI, **fields)
        assert e.value.param == param and e.value.type == "invalid_request_error", fields
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "assistant", "content": "hi"}])
    assert e.value.param == "messages"


def test_unknown_model_route_and_method(client, server_url):  # noqa: F811
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=HI, max_tokens=1)
    assert e.value.code == "model_not_found"
    for method, path, status in [("GET", "/v1/nope", 404), ("POST", "/nope", 404), ("GET", "/v1/completions", 405)]:
        r = httpx.request(method, server_url + path)
        assert r.status_code == status and set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_page_and_health(server_url):  # noqa: F811
    assert httpx.get(server_url + "/health").json() == {"status": "ok"}
    page = httpx.get(server_url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")


def test_metrics_count_requests_and_tokens(client, server_url):  # noqa: F811
    before = httpx.get(server_url + "/metrics").text
    r = client.completions.create(model=MODEL_NAME, prompt="Hello", **GREEDY)
    after = httpx.get(server_url + "/metrics").text
    for name in (
        "internlm_fast_requests_total",
        "internlm_fast_prompt_tokens_total",
        "internlm_fast_generation_tokens_total",
        "internlm_fast_running",
        "internlm_fast_waiting",
        "internlm_fast_time_to_first_token_seconds_bucket",
        "internlm_fast_inter_token_latency_seconds_bucket",
    ):
        assert name in after, name
    ok = {"endpoint": "/v1/completions", "status": "200"}
    assert (
        _metric(after, "internlm_fast_requests_total", **ok)
        == _metric(before, "internlm_fast_requests_total", **ok) + 1
    )
    for name, delta in (
        ("internlm_fast_prompt_tokens_total", r.usage.prompt_tokens),
        ("internlm_fast_generation_tokens_total", r.usage.completion_tokens),
    ):
        assert _metric(after, name) - _metric(before, name) == delta, name
    assert _metric(after, "internlm_fast_time_to_first_token_seconds_count") > 0


# -- servers with flags ---------------------------------------------------------------------------------


def test_api_key(served_model_dir):  # noqa: F811
    with running_server(served_model_dir, "--api-key", "sekret") as url:
        bad = openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        for headers in ({}, {"Authorization": "Basic sekret"}, {"Authorization": "Bearer sekret2"}):
            r = httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 1}, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        good = openai.OpenAI(base_url=url + "/v1", api_key="sekret", max_retries=0)
        assert good.completions.create(model=MODEL_NAME, prompt="hi", max_tokens=2).choices
        # health, metrics and the page stay open
        assert all(httpx.get(url + p).status_code == 200 for p in ("/health", "/metrics", "/"))


async def _stream_first_chunk(client: httpx.AsyncClient, body: dict) -> tuple[int, dict]:
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            await r.aread()
            return r.status_code, dict(r.headers)
        async for _ in r.aiter_lines():
            break
        return 200, dict(r.headers)


def _wait_idle(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        metrics = httpx.get(url + "/metrics").text
        if _metric(metrics, "internlm_fast_running") == _metric(metrics, "internlm_fast_waiting") == 0:
            return
        time.sleep(0.02)
    raise AssertionError("the engine did not become idle")


LONG = {"prompt": "Hello", "max_tokens": 10_000, "ignore_eos": True}  # cut to the context: ~250 tokens
SHORT = {"prompt": "hi", "max_tokens": 1}


def test_full_queue_is_503_with_retry_after_and_a_dropped_stream_frees_its_slot(served_model_dir):  # noqa: F811
    async def crowd(url: str) -> list[tuple[int, dict]]:
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            return await asyncio.gather(*(_stream_first_chunk(c, {**LONG, "stream": True}) for _ in range(6)))

    with running_server(served_model_dir, "--max-queue", "1", "--max-batch", "1") as url:
        results = asyncio.run(crowd(url))
        statuses = [s for s, _ in results]
        assert set(statuses) <= {200, 503} and 503 in statuses and 200 in statuses, statuses
        assert all(h.get("retry-after", "").isdigit() for s, h in results if s == 503)
        err = httpx.post(url + "/v1/completions", json=SHORT)  # the server still serves
        assert err.status_code == 200
        _wait_idle(url)

        # one slot: a request behind a long one waits for it, unless the long one is cancelled
        # (the best of a few tries: load on the machine only ever adds time)
        full = min(_timed(url, LONG) for _ in range(2))
        behind = min(_timed(url, SHORT, after_dropped_stream=True) for _ in range(3))
        assert behind < full / 2, (
            f"a request behind a dropped stream took {behind:.3f} s, the stream alone {full:.3f} s"
        )


def _timed(url: str, body: dict, after_dropped_stream: bool = False) -> float:
    if after_dropped_stream:
        with httpx.stream("POST", url + "/v1/completions", json={**LONG, "stream": True}, timeout=60) as r:
            next(r.iter_lines())
    t0 = time.perf_counter()
    assert httpx.post(url + "/v1/completions", json=body, timeout=60).status_code == 200
    return time.perf_counter() - t0
