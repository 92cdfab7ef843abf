"""The OpenAI request bodies the server accepts, their validation, and the OpenAI error shape.

Bodies are parsed by hand (`parse_body`) rather than by FastAPI, so that every malformed body -- not
JSON, not an object, NaN, a wrong type, a number out of range -- becomes a 400 in OpenAI's error
shape naming the offending field, never a 500. Parsing is strict about the types of the known fields
(no "1" for 1, no true for 1, no 1.5 for an int) and lenient about unknown ones, which are ignored
as OpenAI does.

Defaults and choices where OpenAI leaves room:
- max_tokens (chat: max_completion_tokens wins) defaults to what the context leaves after the
  prompt, at most DEFAULT_MAX_TOKENS; a larger request is cut to the context (finish "length"); a
  prompt that leaves no room is a 400 (code context_length_exceeded).
- temperature 1, top_p 1; a temperature below SAMPLING_EPS is greedy. top_k (-1 or 0: off),
  repetition_penalty (1: off) and ignore_eos are vLLM's extra fields.
- n choices per prompt; with a seed, choice i is sampled with seed + i.
- presence_penalty / frequency_penalty other than 0, logit_bias, echo, suffix and best_of != n are
  refused (400 naming the field) rather than silently ignored: they would change the output.
- stream_options is honoured only with stream; empty stop strings are dropped.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .requests import SamplingParams

# OpenAI's own limits, so that a client written for OpenAI fails here the same way.
MAX_STOP = 4
MAX_N = 128
MAX_CHAT_TOP_LOGPROBS = 20
MAX_COMPLETION_LOGPROBS = 5
# The default max_tokens is what is left of the context, but at most this: an answer that long is
# almost always a model looping, and the client can always ask for more.
DEFAULT_MAX_TOKENS = 1024
# Below this a temperature is greedy, as in vLLM: dividing the logits by less overflows them.
SAMPLING_EPS = 1e-5
# Dividing the logits by a smaller penalty can overflow them; 1 is off, useful values lie near it.
MIN_REPETITION_PENALTY = 0.01
# torch.Generator.manual_seed accepts [-2**63, 2**64); the engine gets seeds wrapped into [0, 2**64).
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self,
        message: str,
        status: int = 400,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.code = code
        self.type = type or error_type(status)
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_type(status: int) -> str:
    """OpenAI's error type for an HTTP status."""
    if status == 401:
        return "authentication_error"
    if status < 500:
        return "invalid_request_error"
    return "server_error"


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


