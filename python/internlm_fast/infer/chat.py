"""InternLM's chat API: `chat` and `stream_chat` with its template and defaults.

The prompt is the tokenizer's chat template (Tokenizer.chat_prompt, the format the model was
fine-tuned on): each past turn `<s><|User|>:{query}<eoh>\\n<|Bot|>:{answer}<eoa>\\n`, then
`<s><|User|>:{query}<eoh>\\n<|Bot|>:`. History is a list of (query, response) pairs, as InternLM's
own `chat` takes and returns it. Defaults: sampling, temperature 0.8, top_p 0.8, 1024 new tokens,
stop at </s> or <eoa>.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence

from internlm_fast.model import InternLMForCausalLM

from .generate import GenerationConfig, generate_steps

CHAT_DEFAULTS = dict(max_new_tokens=1024, do_sample=True, temperature=0.8, top_p=0.8)

History = list[tuple[str, str]]


def chat_prompt_ids(tokenizer, query: str, history: Sequence[tuple[str, str]] = ()) -> list[int]:
    if not isinstance(query, str):
        raise TypeError(f"query must be a str, got {type(query).__name__}")
    messages = []
    for i, turn in enumerate(history):
        if not (isinstance(turn, (tuple, list)) and len(turn) == 2 and all(isinstance(t, str) for t in turn)):
            raise ValueError(f"history[{i}] must be a (query, response) pair of strings, got {turn!r:.80}")
        messages += [{"role": "user", "content": turn[0]}, {"role": "assistant", "content": turn[1]}]
    messages.append({"role": "user", "content": query})
    return tokenizer.chat_prompt(messages)


def chat_config(tokenizer, **gen) -> GenerationConfig:
    """CHAT_DEFAULTS and the tokenizer's stop ids, overridden by `gen` (GenerationConfig fields)."""
    return GenerationConfig(**{**CHAT_DEFAULTS, "eos_token_id": sorted(tokenizer.stop_ids), **gen})


def stream_chat(
    model: InternLMForCausalLM, tokenizer, query: str, history: Sequence[tuple[str, str]] = (), **gen
) -> Iterator[tuple[str, History]]:
    """Yields (response so far, history + [(query, response so far)]) each time the response grows.
    The arguments are checked when it is called, before the first response."""
    history = list(history)
    steps = generate_steps(
        model, [chat_prompt_ids(tokenizer, query, history)], chat_config(tokenizer, **gen), tokenizer
    )
    return _responses(steps, query, history)


def _responses(steps, query: str, history: History) -> Iterator[tuple[str, History]]:
    response = ""
    for (step,) in steps:
        if step.text:
            response += step.text
            yield response, history + [(query, response)]


def chat(
    model: InternLMForCausalLM, tokenizer, query: str, history: Sequence[tuple[str, str]] = (), **gen
) -> tuple[str, History]:
    """(response, history + [(query, response)])."""
    last = deque(stream_chat(model, tokenizer, query, history, **gen), maxlen=1)
    response = last[0][0] if last else ""
    return response, list(history) + [(query, response)]
