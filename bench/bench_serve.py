"""Serving under load: the OpenAI server (`python -m internlm_fast.serve`) as its own process on
loopback, the tiny preset (random weights, a real 8192-piece tokenizer), 2 torch threads, fp32,
greedy; clients are `openai.AsyncOpenAI` streaming chat completions with usage.

Bars, asserted on the ratios measured side by side in one run (and printed, PASS/FAIL, beside the
numbers):
- 1, 4, 8 and 16 concurrent clients, each one request of 128 new tokens (ignore_eos, so every one
  generates all 128): total generated tokens/s with 8 clients >= 2.5x with 1 client. Time to first
  token and the gaps between streamed chunks, p50/p99, are reported per level;
- a 5-turn chat (user turns of 40-80 tokens, answers of 128 tokens like the load's requests, the last
  one cut where the 1024-token context ends), run against a server with prefix
  reuse and one without (--no-prefix-cache), a fresh conversation each repeat so reuse can only come
  from the same conversation's turns 1-4: the fifth turn's time to first token with reuse <= 1/3 of
  without. Asserted, as correctness rather than speed: every answer, the fifth included, has the
  same tokens on both servers, or the two part at a near tie (top-2 logprobs within TIE, which fp32
  rounding may break either way once reuse changes the summation order), after which the
  conversations differ and are compared no further.

    python bench/bench_serve.py        # the same measurements, printed as a table
"""

from __future__ import annotations

import asyncio
import math
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import openai

if __package__:
    from .conftest import report
    from .serve_helpers import MODEL_NAME, THREADS, bench_model_dir, running_server
else:  # run as a script: bench/ is sys.path[0]
    from serve_helpers import MODEL_NAME, THREADS, bench_model_dir, running_server

    report = print

NEW_TOKENS = 128
LEVELS = (1, 4, 8, 16)
ROUNDS = 5  # per level, interleaved, so drift in the shared machine's speed hits every level alike
MAX_BATCH = max(LEVELS)
SCALING_BAR = 2.5  # tokens/s at 8 clients over 1 client

TURNS = 5
ANSWER_TOKENS = 128
CONTEXT = 1024  # the tiny preset's max_position_embeddings
USER_TOKENS = (40, 80)
CHAT_REPEATS = 5
REUSE_BAR = 1 / 3  # fifth-turn TTFT with prefix reuse over without
# Two tokens whose logprobs lie closer than this are a tie that fp32 rounding may break either way;
# reuse moves the logprobs by ~1e-4 at most here (reported as the drift).
TIE = 1e-3

WORDS = (
    "river stone garden window paper light music engine market silver winter doctor letter island "
    "bridge forest coffee planet signal mirror camera rocket orange pencil butter castle ticket "
    "dragon school summer yellow circle animal button cotton travel pocket wonder number future "
    "simple gentle random golden hidden frozen broken silent modern narrow"
).split()


@dataclass
class Stream:
    """One streamed completion, as its client saw it."""

    start: float
    token_times: list[float] = field(default_factory=list)  # arrival of each chunk carrying tokens
    end: float = 0.0
    text: str = ""
    tokens: list[str] = field(default_factory=list)  # with logprobs: the token strings
    logprobs: list[float] = field(default_factory=list)
    top: list[dict[str, float]] = field(default_factory=list)  # the runners-up of each token
    usage: openai.types.CompletionUsage | None = None

    @property
    def ttft(self) -> float:
        return self.token_times[0] - self.start

    @property
    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.token_times, self.token_times[1:])]

    @property
    def cached_tokens(self) -> int:
        details = self.usage.prompt_tokens_details if self.usage else None
        return (details.cached_tokens or 0) if details else 0


async def stream_chat(
    client: openai.AsyncOpenAI, messages: list[dict], max_tokens: int, top_logprobs: int | None = None
) -> Stream:
    """Streams one greedy chat completion of exactly max_tokens tokens (ignore_eos, vLLM's field), with
    the logprobs of each token and its top_logprobs likeliest alternatives unless that is None."""
    out = Stream(time.perf_counter())
    stream = await client.chat.completions.create(
        model=MODEL_NAME,
        messages=messages,
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        logprobs=top_logprobs is not None or None,
        top_logprobs=top_logprobs,
        extra_body={"ignore_eos": True},
    )
    parts = []
    async for chunk in stream:
        if chunk.usage is not None:
            out.usage = chunk.usage
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        lps = choice.logprobs.content if choice.logprobs and choice.logprobs.content else []
        # chat streams open with a role-only chunk, sent before the prompt is even prefilled
        if choice.delta.content or lps:
            out.token_times.append(time.perf_counter())
            parts.append(choice.delta.content or "")
            out.tokens += [lp.token for lp in lps]
            out.logprobs += [lp.logprob for lp in lps]
            out.top += [{t.token: t.logprob for t in lp.top_logprobs} for lp in lps]
    out.end = time.perf_counter()
    out.text = "".join(parts)
    return out


