"""The training loop: one loop for CPU and GPU.

Per step: micro_num micro-batches (gradient accumulation), gradient clipping, a skipped update when
the loss or the gradient norm is not finite (counted as inf_nan_skip_batches, as InternLM does),
the warmup + cosine learning rate, metrics, periodic validation and checkpoints. How the weights
and the optimizer state are kept (plain fp32, fp32 masters of a bf16 model, ZeRO shards under
torchrun), and how they are checkpointed, is the optimizer's business: see optimizer_modes.py.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from internlm_fast.data import PackedBatch, PackedLoader, TokenDataset, Tokenizer, prepare_builtin_corpus
from internlm_fast.data.token_file import unigram_entropy
from internlm_fast.infer import generate_tokens
from internlm_fast.model import InternLMConfig, InternLMForCausalLM
from internlm_fast.model.pretrained import atomic_output_folder, load_pretrained, save_pretrained

from . import distributed as D
from .checkpoint import latest_valid_checkpoint, list_checkpoints
from .config import TrainConfig, config_to_dict
from .flops import train_flops_per_step
from .metrics import MetricsLogger, memory_mib
from .optimizer_modes import TrainOptimizer, build_train_optimizer
from .schedule import WarmupCosine


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class TrainResult:
    steps: int
    losses: list[float] = field(default_factory=list)  # training loss of each step this run
    val_loss: float | None = None
    unigram_entropy: float | None = None
    inf_nan_skip_batches: int = 0
    checkpoint: Path | None = None
    final: Path | None = None  # the trained model as a Hugging Face folder (with the tokenizer)
    sample: str | None = None


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but torch sees no CUDA GPU; use device='cpu' or 'auto'")
    return torch.device(name)


class Trainer:
    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        # data parallel when launched by torchrun (None otherwise): see distributed.py
        self.dist = D.init_distributed(cfg.device, cfg.dist.backend, cfg.dist.timeout_s)
        self.is_main = self.dist is None or self.dist.is_main
        self._say = _say if self.is_main else lambda msg: None
        self.device = self.dist.device if self.dist is not None else _device(cfg.device)
        self.run_dir, self.ckpt_dir = cfg.log_folder, cfg.checkpoint_folder
        self.model_config: InternLMConfig = cfg.model.build()
        self._rank0_first(self._prepare_data, "data preparation")
        torch.manual_seed(cfg.seed)
        if self.tokenizer is not None and self.tokenizer.vocab_size > self.model_config.vocab_size:
            raise ValueError(
                f"the tokenizer has {self.tokenizer.vocab_size} tokens but model.vocab_size is "
                f"{self.model_config.vocab_size}; set model.vocab_size >= {self.tokenizer.vocab_size}"
            )
        if self.train_data.vocab_size > self.model_config.vocab_size:
            raise ValueError(
                f"data.train was tokenized with vocab_size {self.train_data.vocab_size} but model.vocab_size is "
                f"{self.model_config.vocab_size}"
            )
        if cfg.model.init_from:  # weights in fp32 like a fresh model; bf16 runs cast below as usual
            self.model = load_pretrained(cfg.model.init_from, torch.float32, self.device, config=self.model_config)
            self._say(f"initialised from {cfg.model.init_from}")
        else:
            self.model = InternLMForCausalLM(self.model_config).to(self.device)
        self.model.config.gradient_checkpointing = cfg.model.checkpointing
        self._cast_model({"fp32": torch.float32, "bf16": torch.bfloat16}[cfg.model.dtype])
        self.optimizer: TrainOptimizer = build_train_optimizer(self.model, cfg, self.dist)
        self.schedule = WarmupCosine(
            cfg.optimizer.lr, cfg.data.total_steps, cfg.lr_scheduler.warmup_ratio, cfg.lr_scheduler.eta_min
        )
        d = cfg.data
        rank, world = (self.dist.rank, self.dist.world_size) if self.dist is not None else (0, 1)
        self.loader = PackedLoader(
            self.train_data, d.seq_len, d.micro_bsz, seed=cfg.seed, shuffle=d.shuffle, rank=rank, world_size=world
        )
        self.step = 0
        self.inf_nan_skip_batches = 0
        self.flops_per_step = train_flops_per_step(
            self.model_config, d.micro_bsz * d.micro_num, d.seq_len, cfg.model.checkpointing
        )

    # -- set-up ---------------------------------------------------------------------------------

    def _rank0_first(self, fn, what: str) -> None:
        """fn on rank 0, then on the other ranks (which then find rank 0's cached files)."""
        if self.dist is not None and not self.is_main:
            D.barrier(self.dist, what)
        fn()
        if self.dist is not None and self.is_main:
            D.barrier(self.dist, what)

    def _prepare_data(self) -> None:
        d = self.cfg.data
        self.tokenizer = None
        self.unigram_entropy = None
        if d.train == "builtin":
            corpus = prepare_builtin_corpus(vocab_size=self.model_config.vocab_size, progress=self.cfg.log.progress)
            train_prefix, val_prefix = corpus.train_prefix, corpus.val_prefix
            tokenizer_path = d.tokenizer or corpus.tokenizer_path
            self.unigram_entropy = corpus.unigram_entropy
        else:
            train_prefix, val_prefix, tokenizer_path = Path(d.train), d.val, d.tokenizer
        self.train_data = TokenDataset(train_prefix)
        self.val_data = TokenDataset(val_prefix) if val_prefix else None
        init_tokenizer = Path(self.cfg.model.init_from or "") / "tokenizer.model"
        if self.cfg.model.init_from and init_tokenizer.is_file():
            if d.train == "builtin" and not d.tokenizer and init_tokenizer.read_bytes() != tokenizer_path.read_bytes():
                raise ValueError(
                    f"model.init_from has its own tokenizer ({init_tokenizer}), not the built-in corpus' one; "
                    "tokenize your data with it and set data.train and data.tokenizer"
                )
            tokenizer_path = tokenizer_path or init_tokenizer
        if tokenizer_path:
            self.tokenizer = Tokenizer(tokenizer_path)
        if self.unigram_entropy is None:
            self.unigram_entropy = unigram_entropy(self.train_data)

    def _cast_model(self, dtype: torch.dtype) -> None:
        # rotary tables stay fp32: positions up to max_position_embeddings need more than bf16's 8 bits
        cos, sin = self.model.rotary_cos, self.model.rotary_sin
        self.model.to(dtype)
        self.model.rotary_cos, self.model.rotary_sin = cos, sin

    # -- one step ------------------------------------------------------------------------------

    def _batch_to_device(self, batch: PackedBatch) -> PackedBatch:
        if self.device.type == "cpu":
            return batch
        return PackedBatch(
            input_ids=batch.input_ids.to(self.device, non_blocking=True),
            labels=batch.labels.to(self.device, non_blocking=True),
            cu_seqlens=batch.cu_seqlens.to(self.device, non_blocking=True),
            max_seqlen=batch.max_seqlen,
            num_tokens=batch.num_tokens,
        )

    def train_step(self, batches: list[PackedBatch]) -> dict:
        """Forward/backward over the micro-batches, then clip and update (or skip). Returns metrics."""
        self.model.train()
        total_loss = 0.0
        for i, batch in enumerate(batches):
            self.optimizer.prepare_backward(last=i == len(batches) - 1)
            batch = self._batch_to_device(batch)
            out = self.model(batch.input_ids, labels=batch.labels, cu_seqlens=batch.cu_seqlens)
            (out.loss / len(batches)).backward()
            total_loss += out.loss.item() / len(batches)
        lr = self.schedule(self.step)
        metrics = self.optimizer.step(total_loss, lr, self.cfg.optimizer.clip_grad_norm)
        if metrics["skipped"]:
            self.inf_nan_skip_batches += 1
        self.optimizer.zero_grad()
        return {**metrics, "lr": lr}

    @torch.no_grad()
    def evaluate(self, max_batches: int | None = None) -> float | None:
        """Mean validation loss per target token: over the whole validation split, or over the first
        max_batches micro batches of it in a fixed shuffled order (a sample of every file, not the
        first file or two, which would bias the figure toward whatever those files hold)."""
        if self.val_data is None or len(self.val_data) == 0:
            return None
        self.model.eval()
        d = self.cfg.data
        loader = PackedLoader(self.val_data, d.seq_len, d.micro_bsz, seed=0, shuffle=True, loop=False)
        loss_sum, count = 0.0, 0
        for i, batch in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            batch = self._batch_to_device(batch)
            out = self.model(batch.input_ids, labels=batch.labels, cu_seqlens=batch.cu_seqlens)
            n = int(out.num_targets)
            loss_sum += out.loss.item() * n
            count += n
        self.model.train()
        return loss_sum / count if count else None

    # -- checkpoints ---------------------------------------------------------------------------

    def _trainer_state(self) -> dict:
        return {
            "loader": self.loader.state_dict(),
            "inf_nan_skip_batches": self.inf_nan_skip_batches,
            "config": config_to_dict(self.cfg),
            "model_config": self.model_config.to_dict(),
        }

    def save(self) -> Path:
        return self.optimizer.save(self.ckpt_dir, self.step, self._trainer_state(), self.cfg.ckpt.keep_last)

    def export(self) -> Path | None:
        """The model (in its training dtype) and tokenizer as a Hugging Face folder `final/` in the log
        folder, replaced atomically; written by rank 0 once the last all-gather has landed."""
        self.optimizer.wait_params()
        if not self.is_main:
            return None
        final = self.run_dir / "final"
        with atomic_output_folder(final, force=True) as tmp:
            save_pretrained(self.model, tmp, tokenizer=self.tokenizer, progress=False)
        return final

    def resume(self, where: str) -> Path | None:
        """Load a checkpoint: 'auto' = the newest intact one in ckpt.folder (None if there is none)."""
        if where == "auto":
            path, skipped = latest_valid_checkpoint(self.ckpt_dir)
            for msg in skipped:
                self._say(msg)
            if path is None:
                self._say(f"--ckpt.resume=auto: no checkpoint in {self.ckpt_dir}, starting from scratch")
                return None
        else:
            path = Path(where)
        ckpt = self.optimizer.load(path)
        self.loader.load_state_dict(ckpt.trainer_state["loader"])
        self.inf_nan_skip_batches = int(ckpt.trainer_state["inf_nan_skip_batches"])
        self.step = ckpt.step
        self._say(f"resumed from {ckpt.path} (step {self.step})")
        return ckpt.path

    # -- the loop ------------------------------------------------------------------------------

    def fit(self) -> TrainResult:
        cfg = self.cfg
        if not (cfg.ckpt.resume and self.resume(cfg.ckpt.resume)) and self.is_main:
            self._archive_previous_run()
        if self.dist is not None:  # rank 0 has moved an earlier run away before anyone writes logs
            D.barrier(self.dist, "start of training")
        total = cfg.data.total_steps
        result = TrainResult(steps=total, unigram_entropy=self.unigram_entropy)
        log_dir = self.run_dir if self.is_main else self.run_dir / "ranks" / f"rank{self.dist.rank}"
        logger = MetricsLogger(log_dir, tensorboard=cfg.log.tensorboard and self.is_main, resume_step=self.step)
        n_params = sum(p.numel() for p in self.model.parameters())
        self._say(
            f"training {n_params / 1e6:.1f}M parameters on {self.device} ({cfg.model.dtype}), "
            f"{len(self.train_data)} documents / {self.train_data.num_tokens / 1e6:.2f}M tokens, "
            f"unigram entropy {self.unigram_entropy:.3f} nats; logs in {self.run_dir}"
        )
        bar = _progress(total, self.step, enabled=cfg.log.progress and self.is_main)
        iterator = iter(self.loader)
        last_ckpt = None
        try:
            while self.step < total:
                t0 = time.perf_counter()
                batches = [next(iterator) for _ in range(cfg.data.micro_num)]
                t_data = time.perf_counter() - t0
                metrics = self.train_step(batches)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                step_s = time.perf_counter() - t0
                tokens = sum(b.input_ids.numel() for b in batches)
                mem, peak = memory_mib(self.device)
                metrics.update(
                    tgs=tokens / step_s,
                    tflops=self.flops_per_step / step_s / 1e12,
                    mem_mib=mem,
                    peak_mem_mib=peak,
                    step_s=step_s,
                    data_share=t_data / step_s,
                    inf_nan_skip_batches=self.inf_nan_skip_batches,
                )
                metrics["skipped"] = int(metrics["skipped"])
                self.step += 1
                result.losses.append(metrics["loss"])
                logger.log(self.step, metrics)
                bar.update(1)
                bar.set_postfix_str(f"loss {metrics['loss']:.3f} lr {metrics['lr']:.1e} tgs {metrics['tgs']:.0f}")
                if cfg.log.every and self.step % cfg.log.every == 0 and self.is_main:
                    bar.write(MetricsLogger.console_line(self.step, total, metrics))
                if cfg.log.eval_every and self.step % cfg.log.eval_every == 0 and self.step < total:
                    self._validate(logger, bar)
                if cfg.ckpt.checkpoint_every and self.step % cfg.ckpt.checkpoint_every == 0 and self.step < total:
                    last_ckpt = self.save()
            result.val_loss = self._validate(logger, bar, final=True)
            if cfg.ckpt.checkpoint_every >= 0:
                last_ckpt = self.save()
            result.final = self.export()
        finally:
            bar.close()
            logger.close()
        result.checkpoint = last_ckpt
        result.inf_nan_skip_batches = self.inf_nan_skip_batches
        if last_ckpt is not None:
            self._say(f"checkpoint: {last_ckpt}")
        if result.final is not None:
            self._say(f"model: {result.final} (Hugging Face folder; loads with InternLMForCausalLM.from_pretrained)")
        if result.val_loss is not None:
            ratio = result.val_loss / self.unigram_entropy
            self._say(
                f"final validation loss {result.val_loss:.4f} nats = {ratio:.1%} of the unigram entropy "
                f"({self.unigram_entropy:.3f} nats)"
            )
        if self.tokenizer is not None and cfg.generate.max_new_tokens > 0 and self.is_main:
            result.sample = self.sample(cfg.generate.prompt)
            self._say(f"sample (prompt {cfg.generate.prompt!r}):\n{cfg.generate.prompt}{result.sample}")
        return result

    def _archive_previous_run(self) -> None:
        """A fresh run never overwrites an earlier one: its folders are renamed with a timestamp."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for folder, marker in ((self.run_dir, "metrics.jsonl"), (self.ckpt_dir, None)):
            if folder.is_dir() and ((marker and (folder / marker).exists()) or list_checkpoints(folder)):
                target = folder.with_name(f"{folder.name}-{stamp}")
                folder.rename(target)
                self._say(f"{folder} held an earlier run; moved it to {target} (use --resume auto to continue a run)")

    def _validate(self, logger: MetricsLogger, bar, final: bool = False) -> float | None:
        val = self.evaluate(None if final else self.cfg.log.eval_batches)
        if val is not None:
            logger.log(self.step, {"split": "val", "loss": val, "full": final})
            if self.is_main:
                bar.write(
                    f"step {self.step}: validation loss {val:.4f}" + (" (whole validation split)" if final else "")
                )
        return val

    def sample(self, prompt: str) -> str:
        g = self.cfg.generate
        ids = self.tokenizer.encode(prompt, bos=True)
        new = generate_tokens(
            self.model, ids, g.max_new_tokens, g.temperature, g.top_p, self.tokenizer.stop_ids, seed=self.cfg.seed
        )
        return self.tokenizer.decode(new)


def _progress(total: int, initial: int, enabled: bool):
    from tqdm import tqdm

    # a bar only on a terminal: redirected to a file it is noise; the metrics lines carry the same
    return tqdm(
        total=total,
        initial=initial,
        desc="train",
        unit="step",
        disable=not (enabled and sys.stderr.isatty()),
        dynamic_ncols=True,
    )
