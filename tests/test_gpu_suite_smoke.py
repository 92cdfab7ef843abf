"""bench/gpu_suite.py runs where CI runs: its --smoke mode (tiny shapes, the CPU backend) prints the
table with every section, so the GPU suite cannot rot between the rare runs on a GPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

import internlm_fast
from internlm_fast.model import InternLMForCausalLM, preset

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("memory", "elementwise", "attention", "train", "decode")


def test_smoke_run_prints_every_section():
    env = dict(os.environ)
    # the package under test, whether installed or run from python/ with PYTHONPATH
    src = str(Path(internlm_fast.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    # conftest turns the interpreter on for this process; the smoke run would then add the triton
    # backend, minutes of interpreted kernels
    env.pop("TRITON_INTERPRET", None)
    env.pop("INTERNLM_FAST_BACKEND", None)
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_suite.py"), "--smoke"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=900,
    )
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    lines = out.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("section"))
    assert all(c in lines[header] for c in ("what", "backend", "measured", "reference", "ratio", "bar", "status"))
    rows = [[cell.strip() for cell in line.split("|")] for line in lines[header + 2 :] if "|" in line]
    by_section = {s: [r for r in rows if r[0] == s] for s in SECTIONS}
    for section, found in by_section.items():
        assert found, f"no {section} row in:\n{out.stdout}"
    statuses = {r[7] for r in rows}
    assert statuses <= {"PASS", "FAIL", "INFO", "SKIP"}, out.stdout
    assert len(by_section["elementwise"]) == 7  # every op, on the one smoke backend
    assert {r[2] for r in by_section["attention"]} == {"cpu"}
    assert len(by_section["decode"]) == 2  # two batch sizes
    assert "device: CPU" in out.stdout and "torch " in out.stdout


def test_1b_preset_has_about_a_billion_parameters():
    with torch.device("meta"):
        model = InternLMForCausalLM(preset("1b"))
    n = sum(p.numel() for p in model.parameters())
    assert 1.0e9 <= n <= 1.25e9, n
    assert model.config.head_dim == 128 and model.config.max_position_embeddings >= 4096
