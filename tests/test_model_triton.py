"""The whole model through the triton backend: forward, backward and optimizer steps of a tiny model,
and greedy KV-cache generation, against the cpu backend. Without a GPU this runs every Triton kernel in
Triton's interpreter (conftest turns it on), so the GPU path is exercised end to end in CI; with a GPU
the same test runs compiled on CUDA tensors."""

from __future__ import annotations

import pytest
import torch

from internlm_fast.model import InternLMConfig, InternLMForCausalLM
from internlm_fast.ops import available, use_backend
from internlm_fast.ops.inference import InferenceKernels

from .conftest import ATOL, assert_matches_oracle
from .generate_helpers import small_model
from .model_helpers import TINY_CONFIG

pytestmark = pytest.mark.skipif(not available("triton"), reason="triton is not installed")

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
BASELINE = "cuda" if GPU else "cpu"  # the other backend of this device, whose error sets the bar
TINY = {**TINY_CONFIG, "num_key_value_heads": 2}  # GQA: two query heads a kv head


def _batch(device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One packed row of three documents (27, 1 and 20 tokens), as the trainer feeds it."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, TINY["vocab_size"], (1, 48), generator=g)
    cu = torch.tensor([0, 27, 28, 48], dtype=torch.int32)
    return ids.to(device), cu.to(device)


def _train(backend: str, dtype: torch.dtype, steps: int = 3) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """Losses of `steps` AdamW steps, and the gradients of the first."""
    torch.manual_seed(0)
    model = InternLMForCausalLM(InternLMConfig(**TINY)).to(DEVICE, dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids, cu = _batch(DEVICE)
    losses, grads = [], {}
    for step in range(steps):
        with use_backend(backend):
            loss = model(ids, labels=ids, cu_seqlens=cu).loss
            loss.backward()
        losses.append(loss.detach())
        if step == 0:
            grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        opt.step()
        opt.zero_grad()
    return losses, grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_training_steps_match_the_oracle(dtype):
    """Each loss and the first step's gradients: the triton backend's error against the fp64 oracle
    is at most twice the other backend's in the same dtype (plus a small atol)."""
    ours, ours_g = _train("triton", dtype)
    base, base_g = _train(BASELINE, dtype)
    oracle, oracle_g = _train("ref", torch.float64)
    for i, (a, b, c) in enumerate(zip(ours, base, oracle)):
        assert_matches_oracle(f"loss at step {i}", a, b, c, atol=ATOL[dtype])
    for name in oracle_g:
        assert_matches_oracle(f"grad of {name}", ours_g[name], base_g[name], oracle_g[name], atol=ATOL[dtype])


def test_greedy_generation_gives_the_same_tokens():
    model = small_model(num_key_value_heads=2).to(DEVICE)
    prompts = [[5, 9, 2, 7, 30, 11, 4], [3, 1]]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=DEVICE)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=DEVICE)
    # every decode kernel is triton's; the GEMMs and argmax the library's, and the layers op by op
    with use_backend("triton"):
        kernels = InferenceKernels(model.lm_head.weight)
    library = ("few_rows_linear", "few_rows_linear_bf16", "few_rows_linear_int8", "argmax_rows", "decode_layer")
    assert {op: b for op, b in kernels.impl.items() if b != "triton"} == dict.fromkeys(library, "aten")
    assert kernels.decode_layer is None
    runs = {}
    for backend in (BASELINE, "triton"):
        with use_backend(backend):
            runs[backend] = model.generate(ids, attention_mask=mask, max_new_tokens=8, pad_token_id=0)
    assert runs["triton"].tolist() == runs[BASELINE].tolist()
