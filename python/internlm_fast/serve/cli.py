"""`python -m internlm_fast.serve`: load a model, start the engine, serve the OpenAI API and the page.

    python -m internlm_fast.serve --model runs/default/final --port 8000
    # page: http://127.0.0.1:8000/     API: http://127.0.0.1:8000/v1 (any OpenAI client)

Without --model it serves the default training run's output. --port 0 picks a free port; the URLs
printed once the socket is bound name the real one.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

DTYPES = ("fp32", "bf16", "fp16")
T = TypeVar("T")
API_KEY_ENV = "INTERNLM_FAST_API_KEY"


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be in [0, 65535], got {value}")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m internlm_fast.serve", description=__doc__.splitlines()[0])
    p.add_argument("--model", help="model folder or training checkpoint; default: the default training run's output")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=_port, default=8000, help="port to listen on (0: any free port)")
    p.add_argument(
        "--api-key",
        default=os.environ.get(API_KEY_ENV) or None,
        help=f"require `Authorization: Bearer KEY` on /v1/* (default: ${API_KEY_ENV}, else no key)",
    )
    p.add_argument("--dtype", choices=DTYPES, default=None, help="compute dtype (default: as stored)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--max-batch", type=_positive, default=8, help="sequences generated together")
    p.add_argument("--max-queue", type=_positive, default=64, help="waiting requests before 503s")
    p.add_argument("--max-model-len", type=_positive, default=None, help="prompt + answer tokens per sequence")
    p.add_argument("--block-size", type=_positive, default=16, help="tokens per KV cache block")
    p.add_argument(
        "--cache-tokens",
        type=_positive,
        default=None,
        help="KV cache pool size in tokens, shared by all sequences (default: max-batch x max-model-len)",
    )
    p.add_argument(
        "--no-prefix-cache",
        action="store_true",
        help="never reuse the cached blocks of an earlier prompt and answer (every prompt is prefilled whole)",
    )
    p.add_argument(
        "--prefix-cache-tokens",
        type=_positive,
        default=None,
        help="most tokens kept for reuse after their requests finish, least recently used evicted first "
        "(default: whatever the pool has free)",
    )
    p.add_argument("--kv-dtype", choices=DTYPES, default=None, help="KV cache dtype (default: the model's)")
    p.add_argument("--quantize", choices=("int8",), default=None, help="int8 weight-only quantization (default: none)")
    p.add_argument("--threads", type=_positive, default=None, help="CPU threads of torch (default: torch's)")
    p.add_argument("--served-model-name", default=None, help="the model's name in the API (default: folder name)")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    return p.parse_args(argv)


def _url(host: str, port: int, path: str) -> str:
    return f"http://{f'[{host}]' if ':' in host else host}:{port}{path}"


async def _serve(server, host: str, api_key: str | None) -> None:
    """Runs uvicorn and prints the URLs once the socket is bound (so --port 0 prints the real port)."""
    task = asyncio.create_task(server.serve())
    while not server.started and not task.done():
        await asyncio.sleep(0.05)
    if server.started:
        port = server.servers[0].sockets[0].getsockname()[1]
        print(f"chat page: {_url(host, port, '/')}", flush=True)
        note = " (Authorization: Bearer <api key>)" if api_key else ""
        print(f"OpenAI API: {_url(host, port, '/v1')}{note}", flush=True)
    await task


def _on_passing_thread(fn: Callable[[], T]) -> T:
    """fn()'s result (or its exception), computed on a thread that ends when fn returns.

    Loading a model runs torch ops whose parallel regions give the loading thread a pool of GNU
    OpenMP workers, kept as long as that thread lives. With the engine's own pool beside it, libgomp
    manages more threads than the machine has cores and stops spinning between regions: each of the
    engine's regions then wakes its workers through the kernel, and on 2 cores a prefill took 1.4x as
    long. Loaded on a thread that ends, the model leaves no pool behind, and the engine thread's is
    the only one (the event loop runs no parallel torch ops)."""
    box: dict = {}

    def run() -> None:
        try:
            box["result"] = fn()
        except BaseException as e:  # re-raised on the caller's thread
            box["error"] = e

    thread = threading.Thread(target=run, name="internlm_fast-load", daemon=True)  # Ctrl-C does not wait for it
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["result"]


def _exit_on_sigterm(signum: int, frame: object) -> None:
    # uvicorn shuts down gracefully on SIGTERM and then re-raises it; exiting through SystemExit
    # (rather than the default kill) lets main's finally shut the engine down
    raise SystemExit(0)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # heavy imports after argument parsing, so --help and usage errors are instant
    import torch
    import uvicorn

    from internlm_fast.chat import default_model_dir, load_model
    from internlm_fast.model.hf_config import dtype_from_name

    from .app import create_app

    path = Path(args.model) if args.model else default_model_dir()
    if path is None:
        print(
            "no model to serve: the default training run has no output yet.\n"
            "Train one first (a few minutes on a CPU):  python -m internlm_fast.train\n"
            "or point to a model folder:                python -m internlm_fast.serve --model DIR",
            file=sys.stderr,
        )
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    # The engine thread holds the GIL between kernels (most ATen calls keep it), so a token it hands
    # to the event loop waits for the next switch: Python's default interval is 5 ms, more than a
    # decode step. 1 ms lets the event loop stream each token within about a step.
    sys.setswitchinterval(0.001)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")

    def build():
        model, tokenizer = load_model(path, dtype_from_name(args.dtype), device, args.quantize)
        model.to(device)
        from .engine import Engine

        return Engine(
            model,
            tokenizer,
            max_batch=args.max_batch,
            max_queue=args.max_queue,
            max_model_len=args.max_model_len,
            block_size=args.block_size,
            cache_tokens=args.cache_tokens,
            prefix_cache=not args.no_prefix_cache,
            prefix_cache_tokens=args.prefix_cache_tokens,
            kv_dtype=args.kv_dtype,
        )

    try:
        engine = _on_passing_thread(build)
    except (ValueError, TypeError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    name = args.served_model_name or path.resolve().name
    app = create_app(engine, name, api_key=args.api_key)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=3)
    server = uvicorn.Server(config)
    print(f"serving {path} as {name!r} on {device}", file=sys.stderr, flush=True)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    engine.start()
    try:
        # uvicorn's event loop (uvloop where it is installed, as with uvicorn --loop auto)
        with asyncio.Runner(loop_factory=config.get_loop_factory()) as runner:
            runner.run(_serve(server, args.host, args.api_key))
    except KeyboardInterrupt:
        pass
    finally:
        engine.shutdown()
    return 0 if server.started else 1