class StreamOptions(_Strict):
    include_usage: bool | None = None


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    # "developer" is OpenAI's newer name for the system role
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def as_template_message(self) -> dict:
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class SamplingRequest(_Strict):
    """The fields both endpoints share. None everywhere means "the default", as OpenAI's clients send
    explicit nulls for unset fields."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = Field(None, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # vLLM's extra sampling fields; top_k -1 is vLLM's "off"
    top_k: int | None = Field(None, ge=-1)
    repetition_penalty: float | None = Field(None, ge=MIN_REPETITION_PENALTY)
    ignore_eos: bool | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> tuple[str, ...]:
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences are allowed, got {len(stops)}")
        # an empty stop string can never be matched meaningfully, so it is dropped rather than refused
        return tuple(dict.fromkeys(s for s in stops if s))

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _unsupported_penalty(cls, v: float | None) -> float | None:
        if v:
            raise ValueError("not supported (only 0); use repetition_penalty instead")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _unsupported_bias(cls, v: dict | None) -> dict | None:
        if v:
            raise ValueError("not supported")
        return v

    @property
    def n_choices(self) -> int:
        return self.n or 1

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def logprobs_k(self) -> int | None:
        return None

    def _temperature(self) -> float:
        return 0.0 if self.temperature < SAMPLING_EPS else self.temperature

    def sampling_params(self, choice: int, max_tokens: int) -> SamplingParams:
        """The engine settings of the choice-th of the n choices of a prompt: with a seed, choice i is
        seeded seed + i so the n choices differ and each is reproducible."""
        seed = None if self.seed is None else (self.seed + choice) % 2**64
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self._temperature(),
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=max(self.top_k or 0, 0),
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            seed=seed,
            stop=self.stop or (),
            logprobs=self.logprobs_k(),
            ignore_eos=bool(self.ignore_eos),
        )


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_CHAT_TOP_LOGPROBS)

    def requested_max_tokens(self) -> int | None:
        # the newer name wins, as in OpenAI's API where max_tokens is its deprecated alias
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def logprobs_k(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def template_messages(self) -> list[dict]:
        return [m.as_template_message() for m in self.messages]


class CompletionRequest(SamplingRequest):
    prompt: Any
    logprobs: int | None = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1, le=MAX_N)

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: Any) -> str | list[str] | list[int] | list[list[int]]:
        # checked by hand: pydantic's errors for a 4-way union name every branch and help nobody
        if isinstance(v, str):
            return v
        if not isinstance(v, list) or not v:
            raise ValueError("must be a string, a list of strings, a list of token ids or a list of such lists")
        if all(isinstance(p, str) for p in v):
            return v
        if all(_is_int(t) for t in v):
            return v
        if all(isinstance(p, list) for p in v):
            for i, p in enumerate(v):
                if not p or not all(_is_int(t) for t in p):
                    raise ValueError(f"prompt {i} must be a non-empty list of token ids")
            return v
        raise ValueError("a list prompt must hold only strings, only token ids, or only lists of token ids")

    @field_validator("echo")
    @classmethod
    def _echo(cls, v: bool | None) -> bool | None:
        if v:
            raise ValueError("not supported")
        return v

    @field_validator("suffix")
    @classmethod
    def _suffix(cls, v: str | None) -> str | None:
        if v:
            raise ValueError("not supported")
        return v

    def logprobs_k(self) -> int | None:
        return self.logprobs

    @property
    def prompt_count(self) -> int:
        return 1 if isinstance(self.prompt, str) or _is_int(self.prompt[0]) else len(self.prompt)

    def check(self) -> None:
        if self.best_of is not None and self.best_of != self.n_choices:
            raise APIError("best_of is not supported (only equal to n)", param="best_of")
        if self.prompt_count * self.n_choices > MAX_N:
            raise APIError(f"at most {MAX_N} choices per request (prompts x n)", param="prompt")


def _is_int(v: Any) -> bool:
    return type(v) is int  # bool is an int subclass but not a token id


def parse_body(raw: bytes, model: type[_Strict]) -> Any:
    """The validated request of a raw body; APIError(400) naming the first bad field otherwise."""
    try:
        obj = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise APIError(f"the request body is not valid JSON: {_short(e)}") from None
    if not isinstance(obj, dict):
        raise APIError(f"the request body must be a JSON object, got {_json_type(obj)}")
    try:
        req = model.model_validate(obj)
    except ValidationError as e:
        err = e.errors(include_url=False, include_input=False)[0]
        loc = [str(p) for p in err["loc"] if not _is_union_tag(p)]
        msg = err["msg"].removeprefix("Value error, ")
        path = ".".join(loc)
        raise APIError(f"{path or 'body'}: {msg}", param=path or None) from None
    except (ValueError, TypeError, OverflowError, RecursionError) as e:
        raise APIError(f"invalid request: {_short(e)}") from None
    if isinstance(req, ChatCompletionRequest) and req.top_logprobs and not req.logprobs:
        raise APIError("top_logprobs needs logprobs set to true", param="top_logprobs")
    if isinstance(req, CompletionRequest):
        req.check()
    return req


def _is_union_tag(part: Any) -> bool:
    """pydantic names the branch of a union in an error's location ("str", "list[TextPart]"); the
    client only needs the field's path."""
    return isinstance(part, str) and (part in ("str", "int", "float", "bool") or "[" in part)


def _json_type(v: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(v), "a number")


def _short(e: BaseException, limit: int = 200) -> str:
    s = str(e)
    return s if len(s) <= limit else s[:limit] + "..."
