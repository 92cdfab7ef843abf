"""What int8 weight-only quantization costs in quality: perplexity of the default training run's model
(`python -m internlm_fast.train`, its runs/<job>/final folder) on the built-in corpus' held-out
validation split, with quantize="int8" against the same model in fp32, both through the same forward
(logits, then cross-entropy per target token; a document's last token predicts nothing).

Bar, asserted: int8 perplexity within 1% of fp32's. The model is the user's own run (about 4 minutes on
2 cores); without one the bench is skipped with that command in the reason.

    python bench/bench_quantize.py
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from internlm_fast.chat import default_model_dir, load_model
from internlm_fast.data import prepare_builtin_corpus
from internlm_fast.data.packed_loader import PackedLoader
from internlm_fast.data.token_file import TokenDataset

if __package__:
    from .conftest import THREADS, report
else:  # run as a script: bench/ is sys.path[0]
    from conftest import THREADS, report

PERPLEXITY_BAR = 0.01  # int8 over fp32, relative
SEQ_LEN = 512
MAX_ROWS = 64  # 32k validation tokens: the first rows of the split, in order


def perplexity(model, data: TokenDataset, max_rows: int = MAX_ROWS) -> tuple[float, int]:
    """exp(mean cross-entropy per target token) over the first max_rows packed rows; (ppl, tokens)."""
    loss_sum, count = 0.0, 0
    loader = PackedLoader(data, SEQ_LEN, 1, seed=0, shuffle=False, loop=False)
    with torch.inference_mode():
        for i, batch in enumerate(loader):
            if i >= max_rows:
                break
            logits = model(batch.input_ids, cu_seqlens=batch.cu_seqlens).logits[0, :-1].float()
            target = batch.labels[0, 1:].clone()
            ends = batch.cu_seqlens[1:-1].long() - 1  # a document's last token predicts nothing
            target[ends[(ends >= 0) & (ends < target.numel())]] = -100
            loss_sum += float(F.cross_entropy(logits, target, ignore_index=-100, reduction="sum"))
            count += int((target != -100).sum())
    return math.exp(loss_sum / count), count


def measure() -> dict:
    folder = default_model_dir()
    if folder is None:
        pytest.skip("no default training run to measure: run `python -m internlm_fast.train` first")
    torch.set_num_threads(THREADS)
    fp32, _ = load_model(folder, torch.float32)
    data = TokenDataset(prepare_builtin_corpus(vocab_size=fp32.config.vocab_size, progress=False).val_prefix)
    base, tokens = perplexity(fp32, data)
    int8, _ = load_model(folder, torch.float32, quantize="int8")
    quant, _ = perplexity(int8, data)
    return {"folder": str(folder), "fp32": base, "int8": quant, "tokens": tokens}


def report_measure(m: dict) -> float:
    rel = m["int8"] / m["fp32"] - 1
    verdict = "PASS" if abs(rel) <= PERPLEXITY_BAR else "FAIL"
    report(
        f"int8 weight-only quantization, {m['folder']} on the built-in validation split ({m['tokens']} tokens): "
        f"perplexity fp32 {m['fp32']:.4f}, int8 {m['int8']:.4f}: {rel:+.3%} "
        f"(bar within {PERPLEXITY_BAR:.0%}: {verdict})"
    )
    return rel


def test_int8_perplexity(benchmark):
    m = benchmark.pedantic(measure, rounds=1, iterations=1)
    rel = report_measure(m)
    benchmark.extra_info.update(perplexity_fp32=m["fp32"], perplexity_int8=m["int8"])
    assert abs(rel) <= PERPLEXITY_BAR, f"int8 perplexity {rel:+.3%} of fp32's (bar within {PERPLEXITY_BAR:.0%})"


if __name__ == "__main__":
    report_measure(measure())
