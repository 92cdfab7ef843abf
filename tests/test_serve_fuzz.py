"""Bad request bodies never crash the server: hypothesis sends malformed JSON, wrong types, values
out of range and broken conversations to both POST endpoints; every answer is a 4xx in OpenAI's
error shape, and afterwards the server still answers a normal request."""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .serve_helpers import MODEL_NAME, served_model_dir, server_url  # noqa: F401

ENDPOINTS = ("/v1/chat/completions", "/v1/completions")
BASE = {
    "/v1/chat/completions": {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1},
    "/v1/completions": {"model": MODEL_NAME, "prompt": "hi", "max_tokens": 1},
}
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12,
)
huge = st.one_of(st.integers(min_value=2**64), st.integers(max_value=-(2**64)))
floats = st.floats(allow_nan=True, allow_infinity=True)
strings = st.text(max_size=10)
containers = st.one_of(st.lists(json_values, max_size=3), st.dictionaries(strings, json_values, max_size=3))


def not_(*kinds: str) -> st.SearchStrategy:
    """JSON values of every type but the given ones (and never null: null means "the default")."""
    pool = {
        "bool": st.booleans(),
        "int": st.integers(),
        "float": floats,
        "str": strings,
        "container": containers,
    }
    return st.one_of(*(s for k, s in pool.items() if k not in kinds))


def number_outside(lo: float, hi: float, lo_open: bool = False) -> st.SearchStrategy:
    """Numbers outside [lo, hi] ((lo, hi] when lo_open), NaN and the infinities."""
    below = st.floats(max_value=lo, exclude_max=not lo_open, allow_nan=False)
    above = st.floats(min_value=hi, exclude_min=True, allow_nan=False)
    return st.one_of(below, above, st.just(float("nan")), st.just(float("inf")), st.just(float("-inf")))


def int_outside(lo: int, hi: int | None) -> st.SearchStrategy:
    out = [st.integers(max_value=lo - 1)]
    if hi is not None:
        out.append(st.integers(min_value=hi + 1))
    return st.one_of(*out, huge.filter(lambda v: v < lo or (hi is not None and v > hi)))


