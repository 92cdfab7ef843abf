"""The tiny trainer run the trainer tests share: --key=value overrides for a 2-layer, 64-wide model
on 64-token rows of a make_corpus corpus, quiet (no bar, no TensorBoard, no sample)."""

from __future__ import annotations

from pathlib import Path

TINY_RUN = {
    "data.seq_len": 64,
    "data.micro_bsz": 2,
    "data.total_steps": 8,
    "model.vocab_size": 512,
    "model.hidden_size": 64,
    "model.intermediate_size": 96,
    "model.num_hidden_layers": 2,
    "model.num_attention_heads": 4,
    "model.max_position_embeddings": 128,
    "optimizer.lr": 1e-2,
    "lr_scheduler.warmup_ratio": 0.25,
    "log.eval_every": 0,
    "log.eval_batches": 2,
    "log.progress": False,
    "log.tensorboard": False,
    "ckpt.keep_last": 10,
    "generate.max_new_tokens": 0,
    "threads": 2,
}


def run_overrides(corpus: dict[str, Path], run_dir: Path, **extra) -> list[str]:
    """["key=value", ...] of the tiny run on `corpus` writing into run_dir; `extra` adds or replaces keys."""
    values = {
        "data.train": corpus["train"],
        "data.val": corpus["val"],
        "data.tokenizer": corpus["tokenizer"],
        **TINY_RUN,
        "log.folder": run_dir,
        **extra,
    }
    return [f"{k}={v}" for k, v in values.items()]
