"""The terminal chat loop.

Each line typed is a user turn; the answer streams as it is generated and joins the history.
/clear forgets the history, /exit (or Ctrl-D) quits, Ctrl-C stops an answer mid-way (and quits at
the prompt). With stdin piped, every input line is a turn and only the answers are printed, one
"Bot: ..." block per turn, so scripts and tests can drive it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from internlm_fast.infer.chat import CHAT_DEFAULTS, chat_prompt_ids, stream_chat
from internlm_fast.infer.generate import GenerationConfig
from internlm_fast.model.hf_config import dtype_from_name

from .loading import default_model_dir, load_model

HELP = "/clear forgets the conversation, /exit quits (or Ctrl-D); Ctrl-C stops an answer"
DTYPES = ("fp32", "bf16", "fp16")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m internlm_fast.chat", description=__doc__.splitlines()[0])
    p.add_argument("--model", help="model folder or training checkpoint; default: the default training run's output")
    p.add_argument("--temperature", type=float, default=CHAT_DEFAULTS["temperature"], help="sampling temperature")
    p.add_argument("--top-p", type=float, default=CHAT_DEFAULTS["top_p"], help="nucleus sampling mass")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (0 = all)")
    p.add_argument("--max-new-tokens", type=int, default=CHAT_DEFAULTS["max_new_tokens"], help="answer length cap")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="penalty on tokens already seen (1 = off)")
    p.add_argument("--greedy", action="store_true", help="always take the likeliest token (no sampling)")
    p.add_argument("--seed", type=int, default=None, help="seed of the sampling")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="compute dtype (default: as stored)")
    p.add_argument("--kv-dtype", choices=DTYPES, default=None, help="KV cache dtype (default: the model's)")
    p.add_argument("--quantize", choices=("int8",), default=None, help="int8 weight-only quantization (default: none)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    return p.parse_args(argv)


def _generation_options(args: argparse.Namespace) -> dict:
    greedy = args.greedy or args.temperature == 0
    gen = dict(
        max_new_tokens=args.max_new_tokens,
        do_sample=not greedy,
        top_p=args.top_p,
        top_k=args.top_k,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        kv_dtype=args.kv_dtype,
    )
    if not greedy:
        gen["temperature"] = args.temperature
    return gen


def _fit_history(tokenizer, query: str, history: list, limit: int) -> list | None:
    """The most recent turns whose prompt fits the model's context (None if the query alone does not)."""
    history = list(history)
    while len(chat_prompt_ids(tokenizer, query, history)) >= limit:
        if not history:
            return None
        history.pop(0)
    return history


def _answer(model, tokenizer, query: str, history: list, gen: dict, out) -> list:
    """Streams one answer to `out`; returns the new history (unchanged if interrupted)."""
    fitted = _fit_history(tokenizer, query, history, model.config.context_length)
    if fitted is None:
        limit = model.config.context_length
        print(f"(message too long: it does not fit the model's {limit} tokens)", file=out, flush=True)
        return history
    if len(fitted) < len(history):
        dropped = len(history) - len(fitted)
        print(f"(the oldest {dropped} turn(s) no longer fit the context and were dropped)", file=out, flush=True)
    out.write("Bot: ")
    out.flush()
    shown = ""
    try:
        for response, _ in stream_chat(model, tokenizer, query, fitted, **gen):
            out.write(response[len(shown) :])
            out.flush()
            shown = response
    except KeyboardInterrupt:
        out.write(" [stopped]\n")
        return history
    out.write("\n")
    out.flush()
    return fitted + [(query, shown)]


def run(model, tokenizer, gen: dict, stdin=None, out=None) -> int:
    stdin, out = stdin or sys.stdin, out or sys.stdout
    interactive = stdin.isatty()
    history: list = []
    while True:
        try:
            if interactive:
                line = input("User: ")
            else:
                line = stdin.readline()
                if not line:
                    return 0
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:
            print()
            return 0
        query = line.strip()
        if not query:
            continue
        if query == "/exit":
            return 0
        if query == "/clear":
            history = []
            print("(conversation cleared)", file=out, flush=True)
            continue
        history = _answer(model, tokenizer, query, history, gen, out)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    path = Path(args.model) if args.model else default_model_dir()
    if path is None:
        print(
            "no model to chat with: the default training run has no output yet.\n"
            "Train one first (a few minutes on a CPU):  python -m internlm_fast.train\n"
            "or point to a model folder:                python -m internlm_fast.chat --model DIR",
            file=sys.stderr,
        )
        return 2
    try:
        gen = _generation_options(args)
        GenerationConfig(**gen)  # checks every option before the (slow) load
        model, tokenizer = load_model(path, dtype_from_name(args.dtype), args.device, args.quantize)
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    model.to(args.device)
    print(f"chatting with {path} ({HELP})", file=sys.stderr)
    return run(model, tokenizer, gen)