# one bad value per field; every one of them must be refused whatever the other fields are
COMMON_BAD = {
    "model": not_("str"),
    "max_tokens": st.one_of(int_outside(1, None), not_("int")),
    "temperature": st.one_of(number_outside(0, 2), not_("int", "float")),
    "top_p": st.one_of(number_outside(0, 1, lo_open=True), not_("int", "float")),
    "n": st.one_of(int_outside(1, 128), not_("int")),
    "stop": st.one_of(
        not_("str", "container"),
        st.lists(st.text(min_size=1, max_size=5), min_size=5, max_size=8),
        st.lists(not_("str"), min_size=1, max_size=3),
        st.dictionaries(strings, json_values, max_size=3),
    ),
    "seed": st.one_of(int_outside(-(2**63), 2**64 - 1), not_("int")),
    "stream": not_("bool"),
    "stream_options": st.one_of(not_("container"), st.fixed_dictionaries({"include_usage": not_("bool")})),
    "presence_penalty": st.one_of(st.floats(allow_nan=True).filter(lambda f: f != 0), not_("int", "float")),
    "frequency_penalty": st.one_of(st.integers().filter(bool), not_("int", "float")),
    "logit_bias": st.one_of(not_("container"), st.dictionaries(strings, st.floats(-100, 100), min_size=1)),
    "user": not_("str"),
    "top_k": st.one_of(int_outside(-1, None), not_("int")),
    "repetition_penalty": st.one_of(
        st.floats(max_value=0.01, exclude_max=True), st.sampled_from([float("nan"), float("inf")]), not_("int", "float")
    ),
    "ignore_eos": not_("bool"),
}
bad_content = st.one_of(
    not_("str", "container"),
    st.dictionaries(strings, json_values, max_size=3),
    st.lists(st.one_of(not_("container"), st.fixed_dictionaries({"type": strings, "text": not_("str")})), min_size=1),
)
ROLES = ("system", "developer", "user", "assistant")
role = st.sampled_from(ROLES)
BAD_ORDERS = [
    ["assistant"],
    ["system"],
    ["user", "user"],
    ["user", "assistant"],
    ["user", "system"],
    ["system", "system", "user"],
    ["system", "assistant"],
    ["user", "assistant", "assistant", "user"],
]
bad_messages = st.one_of(
    not_("container"),
    st.just([]),
    st.dictionaries(strings, json_values, max_size=3),
    st.lists(not_("container"), min_size=1, max_size=3),
    # a good shape with a bad role or bad content
    st.lists(st.fixed_dictionaries({"role": strings.filter(lambda r: r not in ROLES), "content": strings}), min_size=1),
    st.lists(st.fixed_dictionaries({"role": role, "content": bad_content}), min_size=1, max_size=3),
    st.lists(st.fixed_dictionaries({"role": role}), min_size=1, max_size=2),
    st.builds(lambda order, text: [{"role": r, "content": text} for r in order], st.sampled_from(BAD_ORDERS), strings),
)
CHAT_BAD = {
    **COMMON_BAD,
    "messages": bad_messages,
    "max_completion_tokens": st.one_of(int_outside(1, None), not_("int")),
    "logprobs": not_("bool"),
    "top_logprobs": st.one_of(int_outside(0, 20), not_("int")),
}
token_ids = st.integers(0, 300)
COMPLETION_BAD = {
    **COMMON_BAD,
    "prompt": st.one_of(
        st.none(),
        not_("str", "container"),
        st.just([]),
        st.dictionaries(strings, json_values, max_size=3),
        st.lists(st.one_of(st.booleans(), floats, st.dictionaries(strings, json_values, max_size=1)), min_size=1),
        st.tuples(strings, token_ids).map(list),  # mixed strings and ids
        st.lists(st.lists(token_ids, max_size=3), min_size=1).filter(lambda ps: any(not p for p in ps)),
        st.lists(st.one_of(st.integers(max_value=-1), st.integers(min_value=400)), min_size=1, max_size=3),
        st.lists(token_ids, min_size=300, max_size=400),  # longer than the context
    ),
    "logprobs": st.one_of(int_outside(0, 5), not_("int")),
    "echo": st.one_of(st.just(True), not_("bool")),
    "suffix": st.one_of(st.text(min_size=1, max_size=5), not_("str")),
    "best_of": st.one_of(st.integers().filter(lambda v: v != 1), not_("int")),
}
BAD_FIELDS = {"/v1/chat/completions": CHAT_BAD, "/v1/completions": COMPLETION_BAD}


@pytest.fixture(scope="module")
def http(server_url: str):  # noqa: F811
    with httpx.Client(base_url=server_url, timeout=30) as client:
        yield client


def _post(http: httpx.Client, endpoint: str, content: bytes) -> httpx.Response:
    return http.post(endpoint, content=content, headers={"Content-Type": "application/json"})


def _assert_openai_4xx(r: httpx.Response, sent: object) -> None:
    assert 400 <= r.status_code < 500, f"{r.status_code} for {sent!r:.300}: {r.text[:300]}"
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str)


@FUZZ
@given(endpoint=st.sampled_from(ENDPOINTS), data=st.data())
def test_one_bad_field(http, endpoint, data):
    fields = BAD_FIELDS[endpoint]
    name = data.draw(st.sampled_from(sorted(fields)), label="field")
    body = {**BASE[endpoint], name: data.draw(fields[name], label="value")}
    _assert_openai_4xx(_post(http, endpoint, json.dumps(body).encode()), body)


@FUZZ
@given(endpoint=st.sampled_from(ENDPOINTS), data=st.data())
def test_several_bad_fields_among_junk(http, endpoint, data):
    fields = BAD_FIELDS[endpoint]
    names = data.draw(st.lists(st.sampled_from(sorted(fields)), min_size=1, max_size=4, unique=True), label="fields")
    bad = {n: data.draw(fields[n], label=n) for n in names}
    unknown = st.text(max_size=8).filter(lambda k: k not in fields)
    junk = data.draw(st.dictionaries(unknown, json_values, max_size=3), label="unknown fields")
    body = {**BASE[endpoint], **junk, **bad}
    _assert_openai_4xx(_post(http, endpoint, json.dumps(body).encode()), body)


