"""The GPU suite's measurements, printed as one table (bash bench/gpu_suite.sh builds, tests, then runs this).

    python bench/gpu_suite.py                  # on a machine with an NVIDIA GPU, the package built with CUDA
    python bench/gpu_suite.py --smoke          # tiny shapes on the CPU backend: checks that this script runs
    python bench/gpu_suite.py --sections attention,decode

Sections (one or more rows each):
  memory       the device's copy bandwidth: tensor.copy_ of a 1 GiB buffer, 2 x bytes / time (the HBM peak
               the elementwise kernels are held against)
  elementwise  each memory-bound kernel on each GPU backend (cuda, triton), called directly (the ops
               layer's checks and host reads are not the kernel's speed): bytes read + written / time,
               as a share of the copy bandwidth; bar >= 85%
  attention    ops.flash_attn_func (causal, bf16, batch 4 x seqlen 4096, 32 heads of 128) forward and
               forward + backward against torch's SDPA with the flash backend forced; bar forward >= 0.8x.
               FLOPs: 4 b h s^2 d, halved for causal; the backward counts 2.5 forwards
  train        the trainer's own step (internlm_fast.train.trainer.Trainer.train_step: bf16 model, fp32
               master weights, fused AdamW, gradient clipping) on the 1b preset: tokens/s and MFU, with
               InternLM's FLOPs formula (train/flops.py) over the GPU's dense bf16 peak
  decode       model.generate (greedy, 128-token prompts, 128 new tokens, batch 1 and 8, bf16) against
               transformers' LlamaForCausalLM(attention_bias=True).generate on the same weights

Times are medians of CUDA-event timings (wall clock around a synchronize for whole training steps and
generations). A measurement that raises prints ERROR and the exception in its row and the rest go on;
the exit status is 1 when any row errored. A backend without a kernel for an op gets a SKIP row.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from internlm_fast.ops import backend, flash_attn_func, use_backend

SECTIONS = ("memory", "elementwise", "attention", "train", "decode")
ELEMENTWISE_BAR = 0.85  # of the copy bandwidth
ATTENTION_FWD_BAR = 0.8  # of torch's flash SDPA TFLOP/s
# None: the row reports (INFO) without a bar
ATTENTION_FWD_BWD_BAR: float | None = None  # of torch's flash SDPA TFLOP/s
TRAIN_MFU_BAR: float | None = None
DECODE_BAR: float | None = None  # of transformers' tokens/s


class Skip(Exception):
    """The measurement does not apply here (a backend without the kernel); not an error."""


@dataclass
class Row:
    section: str
    what: str
    backend: str
    measured: str = ""
    reference: str = ""
    ratio: str = ""
    bar: str = "-"
    status: str = "INFO"  # PASS, FAIL, INFO (no bar), SKIP or ERROR
    note: str = ""


@dataclass
class Setup:
    smoke: bool
    device: torch.device
    backends: tuple[str, ...]
    warmup: int
    iters: int

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def judge(row: Row, value: float, bar: float | None, percent: bool = False) -> None:
    """PASS or FAIL against bar (value >= bar); INFO where there is no bar."""
    if bar is None:
        return
    row.bar = f">= {bar:.0%}" if percent else f">= {bar:.2g}x"
    row.status = "PASS" if value >= bar else "FAIL"


def median_seconds(s: Setup, fn: Callable[[], object], iters: int | None = None, warmup: int | None = None) -> float:
    """Median time of one call of fn. On the GPU each call sits between two CUDA events, all queued
    back to back and read after one synchronize, so host overhead hides behind the device's work."""
    iters = iters or s.iters
    for _ in range(s.warmup if warmup is None else warmup):
        fn()
    s.sync()
    if s.device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(s.device)
        times = [start.elapsed_time(end) / 1e3 for start, end in events]
    else:
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def num(x: float) -> str:
    """Three significant digits, thousands separated: 4,312 / 87.5 / 0.0123."""
    if x >= 100:
        return f"{x:,.0f}"
    return f"{x:.3g}"


