import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import internlm_fast.model
from internlm_fast.model import InternLMConfig, InternLMForCausalLM, preset
from internlm_fast.ops import use_backend

from .model_helpers import TINY_CONFIG

transformers = pytest.importorskip("transformers")

CFG = {**TINY_CONFIG, "vocab_size": 300, "hidden_size": 128, "intermediate_size": 344}


def _pair(num_key_value_heads=4):
    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(
        **CFG, num_key_value_heads=num_key_value_heads, attention_bias=True, tie_word_embeddings=False
    )
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    with torch.no_grad():  # HF initialises biases to zero; make them matter
        for name, p in hf.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    ours = InternLMForCausalLM(InternLMConfig(**CFG, num_key_value_heads=num_key_value_heads)).eval()
    missing, unexpected = ours.load_state_dict(hf.state_dict(), strict=False)
    assert not missing and all("rotary" in k for k in unexpected), (missing, unexpected)
    return hf, ours


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_logits_equal_transformers_llama_with_attention_bias(kv_heads):
    hf, ours = _pair(kv_heads)
    ids = torch.randint(0, CFG["vocab_size"], (2, 37))
    with torch.no_grad(), use_backend("cpu"):
        ref = hf(ids).logits
        got = ours(ids).logits
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    labels = ids.clone()
    labels[:, :5] = -100
    with torch.no_grad(), use_backend("cpu"):
        ref_loss = hf(ids, labels=labels).loss
        got_loss = ours(ids, labels=labels).loss
    torch.testing.assert_close(got_loss, ref_loss, atol=1e-5, rtol=1e-5)


def test_packed_documents_equal_separate_sequences():
    _, ours = _pair()
    docs = [torch.randint(0, CFG["vocab_size"], (n,)) for n in (5, 1, 30)]
    packed = torch.cat(docs)[None]
    cu = torch.tensor([0, 5, 6, 36], dtype=torch.int32)
    with torch.no_grad(), use_backend("cpu"):
        logits = ours(packed, cu_seqlens=cu).logits[0]
        for d, s in zip(docs, cu[:-1].tolist()):
            alone = ours(d[None]).logits[0]
            torch.testing.assert_close(logits[s : s + len(d)], alone, atol=1e-5, rtol=1e-5)
        # the loss of the packed row is the token-weighted mean over documents, no cross-document targets
        total = sum(ours(d[None], labels=d[None]).loss * (len(d) - 1) for d in docs if len(d) > 1)
        packed_loss = ours(packed, labels=packed, cu_seqlens=cu).loss
    torch.testing.assert_close(packed_loss, total / sum(len(d) - 1 for d in docs), atol=1e-5, rtol=1e-5)


def test_gradients_match_reference_backend_and_checkpointing():
    _, ours = _pair()
    ids = torch.randint(0, CFG["vocab_size"], (2, 20))
    grads = {}
    for mode in ("cpu", "ref", "ckpt"):
        ours.zero_grad()
        ours.config.gradient_checkpointing = mode == "ckpt"
        ours.train()
        with use_backend("ref" if mode == "ref" else "cpu"):
            ours(ids, labels=ids).loss.backward()
        grads[mode] = {n: p.grad.clone() for n, p in ours.named_parameters()}
    for n in grads["cpu"]:
        torch.testing.assert_close(grads["cpu"][n], grads["ref"][n], atol=1e-5, rtol=1e-4, msg=n)
        torch.testing.assert_close(grads["ckpt"][n], grads["cpu"][n], atol=1e-6, rtol=1e-5, msg=n)


def test_presets_and_config_errors():
    tiny = preset("tiny")
    n = sum(p.numel() for p in InternLMForCausalLM(tiny).parameters())
    assert 5_000_000 <= n <= 20_000_000
    assert preset("internlm-7b").head_dim == 128
    with pytest.raises(ValueError, match="unknown model preset 'huge'"):
        preset("huge")
    with pytest.raises(ValueError, match="not a multiple of num_key_value_heads"):
        InternLMConfig(hidden_size=256, num_attention_heads=8, num_key_value_heads=3)
    with pytest.raises(ValueError, match="exceeds max_position_embeddings"):
        InternLMForCausalLM(InternLMConfig(**CFG))(torch.zeros(1, 200, dtype=torch.long))


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_fused_projections_equal_transformers_and_the_unfused_path(kv_heads, monkeypatch):
    # FUSED_GEMM_MIN_TOKENS = 1 forces one GEMM for q/k/v and one for gate/up; 10**9 separate linears
    from internlm_fast.model import projection

    hf, ours = _pair(kv_heads)
    ids = torch.randint(0, CFG["vocab_size"], (2, 120))
    grads, losses = {}, {}
    for min_tokens in (1, 10**9):  # fused, then separate linears
        monkeypatch.setattr(projection, "FUSED_GEMM_MIN_TOKENS", min_tokens)
        ours.zero_grad()
        with use_backend("cpu"):
            losses[min_tokens] = ours(ids, labels=ids).loss
            losses[min_tokens].backward()
            if min_tokens == 1:
                with torch.no_grad():
                    torch.testing.assert_close(ours(ids).logits, hf(ids).logits, atol=1e-4, rtol=1e-4)
        grads[min_tokens] = {n: p.grad.clone() for n, p in ours.named_parameters()}
    torch.testing.assert_close(losses[1], losses[10**9], atol=1e-6, rtol=1e-6)
    for n in grads[1]:
        torch.testing.assert_close(grads[1][n], grads[10**9][n], atol=1e-6, rtol=1e-5, msg=n)


def test_the_model_package_does_not_import_inference():
    """model/ is below infer/: no import of internlm_fast.infer in its sources, and importing it (and
    running a forward) loads none; model.generate/chat/stream_chat reach infer by name when called."""
    model_dir = Path(internlm_fast.model.__file__).parent
    for source in model_dir.glob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert not node.module.startswith("internlm_fast.infer"), f"{source.name} imports {node.module}"
            if isinstance(node, ast.Import):
                assert not any(a.name.startswith("internlm_fast.infer") for a in node.names), source.name
    code = (
        "import sys, torch\n"
        "from internlm_fast.model import InternLMConfig, InternLMForCausalLM\n"
        "m = InternLMForCausalLM(InternLMConfig(vocab_size=64, hidden_size=32, intermediate_size=64,"
        " num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=16))\n"
        "m(torch.zeros(1, 4, dtype=torch.long))\n"
        "assert not any(n.startswith('internlm_fast.infer') for n in sys.modules), sorted(sys.modules)\n"
        "m.generate(torch.zeros(1, 4, dtype=torch.long), max_new_tokens=2)\n"
        "assert 'internlm_fast.infer' in sys.modules\n"
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(model_dir.parents[1]), os.environ.get("PYTHONPATH")])),
    }
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=300)