@FUZZ
@given(endpoint=st.sampled_from(ENDPOINTS), value=json_values)
def test_any_json_value_without_the_required_field(http, endpoint, value):
    # an object without messages/prompt, or any other JSON value, is a 400
    if isinstance(value, dict):
        value.pop("messages", None)
        value.pop("prompt", None)
    _assert_openai_4xx(_post(http, endpoint, json.dumps(value).encode()), value)


@FUZZ
@given(endpoint=st.sampled_from(ENDPOINTS), raw=st.binary(max_size=64))
def test_non_json_bytes(http, endpoint, raw):
    _assert_openai_4xx(_post(http, endpoint, raw), raw)


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_pathological_bodies(http, endpoint):
    for raw in (
        b"[" * 100_000 + b"]" * 100_000,  # nesting deeper than any recursion limit
        b'{"max_tokens": 1' + b"0" * 5000 + b"}",  # an integer of 5000 digits
        b'{"temperature": 1e999, "prompt": "x", "messages": []}',
        b'{"temperature": NaN}',
        b"\xff\xfe\x00",  # not UTF-8
        b"",
    ):
        _assert_openai_4xx(_post(http, endpoint, raw), raw)


VALID = {
    "max_tokens": st.integers(1, 3),
    "temperature": st.floats(0, 2),
    "top_p": st.floats(0, 1, exclude_min=True),
    "top_k": st.one_of(st.integers(-1, 500), st.integers(min_value=0)),
    "repetition_penalty": st.floats(0.01, 1e300),
    "seed": st.integers(-(2**63), 2**64 - 1),
    "n": st.integers(1, 3),
    "stop": st.one_of(st.text(max_size=3), st.lists(st.text(max_size=3), max_size=4)),
    "ignore_eos": st.booleans(),
}
CHAT_VALID = {**VALID, "logprobs": st.booleans(), "top_logprobs": st.integers(0, 20)}
COMPLETION_VALID = {
    **VALID,
    "logprobs": st.integers(0, 5),
    "prompt": st.lists(st.integers(0, 399), min_size=1, max_size=8),
}


@settings(max_examples=100, deadline=None)
@given(endpoint=st.sampled_from(ENDPOINTS), data=st.data())
def test_valid_bodies_are_served(http, endpoint, data):
    fields = CHAT_VALID if endpoint == "/v1/chat/completions" else COMPLETION_VALID
    body = {**BASE[endpoint], **data.draw(st.fixed_dictionaries({}, optional=fields), label="fields")}
    if body.get("top_logprobs"):
        body["logprobs"] = True
    r = _post(http, endpoint, json.dumps(body).encode())
    assert r.status_code == 200, f"{body!r:.300}: {r.text[:300]}"
    assert len(r.json()["choices"]) == body.get("n", 1)


# values at the edges of what is valid: the engine must take them, not fail with a 500
EDGES = [
    {"seed": 2**64 - 1, "n": 2},
    {"seed": -(2**63)},
    {"max_tokens": 10**30},
    {"temperature": 2, "top_p": 1e-300, "top_k": 10**30},
    {"temperature": 0, "repetition_penalty": 1e300},
    {"temperature": 1e-300, "top_k": -1, "repetition_penalty": 0.01},
    {"stop": ["", "\u0000", "x" * 10_000]},
    {"presence_penalty": 0, "frequency_penalty": -0.0, "logit_bias": {}, "user": "u", "best_of": 1},
]


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_edge_values_and_the_server_still_serves(http, endpoint):
    for fields in EDGES:
        if endpoint == "/v1/chat/completions":
            fields = {k: v for k, v in fields.items() if k != "best_of"}
        r = http.post(endpoint, json={**BASE[endpoint], **fields, "max_tokens": fields.get("max_tokens", 2)})
        assert r.status_code == 200, (fields, r.text)
        out = r.json()
        assert len(out["choices"]) == fields.get("n", 1) and all(c["finish_reason"] for c in out["choices"])
        assert out["usage"]["completion_tokens"] >= len(out["choices"])