def percentile(values: list[float], q: float) -> float:
    """The q-quantile, linearly interpolated between the nearest ranks (numpy's default)."""
    s = sorted(values)
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def _client(base_url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=120)


# -- load: concurrent clients ------------------------------------------------------------------------


async def _load_round(client: openai.AsyncOpenAI, clients: int, seed: int) -> tuple[float, float, list[Stream]]:
    """(total completion tokens / wall time from the first request's start to the last one's end, this
    client process's CPU seconds per wall second, the streams)."""
    rng = random.Random(seed)
    # distinct from the first word, so that no two requests (of this or any round) share a cached block
    prompts = [f"{seed}-{i} {_words(rng, rng.randint(6, 14))}?" for i in range(clients)]
    cpu = time.process_time()
    streams = await asyncio.gather(
        *(stream_chat(client, [{"role": "user", "content": p}], NEW_TOKENS) for p in prompts)
    )
    cpu = time.process_time() - cpu
    wall = max(s.end for s in streams) - min(s.start for s in streams)
    for s in streams:
        got = s.usage.completion_tokens if s.usage else None
        assert got == NEW_TOKENS, f"a request generated {got} tokens, not {NEW_TOKENS} (is ignore_eos honoured?)"
    return sum(s.usage.completion_tokens for s in streams) / wall, cpu / wall, streams


async def measure_load(base_url: str) -> dict[int, dict]:
    """Per concurrency level: median tokens/s over ROUNDS rounds, TTFT and chunk-gap percentiles (s)."""
    client = _client(base_url)
    try:
        await _load_round(client, 1, seed=10_000)  # warm-up: first forward, allocator, connections
        await _load_round(client, max(LEVELS), seed=10_001)
        rates: dict[int, list[float]] = {n: [] for n in LEVELS}
        cpus: dict[int, list[float]] = {n: [] for n in LEVELS}
        streams: dict[int, list[Stream]] = {n: [] for n in LEVELS}
        for r in range(ROUNDS):
            for n in LEVELS:
                rate, cpu, got = await _load_round(client, n, seed=100 * r + n)
                rates[n].append(rate)
                cpus[n].append(cpu)
                streams[n] += got
    finally:
        await client.close()
    out = {}
    for n in LEVELS:
        ttfts = [s.ttft for s in streams[n]]
        gaps = [g for s in streams[n] for g in s.gaps]
        out[n] = {
            "tokens_per_s": statistics.median(rates[n]),
            "ttft_p50": percentile(ttfts, 0.5),
            "ttft_p99": percentile(ttfts, 0.99),
            "itl_p50": percentile(gaps, 0.5),
            "itl_p99": percentile(gaps, 0.99),
            "client_cpu": statistics.median(cpus[n]),
        }
    return out


def report_load(results: dict[int, dict]) -> float:
    """Prints the table; returns tokens/s at 8 clients over 1 client."""
    report(
        f"serve load: tiny preset, {THREADS} threads, --max-batch {MAX_BATCH}, {NEW_TOKENS} new tokens per "
        f"streaming chat request, median of {ROUNDS} rounds (latency percentiles over all rounds' requests; "
        "ITL: gaps between streamed chunks; client CPU: the bench's own process, in cores)"
    )
    report(
        f"{'clients':>8} {'tokens/s':>9} {'TTFT p50':>10} {'TTFT p99':>10} {'ITL p50':>9} {'ITL p99':>9} "
        f"{'client CPU':>10}"
    )
    for n, m in results.items():
        report(
            f"{n:>8} {m['tokens_per_s']:>9.0f} {m['ttft_p50'] * 1e3:>7.1f} ms {m['ttft_p99'] * 1e3:>7.1f} ms "
            f"{m['itl_p50'] * 1e3:>6.2f} ms {m['itl_p99'] * 1e3:>6.2f} ms {m['client_cpu']:>10.2f}"
        )
    scaling = results[8]["tokens_per_s"] / results[1]["tokens_per_s"]
    verdict = "PASS" if scaling >= SCALING_BAR else "FAIL"
    report(f"serve load: 8 clients give {scaling:.2f}x the tokens/s of 1 client (bar >= {SCALING_BAR}x): {verdict}")
    return scaling


