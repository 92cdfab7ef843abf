"""Training throughput of the tiny preset against transformers' LlamaForCausalLM (2 threads, fp32).

Bar: a training step (forward, backward, AdamW step, zero_grad) on random token ids
(batch 4, seqlen 512) of the tiny config (4 layers, hidden 256, 8 heads, vocab 8192), ours with
build_optimizer, transformers' LlamaForCausalLM(attention_bias=True, attn_implementation="sdpa")
with the plain torch.optim.AdamW a Hugging Face user gets: ours >= 1.5x its tokens/s, side by side
in one run, and no higher peak RSS, each measured in a fresh process that imports the same
libraries. Our TFLOPS by InternLM's formula (internlm_fast.train.flops) is reported with them.
"""

from __future__ import annotations

import torch

from internlm_fast.model import preset
from internlm_fast.train.flops import tflops, train_flops_per_step

from .conftest import measure_in_subprocess, report

BATCH, SEQLEN, STEPS_FOR_MEMORY = 4, 512, 3

# Shared by this process and the memory subprocesses, so both build exactly the same two setups.
# Both import transformers and internlm_fast: the peak then differs by what the training holds,
# not by which libraries are loaded.
_SETUP = r"""
import torch
import transformers
from internlm_fast.model import InternLMForCausalLM, preset
from internlm_fast.train.optim import build_optimizer

def build(which):
    cfg = preset("tiny")
    if which == "ours":
        model = InternLMForCausalLM(cfg).train()
        return model, build_optimizer(model, lr=1e-3)
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, rms_norm_eps=1e-6, rope_theta=cfg.rope_theta,
        max_position_embeddings=1024, tie_word_embeddings=False, attention_bias=True,
        attn_implementation="sdpa",
    )
    model = transformers.LlamaForCausalLM(hf_cfg).train()
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)

def train_step(model, optimizer, ids):
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad()

def random_ids(batch, seqlen):
    return torch.randint(0, preset("tiny").vocab_size, (batch, seqlen), generator=torch.Generator().manual_seed(0))
"""

_MEMORY = (
    _SETUP
    + r"""
import sys
torch.set_num_threads(THREADS)
which, batch, seqlen, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
ids = random_ids(batch, seqlen)
before = rss_kb()
model, optimizer = build(which)
for _ in range(steps):
    train_step(model, optimizer, ids)
result = {"peak_mb": peak_kb() / 1024, "before_mb": before / 1024}
"""
)


def _setup() -> dict:
    namespace: dict = {}
    exec(_SETUP, namespace)
    return namespace


def test_train_step_throughput(side_by_side):
    s = _setup()
    ids = s["random_ids"](BATCH, SEQLEN)
    torch.manual_seed(0)
    ours, hf = s["build"]("ours"), s["build"]("hf")
    step = s["train_step"]
    ratios, med = side_by_side(
        f"train step tiny (batch {BATCH}, seqlen {SEQLEN}) fp32 + AdamW",
        lambda: step(*ours, ids),
        {"hf_llama_sdpa": lambda: step(*hf, ids)},
    )
    tokens = BATCH * SEQLEN
    flops = train_flops_per_step(preset("tiny"), BATCH, SEQLEN, checkpointing=False)
    report(
        f"train tiny: ours {tokens / med['ours']:.0f} tokens/s, {tflops(flops, med['ours']):.3f} TFLOPS "
        f"(InternLM's formula, {flops / 1e9:.1f} GFLOP/step); HF LlamaForCausalLM sdpa "
        f"{tokens / med['hf_llama_sdpa']:.0f} tokens/s, {tflops(flops, med['hf_llama_sdpa']):.3f} TFLOPS"
    )
    ratio = ratios["hf_llama_sdpa"]
    assert ratio >= 1.5, f"training step only {ratio:.2f}x HF LlamaForCausalLM's tokens/s (bar 1.5x)"


def test_train_step_peak_rss(benchmark):
    args = (str(BATCH), str(SEQLEN), str(STEPS_FOR_MEMORY))
    ours = measure_in_subprocess(_MEMORY, "ours", *args)
    hf = measure_in_subprocess(_MEMORY, "hf", *args)
    report(
        f"train tiny peak RSS over {STEPS_FOR_MEMORY} steps: ours {ours['peak_mb']:.0f} MB "
        f"(+{ours['peak_mb'] - ours['before_mb']:.0f} MB over the imports), HF {hf['peak_mb']:.0f} MB "
        f"(+{hf['peak_mb'] - hf['before_mb']:.0f} MB); ours/HF {ours['peak_mb'] / hf['peak_mb']:.2f}"
    )
    benchmark.extra_info.update(ours_peak_mb=round(ours["peak_mb"]), hf_peak_mb=round(hf["peak_mb"]))
    benchmark.pedantic(lambda: None, rounds=1)
    assert ours["peak_mb"] <= hf["peak_mb"], f"peak RSS ours {ours['peak_mb']:.0f} MB > HF {hf['peak_mb']:.0f} MB"
