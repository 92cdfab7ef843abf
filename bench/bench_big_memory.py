"""Peak memory of a bf16 chat at InternLM-7B's full shapes (hidden 4096, intermediate 11008, 32 heads
of 128, vocab 103168, bias on q/k/v/o, untied embeddings; LAYERS layers, env IFAST_BIG_MEMORY_LAYERS,
default all 32: about 14.6 GB of weights).

A random bf16 model folder (std 0.02) is written with the project's safetensors writer, one shard per
decoder layer and one each for the embedding and lm_head, drawn shard by shard so the writer never
holds more than a layer. A fresh process then loads it as the terminal chat does
(InternLMForCausalLM.from_pretrained(folder, dtype=bfloat16, inference=True), which chat.load_model
calls), prefills a PROMPT-token prompt and decodes NEW tokens greedily on 2 threads. Its peak resident
set (VmHWM, loading included) must stay within the weight bytes + 2 GB: the checkpoint is never
resident beside the decode panels. Also printed: load time, prefill time and decode tokens/s.

Needs about the weight bytes + 3 GB of available memory and twice the weight bytes of free disk in
the temp dir (IFAST_BIG_MEMORY_DIR, default the system's); skipped otherwise. The folder is removed at
the end.

    python bench/bench_big_memory.py     # the same measurement, printed
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest
import torch

if __package__:
    from .conftest import THREADS, measure_in_subprocess, report
else:  # run as a script: bench/ is sys.path[0]
    from conftest import THREADS, measure_in_subprocess, report

from internlm_fast.model import InternLMConfig, InternLMForCausalLM
from internlm_fast.model.hf_config import config_to_hf
from internlm_fast.model.weight_files import SAFETENSORS_INDEX, write_safetensors

LAYERS = int(os.environ.get("IFAST_BIG_MEMORY_LAYERS", "32"))
PROMPT, NEW = 16, 8
RSS_SLACK = 2e9


def config() -> InternLMConfig:
    return InternLMConfig(num_hidden_layers=LAYERS, max_position_embeddings=2048)


def shard_names(cfg: InternLMConfig) -> list[list[str]]:
    """The HF names of each shard: the embedding, each decoder layer, the final norm with lm_head."""
    with torch.device("meta"):
        names = list(InternLMForCausalLM(cfg).state_dict())
    layers = [[n for n in names if n.startswith(f"model.layers.{i}.")] for i in range(cfg.num_hidden_layers)]
    tail = [n for n in names if not n.startswith(("model.layers.", "model.embed_tokens."))]
    return [["model.embed_tokens.weight"], *layers, tail]


def write_random_folder(folder: Path, cfg: InternLMConfig, seed: int = 0) -> int:
    """A bf16 model folder of random weights (matrices and biases ~ N(0, 0.02), norms ~ 1 + N(0, 0.02)),
    made one shard at a time; returns the weight bytes."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in InternLMForCausalLM(cfg).state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    groups = shard_names(cfg)
    files = [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    weight_map, total = {}, 0
    for file, names in zip(files, groups):
        shard = {}
        for name in names:
            t = torch.empty(shapes[name], dtype=torch.bfloat16).normal_(0.0, 0.02, generator=gen)
            shard[name] = t.add_(1.0) if "norm" in name else t
            total += t.numel() * t.element_size()
        write_safetensors(folder / file, shard)
        weight_map.update(dict.fromkeys(names, file))
        del shard
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2))
    (folder / "config.json").write_text(json.dumps(config_to_hf(cfg, torch.bfloat16), indent=2))
    return total