# -- prefix reuse: a multi-turn chat -------------------------------------------------------------------


def _user_turns(repeat: int, tokenizer) -> list[str]:
    """TURNS user messages of 40-80 tokens each (counted with the served tokenizer), different for every
    repeat from the first word on, so a conversation can only reuse its own earlier turns."""
    rng = random.Random(1_000 + repeat)
    turns = []
    for t in range(TURNS):
        target = rng.randint(*USER_TOKENS)
        text = f"Conversation {repeat} turn {t}:"
        while len(tokenizer.encode(text + " " + rng.choice(WORDS))) <= target:
            text += " " + rng.choice(WORDS)
        turns.append(text)
    return turns


async def _conversation(base_url: str, turns: list[str]) -> list[Stream]:
    """The chat turn by turn, each user message after the previous answers, with each token's logprob
    and runner-up (to tell a near tie from a real difference when two servers disagree)."""
    client = _client(base_url)
    messages: list[dict] = []
    streams = []
    try:
        for user in turns:
            messages.append({"role": "user", "content": user})
            s = await stream_chat(client, messages, ANSWER_TOKENS, top_logprobs=2)
            messages.append({"role": "assistant", "content": s.text})
            streams.append(s)
    finally:
        await client.close()
    return streams


def _divergence(a: Stream, b: Stream) -> tuple[int, float] | None:
    """(the first token two answers differ at, the larger of the two servers' logprob margins between
    their own choice and the other's there), or None when the answers are the same."""
    for i, (x, y) in enumerate(zip(a.tokens, b.tokens)):
        if x != y:
            return i, max(a.logprobs[i] - a.top[i].get(y, -math.inf), b.logprobs[i] - b.top[i].get(x, -math.inf))
    if len(a.tokens) != len(b.tokens) or a.text != b.text:
        return min(len(a.tokens), len(b.tokens)), math.inf
    return None


def compare_conversations(with_reuse: list[Stream], without: list[Stream]) -> tuple[str, str, float]:
    """("same" | "tie" | "differ", where and why, the largest logprob difference over the turns compared).

    Reusing cached keys and values changes fp32 summation orders, so two tokens whose logprobs lie
    within TIE of each other may come out either way; the turns after such a tie have different
    histories and are not compared."""
    drift = 0.0
    for t, (a, b) in enumerate(zip(with_reuse, without)):
        d = _divergence(a, b)
        if d is None:
            drift = max([drift, *(abs(x - y) for x, y in zip(a.logprobs, b.logprobs))])
            continue
        i, margin = d
        where = (
            f"turn {t + 1} token {i} ({a.tokens[i : i + 2]} vs {b.tokens[i : i + 2]}, logprob margin {margin:.1e}; "
            f"prompt tokens {a.usage.prompt_tokens} with reuse, {b.usage.prompt_tokens} without)"
        )
        if a.usage.prompt_tokens != b.usage.prompt_tokens:
            where += ": the servers made different prompts of the same messages"
        return ("tie" if margin <= TIE else "differ"), where, drift
    return "same", "", drift


def measure_prefix_reuse(model_dir: Path) -> dict:
    """Fifth-turn TTFT (median over CHAT_REPEATS fresh conversations) with and without prefix reuse,
    and how each conversation's answers compare between the two servers."""
    from internlm_fast.data import Tokenizer

    tokenizer = Tokenizer(model_dir / "tokenizer.model")
    with running_server(model_dir) as reuse_url, running_server(model_dir, prefix_cache=False) as plain_url:
        urls = {"reuse": reuse_url, "plain": plain_url}
        for url in urls.values():  # warm-up, on content no measured conversation shares
            asyncio.run(_conversation(url, ["warm-up " + _words(random.Random(7), 40)] * 2))
        runs: dict[str, list[list[Stream]]] = {k: [] for k in urls}
        for r in range(CHAT_REPEATS):
            turns = _user_turns(r, tokenizer)
            for kind, url in urls.items():  # alternating, as the load rounds do
                runs[kind].append(asyncio.run(_conversation(url, turns)))
    out: dict = {}
    for kind in urls:
        last = [conv[-1] for conv in runs[kind]]
        out[f"{kind}_ttft"] = statistics.median(s.ttft for s in last)
        out[f"{kind}_prompt_tokens"] = statistics.median(s.usage.prompt_tokens for s in last)
        out[f"{kind}_cached_tokens"] = statistics.median(s.cached_tokens for s in last)
        for s in (s for conv in runs[kind] for s in conv):
            want = min(ANSWER_TOKENS, CONTEXT - s.usage.prompt_tokens)
            assert len(s.tokens) == want, f"an answer has {len(s.tokens)} tokens, not {want}"
    out["comparisons"] = [compare_conversations(a, b) for a, b in zip(runs["reuse"], runs["plain"])]
    return out


