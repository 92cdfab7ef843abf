"""Decoding speed of the tiny preset against transformers' generate (2 threads, fp32, greedy).

Bars, side by side in one run:
- batch 1, a 128-token prompt, 128 new tokens: our generate >= 3x the tokens/s of transformers'
  LlamaForCausalLM(attention_bias=True).generate on the same weights, with identical tokens;
- a batch of 8 prompts of mixed lengths, 128 new tokens each: total tokens/s >= 4x our batch 1.
Times include the prefill, as a user waiting for the answer sees them.
"""

from __future__ import annotations

import torch
import transformers

from internlm_fast.infer import GenerationConfig, generate_ids
from internlm_fast.model import InternLMForCausalLM, preset
from internlm_fast.model.hf_config import transformers_config

from .conftest import report

PROMPT, NEW = 128, 128
MIXED = [128, 37, 90, 128, 64, 17, 110, 75]  # batch-8 prompt lengths


def _models() -> tuple[InternLMForCausalLM, transformers.LlamaForCausalLM]:
    cfg = preset("tiny")
    torch.manual_seed(0)
    ours = InternLMForCausalLM(cfg).eval()
    hf_cfg = transformers_config(cfg, attn_implementation="sdpa")
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    hf.load_state_dict(ours.state_dict(), strict=False)  # same names; HF has no rotary buffers to load
    hf.generation_config.eos_token_id = None  # all 128 tokens, as ours without an eos id
    return ours, hf


def _ids(lengths: list[int], seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, preset("tiny").vocab_size, (n,), generator=g) for n in lengths]


def test_decode_batch1_vs_transformers(side_by_side):
    ours, hf = _models()
    ids = _ids([PROMPT])[0][None]

    def run_ours():
        return ours.generate(ids, max_new_tokens=NEW)

    def run_hf():
        with torch.no_grad():
            return hf.generate(ids, max_new_tokens=NEW, do_sample=False, pad_token_id=0)

    assert torch.equal(run_ours(), run_hf()), "our greedy tokens differ from transformers'"
    ratios, med = side_by_side(f"generate tiny batch 1 ({PROMPT} + {NEW} tokens, greedy)", run_ours, {"hf": run_hf})
    report(f"decode batch 1: ours {NEW / med['ours']:.0f} tokens/s, transformers {NEW / med['hf']:.0f} tokens/s")
    assert ratios["hf"] >= 3.0, f"batch-1 decoding only {ratios['hf']:.2f}x transformers' tokens/s (bar 3x)"


def test_decode_batch8_vs_batch1(side_by_side):
    ours, _ = _models()
    prompts = [t.tolist() for t in _ids(MIXED, seed=1)]
    cfg = GenerationConfig(max_new_tokens=NEW)

    def batch8():
        gens = generate_ids(ours, prompts, cfg)
        assert all(len(g.ids) == NEW for g in gens)

    def batch1():
        generate_ids(ours, prompts[:1], cfg)

    ratios, med = side_by_side(f"generate tiny batch 8 (prompts {MIXED}, {NEW} new each)", batch8, {"batch1": batch1})
    speedup = len(MIXED) * ratios["batch1"]  # total tokens/s of batch 8 over tokens/s of batch 1
    report(
        f"decode batch 8: {len(MIXED) * NEW / med['ours']:.0f} tokens/s total, batch 1 {NEW / med['batch1']:.0f} "
        f"tokens/s: {speedup:.2f}x"
    )
    assert speedup >= 4.0, f"batch 8 gives only {speedup:.2f}x the tokens/s of batch 1 (bar 4x)"