_CHAT = r"""
import sys, time
import torch
from internlm_fast.infer import GenerationConfig, generate_steps
from internlm_fast.model import InternLMForCausalLM
torch.set_num_threads(THREADS)
folder, prompt_len, new = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
t0 = time.perf_counter()
model = InternLMForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, inference=True)
load_s = time.perf_counter() - t0
loaded_peak, loaded_rss = peak_kb() * 1024, rss_kb() * 1024
prompt = torch.randint(3, model.config.vocab_size, (prompt_len,), generator=torch.Generator().manual_seed(1)).tolist()
t0 = time.perf_counter()
stamps = []
for _ in generate_steps(model, [prompt], GenerationConfig(max_new_tokens=new)):
    stamps.append(time.perf_counter())
gaps = [b - a for a, b in zip(stamps, stamps[1:])]
result = {
    "load_s": load_s,
    "loaded_peak_bytes": loaded_peak,
    "loaded_rss_bytes": loaded_rss,
    "prefill_s": stamps[0] - t0,
    "decode_s": sorted(gaps)[len(gaps) // 2],
    "tokens": len(stamps),
    "laid_out": model.inference_layout,
    "peak_bytes": peak_kb() * 1024,
    "rss_bytes": rss_kb() * 1024,
}
"""


def _available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def weight_bytes(cfg: InternLMConfig) -> int:
    with torch.device("meta"):
        return sum(
            t.numel() * t.element_size() for t in InternLMForCausalLM(cfg).to(torch.bfloat16).state_dict().values()
        )


def measure() -> dict:
    """Writes the folder, measures the chat process on it, removes the folder."""
    cfg = config()
    need = weight_bytes(cfg)
    base = os.environ.get("IFAST_BIG_MEMORY_DIR") or tempfile.gettempdir()
    if _available_bytes() < need + 3e9:
        pytest.skip(f"needs {(need + 3e9) / 1e9:.1f} GB of available memory, {_available_bytes() / 1e9:.1f} GB here")
    if shutil.disk_usage(base).free < 2 * need:
        pytest.skip(f"needs {2 * need / 1e9:.1f} GB free in {base}")
    folder = Path(tempfile.mkdtemp(prefix="ifast-big-memory-", dir=base))
    try:
        t0 = time.perf_counter()
        total = write_random_folder(folder, cfg)
        write_s = time.perf_counter() - t0
        m = measure_in_subprocess(_CHAT, str(folder), str(PROMPT), str(NEW))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return {**m, "weight_bytes": total, "write_s": write_s}


def report_memory(m: dict) -> bool:
    over = m["peak_bytes"] - m["weight_bytes"]
    ok = over <= RSS_SLACK and m["laid_out"]
    report(
        f"bf16 chat, InternLM-7B shapes, {LAYERS} layers ({THREADS} threads): peak RSS {m['peak_bytes'] / 1e9:.2f} GB "
        f"(loading {m['loaded_peak_bytes'] / 1e9:.2f} GB), weights {m['weight_bytes'] / 1e9:.2f} GB: "
        f"{over / 1e9:+.2f} GB (bar <= +{RSS_SLACK / 1e9:.0f} GB: {'PASS' if ok else 'FAIL'})"
    )
    report(
        f"  load {m['load_s']:.1f} s (folder written in {m['write_s']:.0f} s), {PROMPT}-token prefill "
        f"{m['prefill_s']:.2f} s, decode {1 / m['decode_s']:.2f} tokens/s (median of {m['tokens'] - 1} steps), "
        f"RSS after decoding {m['rss_bytes'] / 1e9:.2f} GB"
    )
    return ok


def test_big_bf16_chat_memory(benchmark):
    m = benchmark.pedantic(measure, rounds=1, iterations=1)
    ok = report_memory(m)
    benchmark.extra_info.update(
        layers=LAYERS,
        peak_gb=round(m["peak_bytes"] / 1e9, 3),
        weights_gb=round(m["weight_bytes"] / 1e9, 3),
        tokens_per_s=round(1 / m["decode_s"], 3),
    )
    assert m["laid_out"], "from_pretrained(..., inference=True) did not lay the bf16 model out"
    assert ok, f"peak RSS {m['peak_bytes'] / 1e9:.2f} GB > weights {m['weight_bytes'] / 1e9:.2f} GB + 2 GB"


def main() -> None:
    report_memory(measure())


if __name__ == "__main__":
    main()