def count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def wall_seconds(s: Setup, fn: Callable[[], object]) -> float:
    s.sync()
    t0 = time.perf_counter()
    fn()
    s.sync()
    return time.perf_counter() - t0


def free_memory(s: Setup) -> None:
    gc.collect()
    if s.device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------
# memory


def copy_bandwidth(s: Setup) -> float:
    """Bytes per second of a device copy, counting the bytes read and the bytes written."""
    nbytes = (16 << 20) if s.smoke else (1 << 30)
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=s.device)
    dst = torch.empty_like(src)
    t = median_seconds(s, lambda: dst.copy_(src), iters=s.iters * 2)
    return 2 * nbytes / t


def memory_row(s: Setup, row: Row, peak: dict) -> None:
    peak["bytes_per_s"] = copy_bandwidth(s)
    row.measured = f"{num(peak['bytes_per_s'] / 1e9)} GB/s"
    row.note = "the reference of the elementwise rows"


# ---------------------------------------------------------------------------------------------
# elementwise kernels: (kernel the backend must have, bytes moved, the call)

Case = tuple[str, int, Callable[[object], object]]


def _randn(s: Setup, *shape: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    return torch.randn(*shape, device=s.device, dtype=dtype)


def _rms_norm(s: Setup, residual: bool) -> Case:
    t, h = (256, 512) if s.smoke else (32768, 4096)
    x, w = _randn(s, t, h), 1 + 0.1 * _randn(s, h)
    r = _randn(s, t, h) if residual else None
    tensors = 4 if residual else 2  # x (+ residual) in, y (+ the sum) out
    nbytes = tensors * t * h * 2 + h * 2 + t * 4  # + weight + fp32 rstd
    return "rms_norm_fwd", nbytes, lambda k: k.rms_norm_fwd(x, w, r, 1e-6)


def _rotary(s: Setup) -> Case:
    b, n, heads, d = (2, 64, 4, 32) if s.smoke else (8, 4096, 32, 128)
    x = _randn(s, b, n, heads, d)
    angles = torch.rand(n, d // 2, device=s.device) * 6.28
    cos, sin = angles.cos(), angles.sin()  # fp32 tables, as the model keeps them
    offsets = torch.zeros(b, dtype=torch.int64, device=s.device)
    nbytes = 2 * x.numel() * 2 + 2 * cos.numel() * 4
    return "rotary_fwd", nbytes, lambda k: k.rotary_fwd(x, cos, sin, offsets, None, False, False, None)


def _swiglu_shape(s: Setup) -> tuple[int, int]:
    return (256, 512) if s.smoke else (16384, 11008)


def _swiglu_fwd(s: Setup) -> Case:
    t, f = _swiglu_shape(s)
    gate, up = _randn(s, t, f), _randn(s, t, f)
    return "swiglu_fwd", 3 * t * f * 2, lambda k: k.swiglu_fwd(gate, up)


def _swiglu_bwd(s: Setup) -> Case:
    t, f = _swiglu_shape(s)
    dout, gate, up = _randn(s, t, f), _randn(s, t, f), _randn(s, t, f)
    return "swiglu_bwd", 5 * t * f * 2, lambda k: k.swiglu_bwd(dout, gate, up, False)


def _cross_entropy(s: Setup) -> Case:
    t, v = (64, 1000) if s.smoke else (16384, 103168)
    logits = _randn(s, t, v)
    labels = torch.randint(0, v, (t,), device=s.device)
    nbytes = t * v * 2 + t * 8 + t * 4  # logits and labels in, fp32 lse out
    return "cross_entropy_fwd", nbytes, lambda k: k.cross_entropy_fwd(logits, labels, -100, "mean")


def _flatten_scale(s: Setup) -> Case:
    # one InternLM-7B layer's gradients into a bf16 bucket, scaled by 1 / world as the optimizer does
    h, i = (128, 344) if s.smoke else (4096, 11008)
    shapes = [(h, h)] * 4 + [(h,)] * 4 + [(i, h), (i, h), (h, i), (h,), (h,)]
    tensors = [_randn(s, *shape) for shape in shapes]
    total = sum(t.numel() for t in tensors)
    out = torch.empty(total, dtype=torch.bfloat16, device=s.device)
    return "flatten_scale_fwd", 2 * total * 2, lambda k: k.flatten_scale_fwd(tensors, out, 0.125)


ELEMENTWISE: list[tuple[str, Callable[[Setup], Case]]] = [
    ("rms_norm fwd", lambda s: _rms_norm(s, residual=False)),
    ("rms_norm + residual fwd", lambda s: _rms_norm(s, residual=True)),
    ("rotary fwd", _rotary),
    ("swiglu fwd", _swiglu_fwd),
    ("swiglu bwd", _swiglu_bwd),
    ("cross_entropy fwd", _cross_entropy),
    ("flatten_scale", _flatten_scale),
]


def elementwise_row(s: Setup, row: Row, make: Callable[[Setup], Case], name: str, peak: dict) -> None:
    module = backend.kernels(name)  # raises when the backend is not built: an error, not a skip
    kernel, nbytes, call = make(s)
    if not hasattr(module, kernel):
        raise Skip(f"backend {name!r} has no {kernel} kernel")
    t = median_seconds(s, lambda: call(module))
    rate = nbytes / t
    row.measured = f"{num(rate / 1e9)} GB/s"
    row.note = f"{num(t * 1e6)} us, {num(nbytes / 1e6)} MB"
    if "bytes_per_s" not in peak:
        raise RuntimeError("no copy bandwidth to compare with: the memory section did not run or failed")
    share = rate / peak["bytes_per_s"]
    row.reference = f"{num(peak['bytes_per_s'] / 1e9)} GB/s copy"
    row.ratio = f"{share:.0%}"
    judge(row, share, ELEMENTWISE_BAR, percent=True)


# ---------------------------------------------------------------------------------------------
# attention


def _sdpa_flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """torch's SDPA with the flash backend forced, on (b, s, h, d) tensors (transposed views: the
    flash kernel reads that layout as it is)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        out = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
    return out.transpose(1, 2)


class Attention:
    """Inputs and the SDPA reference timings, made once and shared by every backend's rows."""

    def __init__(self, s: Setup) -> None:
        self.s = s
        self.shape = (1, 128, 4, 32) if s.smoke else (4, 4096, 32, 128)
        b, n, h, d = self.shape
        self.fwd_flops = 4 * b * h * n * n * d * 0.5
        self.q, self.k, self.v = (_randn(s, *self.shape) for _ in range(3))
        self.dout = _randn(s, *self.shape)
        self.leaves = [t.detach().clone().requires_grad_() for t in (self.q, self.k, self.v)]
        self._ref: dict[str, float | BaseException] = {}

    def describe(self) -> str:
        b, n, h, d = self.shape
        return f"b{b} s{n} h{h} d{d} causal bf16"

    def fwd_bwd(self, attend: Callable) -> None:
        out = attend(*self.leaves)
        torch.autograd.grad(out, self.leaves, self.dout)

    def reference(self, which: str) -> float:
        """Seconds of SDPA's forward ("fwd") or forward + backward ("fwd_bwd"), measured once."""
        if which not in self._ref:
            try:
                with torch.no_grad():
                    fwd = median_seconds(self.s, lambda: _sdpa_flash(self.q, self.k, self.v))
                self._ref["fwd"] = fwd
                self._ref["fwd_bwd"] = median_seconds(self.s, lambda: self.fwd_bwd(_sdpa_flash))
            except Exception as err:  # every row that needs it reports it
                self._ref.setdefault("fwd", err)
                self._ref.setdefault("fwd_bwd", err)
        got = self._ref[which]
        if isinstance(got, BaseException):
            raise RuntimeError(f"torch SDPA (flash) reference failed: {type(got).__name__}: {got}")
        return got


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return flash_attn_func(q, k, v, causal=True)


def attention_row(s: Setup, row: Row, att: Attention, name: str, with_backward: bool) -> None:
    module = backend.kernels(name)
    missing = [k for k in ("flash_attn_fwd", "flash_attn_bwd") if not hasattr(module, k)]
    if missing:
        raise Skip(f"backend {name!r} has no {', '.join(missing)} kernel")
    flops = att.fwd_flops * (3.5 if with_backward else 1.0)
    with use_backend(name):
        if with_backward:
            t = median_seconds(s, lambda: att.fwd_bwd(_attend))
        else:
            with torch.no_grad():
                out = _attend(att.q, att.k, att.v)
                err = (out.float() - _sdpa_flash(att.q, att.k, att.v).float()).abs().max().item()
                t = median_seconds(s, lambda: _attend(att.q, att.k, att.v))
    ref = att.reference("fwd_bwd" if with_backward else "fwd")
    ratio = ref / t
    row.measured = f"{num(flops / t / 1e12)} TFLOP/s"
    row.reference = f"{num(flops / ref / 1e12)} TFLOP/s sdpa flash"
    row.ratio = f"{ratio:.2f}x"
    row.note = f"{num(t * 1e3)} ms vs {num(ref * 1e3)} ms"
    if with_backward:
        judge(row, ratio, ATTENTION_FWD_BWD_BAR)
        return
    judge(row, ratio, ATTENTION_FWD_BAR)
    # a fast kernel with a wrong answer must not pass: bf16 outputs of unit-variance inputs agree to ~1e-2
    if not err <= 0.1:
        row.status, row.note = "FAIL", f"output differs from sdpa by {err:.3g}; " + row.note
    else:
        row.note += f", max |diff| vs sdpa {err:.1e}"


# ---------------------------------------------------------------------------------------------
# training


def peak_bf16_tflops(device_name: str) -> float | None:
    """Dense bf16 tensor-core peak by the vendor's datasheet, from the device's name."""
    name = device_name.upper()
    if "H100" in name and "PCIE" in name:
        return 756.0
    if "H100" in name or "H200" in name or "H800" in name:
        return 989.0
    if "A100" in name or "A800" in name:
        return 312.0
    return None


def _device_name(s: Setup) -> str:
    if s.device.type == "cuda":
        return torch.cuda.get_device_name(s.device)
    return platform.processor() or platform.machine()


def train_row(s: Setup, row: Row, workdir: Path) -> None:
    from internlm_fast.data import TokenFileWriter
    from internlm_fast.train.config import load_config
    from internlm_fast.train.trainer import Trainer

    if s.smoke:
        preset, seq_len, micro_bsz, micro_num, warmup, steps = "nano", 64, 2, 2, 1, 2
    else:
        preset, seq_len, micro_bsz, micro_num, warmup, steps = "1b", 4096, 4, 2, 2, 5
    from internlm_fast.model import preset as make_preset

    vocab = make_preset(preset).vocab_size
    # one document per row, each exactly seq_len tokens: every segment as long as the bench says
    prefix = workdir / "tokens"
    rng = np.random.default_rng(0)
    with TokenFileWriter(prefix, vocab) as writer:
        for _ in range(2 * micro_bsz * micro_num):
            writer.add(rng.integers(0, vocab, size=seq_len, dtype=np.int64))
    overrides = {
        "device": s.device.type,
        "model.preset": preset,
        "model.dtype": "bf16",
        "data.train": str(prefix),
        "data.seq_len": seq_len,
        "data.micro_bsz": micro_bsz,
        "data.micro_num": micro_num,
        "data.total_steps": 1000,
        "log.folder": str(workdir / "run"),
        "log.tensorboard": "false",
        "log.progress": "false",
    }
    trainer = Trainer(load_config(None, [f"{k}={v}" for k, v in overrides.items()]))
    params = sum(p.numel() for p in trainer.model.parameters())
    batches_iter = iter(trainer.loader)
    times, losses = [], []
    for i in range(warmup + steps):
        batches = [next(batches_iter) for _ in range(micro_num)]
        metrics: dict = {}
        t = wall_seconds(s, lambda batches=batches, metrics=metrics: metrics.update(trainer.train_step(batches)))
        if i >= warmup:
            times.append(t)
            losses.append(metrics["loss"])
    step_s = statistics.median(times)
    tokens = micro_bsz * micro_num * seq_len
    achieved = trainer.flops_per_step / step_s / 1e12
    skipped = trainer.inf_nan_skip_batches
    row.what = (
        f"train step, {preset} preset ({count(params)} params), bf16 + fp32 master AdamW, "
        f"{micro_num} x {micro_bsz} x {seq_len} tokens"
    )
    row.measured = f"{num(tokens / step_s)} tokens/s, {num(achieved)} TFLOP/s"
    peak = peak_bf16_tflops(_device_name(s)) if s.device.type == "cuda" else None
    if peak is None:
        row.reference, row.ratio = "bf16 peak n/a", "MFU n/a"
    else:
        row.reference, row.ratio = f"{peak:,.0f} TFLOP/s bf16 peak", f"MFU {achieved / peak:.1%}"
        judge(row, achieved / peak, TRAIN_MFU_BAR, percent=True)
    row.note = f"{num(step_s * 1e3)} ms/step, loss {losses[-1]:.2f}"
    if skipped:  # a skipped update is a cheaper step: the figure would flatter
        row.status = "FAIL"
        row.note += f", {skipped} non-finite steps skipped"


# ---------------------------------------------------------------------------------------------
# decoding


class Decode:
    """Our model and transformers' LlamaForCausalLM with the same weights, built once."""

    def __init__(self, s: Setup) -> None:
        import transformers

        from internlm_fast.model import InternLMForCausalLM, preset
        from internlm_fast.model.hf_config import transformers_config

        self.s = s
        self.preset = "nano" if s.smoke else "1b"
        self.dtype = torch.float32 if s.smoke else torch.bfloat16
        self.prompt, self.new = (16, 8) if s.smoke else (128, 128)
        self.batches = (1, 2) if s.smoke else (1, 8)
        self.reps = 1 if s.smoke else 3
        cfg = preset(self.preset)
        torch.manual_seed(0)
        with torch.device(s.device):
            ours = InternLMForCausalLM(cfg)
            hf = transformers.LlamaForCausalLM(transformers_config(cfg, attn_implementation="sdpa"))
        missing, unexpected = hf.load_state_dict(ours.state_dict(), strict=False)
        missing = [k for k in missing if "rotary" not in k]  # buffers transformers computes itself
        if missing or unexpected:
            raise RuntimeError(f"state dicts differ: missing {missing}, unexpected {unexpected}")
        self.ours = ours.to(self.dtype).eval()
        # the parameters only: transformers' rotary inv_freq buffer stays fp32, as from_pretrained leaves it
        for p in hf.parameters():
            p.data = p.data.to(self.dtype)
        hf.generation_config.eos_token_id = None  # all new tokens, as ours without an eos id
        self.hf = hf.eval()
        self.vocab = cfg.vocab_size

    def describe(self, batch: int) -> str:
        dtype = str(self.dtype).removeprefix("torch.")
        return f"decode, {self.preset} preset, batch {batch} ({self.prompt} + {self.new} tokens, greedy, {dtype})"


def decode_row(s: Setup, row: Row, dec: Decode, batch: int) -> None:
    g = torch.Generator().manual_seed(batch)
    ids = torch.randint(3, dec.vocab, (batch, dec.prompt), generator=g).to(s.device)
    mask = torch.ones_like(ids)
    result: dict[str, torch.Tensor] = {}

    def ours() -> None:
        result["ours"] = dec.ours.generate(ids, max_new_tokens=dec.new)

    def hf() -> None:
        with torch.no_grad():
            result["hf"] = dec.hf.generate(
                ids, attention_mask=mask, max_new_tokens=dec.new, do_sample=False, pad_token_id=0
            )

    ours()  # warm-up: builds the decode weights, compiles nothing that a later call would
    hf()
    times: dict[str, list[float]] = {"ours": [], "hf": []}
    for _ in range(dec.reps):  # interleaved, so drift in the machine's speed hits both alike
        times["ours"].append(wall_seconds(s, ours))
        times["hf"].append(wall_seconds(s, hf))
    t_ours, t_hf = statistics.median(times["ours"]), statistics.median(times["hf"])
    tokens = batch * dec.new
    row.measured = f"{num(tokens / t_ours)} tokens/s"
    row.reference = f"{num(tokens / t_hf)} tokens/s transformers"
    row.ratio = f"{t_hf / t_ours:.2f}x"
    judge(row, t_hf / t_ours, DECODE_BAR)
    a, b = result["ours"][:, dec.prompt :].cpu(), result["hf"][:, dec.prompt :].cpu()
    same = (a == b).float().mean().item() if a.shape == b.shape else 0.0
    row.note = f"{num(t_ours)} s vs {num(t_hf)} s, same tokens {same:.0%}"


# ---------------------------------------------------------------------------------------------
# the table


def _header(s: Setup) -> list[str]:
    lines = [f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda})"]
    try:
        import triton

        lines[0] += f", triton {triton.__version__}"
    except ImportError:
        lines[0] += ", triton not installed"
    if "transformers" in sys.modules:  # imported by the decode section
        lines[0] += f", transformers {sys.modules['transformers'].__version__}"
    if s.device.type == "cuda":
        p = torch.cuda.get_device_properties(s.device)
        lines.append(
            f"device: {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB"
        )
    else:
        lines.append(f"device: CPU ({_device_name(s)}), {torch.get_num_threads()} threads (smoke run)")
    try:
        from internlm_fast import _C

        lines.append(f"internlm_fast._C: with_cuda={bool(_C.with_cuda)}")
    except ImportError as err:
        lines.append(f"internlm_fast._C: not built ({err})")
    resolution = getattr(backend, "resolution", None)
    if resolution is not None:  # which backend "auto" gives each op: the model rows run on these
        chosen = resolution(s.device.type)
        lines.append("auto backends: " + ", ".join(f"{op}={b.split(':')[0]}" for op, b in chosen.items()))
    return lines


COLUMNS = ("section", "what", "backend", "measured", "reference", "ratio", "bar", "status", "note")
MAX_CELL = 110


def format_table(rows: list[Row]) -> str:
    cells = [list(COLUMNS)] + [[str(getattr(r, c)) for c in COLUMNS] for r in rows]
    cells = [[c if len(c) <= MAX_CELL else c[: MAX_CELL - 3] + "..." for c in line] for line in cells]
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    out = []
    for n, line in enumerate(cells):
        out.append(" | ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip())
        if n == 0:
            out.append("-+-".join("-" * w for w in widths))
    return "\n".join(out)


class Runner:
    def __init__(self, s: Setup) -> None:
        self.s = s
        self.rows: list[Row] = []
        self.errors: list[tuple[Row, str]] = []

    def run(self, section: str, what: str, backend_name: str, measure: Callable[[Row], None]) -> Row:
        row = Row(section, what, backend_name)
        t0 = time.perf_counter()
        try:
            measure(row)
        except Skip as why:
            row.status, row.note = "SKIP", str(why)
        except Exception as err:
            row.status = "ERROR"
            row.measured = f"{type(err).__name__}: {err}".replace("\n", " ")
            self.errors.append((row, traceback.format_exc()))
            traceback.print_exc(file=sys.stderr)
        finally:
            free_memory(self.s)
        self.rows.append(row)
        print(
            f"[gpu_suite] {time.perf_counter() - t0:6.1f} s  {row.section} | {row.what} | {row.backend} | "
            f"{row.status} | {row.measured} | {row.ratio}",
            file=sys.stderr,
            flush=True,
        )
        return row


def run_suite(s: Setup, sections: tuple[str, ...]) -> int:
    r = Runner(s)
    peak: dict = {}
    if "memory" in sections or "elementwise" in sections:
        what = f"device copy (tensor.copy_, {'16 MiB' if s.smoke else '1 GiB'}), read + written"
        r.run("memory", what, "torch", lambda row: memory_row(s, row, peak))
    if "elementwise" in sections:
        for name in s.backends:
            for what, make in ELEMENTWISE:
                r.run(
                    "elementwise",
                    what,
                    name,
                    lambda row, make=make, name=name: elementwise_row(s, row, make, name, peak),
                )
    if "attention" in sections:
        holder: dict = {}

        def attention(row: Row, name: str, with_backward: bool) -> None:
            if "att" not in holder:
                holder["att"] = Attention(s)
            att = holder["att"]
            row.what = f"attention {'fwd+bwd' if with_backward else 'fwd'} ({att.describe()})"
            attention_row(s, row, att, name, with_backward)

        for name in s.backends:
            for with_backward in (False, True):
                what = f"attention {'fwd+bwd' if with_backward else 'fwd'}"
                r.run("attention", what, name, lambda row, n=name, wb=with_backward: attention(row, n, wb))
        holder.clear()
        free_memory(s)
    if "train" in sections:
        with tempfile.TemporaryDirectory(prefix="ifast-gpu-suite-") as tmp:
            r.run("train", "train step", "auto", lambda row: train_row(s, row, Path(tmp)))
    if "decode" in sections:
        holder = {}

        def decode(row: Row, batch: int) -> None:
            if "dec" not in holder:
                holder["dec"] = Decode(s)
            dec = holder["dec"]
            row.what = dec.describe(batch)
            decode_row(s, row, dec, batch)

        for batch in (1, 2) if s.smoke else (1, 8):
            r.run("decode", f"decode batch {batch}", "auto", lambda row, b=batch: decode(row, b))
        holder.clear()
        free_memory(s)

    print("\n".join(_header(s)))
    print(format_table(r.rows))
    if r.errors:
        print(f"\n{len(r.errors)} measurement(s) raised:")
        for row, tb in r.errors:
            print(f"--- {row.section} | {row.what} | {row.backend}\n{tb}")
    counts = {k: sum(row.status == k for row in r.rows) for k in ("PASS", "FAIL", "INFO", "SKIP", "ERROR")}
    print(", ".join(f"{n} {k.lower()}" for k, n in counts.items()))
    return 1 if r.errors else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU backend (no GPU needed)")
    parser.add_argument(
        "--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}"
    )
    args = parser.parse_args(argv)
    sections = tuple(x.strip() for x in args.sections.split(",") if x.strip())
    unknown = [x for x in sections if x not in SECTIONS]
    if unknown:
        parser.error(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    if args.smoke:
        # the triton kernels join under Triton's interpreter (set before triton is imported)
        interpreted = os.environ.get("TRITON_INTERPRET") == "1" and backend.available("triton")
        backends = ("cpu", "triton") if interpreted else ("cpu",)
        s = Setup(smoke=True, device=torch.device("cpu"), backends=backends, warmup=1, iters=3)
    else:
        if not torch.cuda.is_available():
            print(
                f"gpu_suite: torch {torch.__version__} sees no CUDA GPU; run with --smoke for the CPU check",
                file=sys.stderr,
            )
            return 2
        s = Setup(smoke=False, device=torch.device("cuda"), backends=("cuda", "triton"), warmup=3, iters=20)
    torch.manual_seed(0)
    start = time.perf_counter()
    status = run_suite(s, sections)
    print(f"gpu_suite.py: {time.perf_counter() - start:.0f} s")
    return status


if __name__ == "__main__":
    sys.exit(main())
