import pytest
import torch

from internlm_fast.model import InternLMConfig, InternLMForCausalLM
from internlm_fast.train.optim import build_optimizer

from .model_helpers import TINY_CONFIG

CFG = TINY_CONFIG


def _model():
    torch.manual_seed(0)
    return InternLMForCausalLM(InternLMConfig(**CFG))


def test_weight_decay_on_matrices_only():
    model = _model()
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = ([names[id(p)] for p in g["params"]] for g in opt.param_groups)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert set(decay) | set(no_decay) == set(names.values()) and not set(decay) & set(no_decay)
    assert "model.embed_tokens.weight" in decay and "lm_head.weight" in decay
    assert "model.layers.0.self_attn.q_proj.weight" in decay
    assert all(n.endswith("bias") or "norm" in n for n in no_decay)
    assert "model.layers.1.self_attn.v_proj.bias" in no_decay and "model.norm.weight" in no_decay
    assert opt.defaults["fused"] and opt.defaults["betas"] == (0.9, 0.95)


def test_steps_equal_torch_adamw_foreach():
    ids = torch.randint(0, CFG["vocab_size"], (2, 16))
    params = {}
    for fused in (True, False):
        model = _model()
        if fused:
            opt = build_optimizer(model, lr=1e-2, weight_decay=0.1)
        else:
            groups = [
                {"params": [p for p in model.parameters() if p.dim() >= 2], "weight_decay": 0.1},
                {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0},
            ]
            opt = torch.optim.AdamW(groups, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, foreach=True)
        for _ in range(3):
            model(ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
        params[fused] = dict(model.named_parameters())
    for n, p in params[True].items():
        if "k_proj.bias" in n:  # its gradient is rounding noise (softmax ignores a per-query shift) that Adam scales up
            continue
        torch.testing.assert_close(p, params[False][n], atol=1e-6, rtol=1e-5, msg=n)
    assert not torch.equal(params[True]["lm_head.weight"], _model().lm_head.weight)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(lr=0.0), "lr"),
        (dict(lr=1e-3, betas=(0.9, 1.0)), "betas"),
        (dict(lr=1e-3, weight_decay=-1.0), "weight_decay"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_optimizer(_model(), **kwargs)


def test_frozen_model_is_refused():
    model = _model().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(model, lr=1e-3)