def report_prefix_reuse(m: dict) -> float:
    """Prints the comparison; returns the fifth-turn TTFT with reuse over without."""
    ratio = m["reuse_ttft"] / m["plain_ttft"]
    report(
        f"serve prefix reuse: {TURNS}-turn chat, user turns {USER_TOKENS[0]}-{USER_TOKENS[1]} tokens, "
        f"{ANSWER_TOKENS}-token answers, fifth-turn TTFT median of {CHAT_REPEATS} fresh conversations"
    )
    for kind, label in (("reuse", "with reuse"), ("plain", "without")):
        report(
            f"{label:>12}: TTFT {m[f'{kind}_ttft'] * 1e3:6.1f} ms, prompt {m[f'{kind}_prompt_tokens']:.0f} tokens, "
            f"cached_tokens {m[f'{kind}_cached_tokens']:.0f}"
        )
    verdict = "PASS" if ratio <= REUSE_BAR else "FAIL"
    report(f"serve prefix reuse: fifth-turn TTFT with/without {ratio:.2f} (bar <= {REUSE_BAR:.2f}): {verdict}")
    kinds = [k for k, _, _ in m["comparisons"]]
    drift = max(d for _, _, d in m["comparisons"])
    report(
        f"serve prefix reuse: answers with vs without reuse, of {len(kinds)} conversations: "
        f"{kinds.count('same')} identical in all {TURNS} turns, {kinds.count('tie')} parted at a near tie "
        f"(margin <= {TIE:g}), {kinds.count('differ')} DIFFER; logprobs of identical turns within {drift:.1e}"
    )
    for r, (kind, where, _) in enumerate(m["comparisons"]):
        if kind != "same":
            report(f"  conversation {r}: {'near tie' if kind == 'tie' else 'DIFFERS'} at {where}")
    return ratio


# -- pytest-benchmark entry points ---------------------------------------------------------------------


def test_serve_load_scaling(benchmark):
    model_dir = bench_model_dir()
    with running_server(model_dir, "--max-batch", str(MAX_BATCH)) as url:
        results = benchmark.pedantic(lambda: asyncio.run(measure_load(url)), rounds=1, iterations=1)
    scaling = report_load(results)
    benchmark.extra_info.update(
        scaling_8_vs_1=round(scaling, 3),
        **{f"tokens_per_s_{n}": round(m["tokens_per_s"], 1) for n, m in results.items()},
    )
    assert scaling >= SCALING_BAR, f"8 clients give {scaling:.2f}x the tokens/s of 1 client (bar {SCALING_BAR}x)"


def test_serve_prefix_reuse(benchmark):
    model_dir = bench_model_dir()
    m = benchmark.pedantic(lambda: measure_prefix_reuse(model_dir), rounds=1, iterations=1)
    ratio = report_prefix_reuse(m)
    benchmark.extra_info.update(ttft_ratio=round(ratio, 3), cached_tokens=m["reuse_cached_tokens"])
    kinds = [k for k, _, _ in m["comparisons"]]
    differ = [f"conversation {r}: {where}" for r, (k, where, _) in enumerate(m["comparisons"]) if k == "differ"]
    assert not differ, "answers differ with and without prefix reuse, not at a near tie:\n" + "\n".join(differ)
    assert "same" in kinds, "every conversation parted at a near tie: nothing was compared to the fifth turn"
    assert ratio <= REUSE_BAR, f"fifth-turn TTFT with reuse is {ratio:.2f} of without (bar <= {REUSE_BAR:.2f})"


def main() -> None:
    model_dir = bench_model_dir()
    with running_server(model_dir, "--max-batch", str(MAX_BATCH)) as url:
        scaling = report_load(asyncio.run(measure_load(url)))
    ratio = report_prefix_reuse(measure_prefix_reuse(model_dir))
    print(f"\nratios: tokens/s 8 clients / 1 client {scaling:.2f}x; fifth-turn TTFT with/without reuse {ratio:.2f}")


if __name__ == "__main__":
    main()
