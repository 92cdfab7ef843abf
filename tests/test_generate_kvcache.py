"""The KV-cache forward (packed prefill, decode steps, shrinking cache) equals model.forward."""

from __future__ import annotations

import pytest
import torch

from internlm_fast.infer import CachedDecoder
from internlm_fast.ops import use_backend

from .generate_helpers import one_thread, small_model  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = dict(atol=2e-5, rtol=1e-5)


def _full_logits(model, seq: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([seq])).logits[0, -1]


@pytest.mark.parametrize("kv_heads", [4, 2])
@pytest.mark.parametrize("prompts", [[[5, 9, 2, 7, 30]], [[5, 9, 2, 7, 30], [3], list(range(40, 137)), [8, 8]]])
def test_decoding_equals_full_forward_at_every_step(prompts, kv_heads):
    model = small_model(num_key_value_heads=kv_heads)
    seqs = [list(p) for p in prompts]
    with torch.inference_mode():
        decoder = CachedDecoder(model)
        cache = decoder.new_cache(len(prompts), 160)
        logits = decoder.prefill(cache, prompts)
        for _ in range(12):
            for b, seq in enumerate(seqs):
                torch.testing.assert_close(logits[b], _full_logits(model, seq), **TOL)
            tokens = logits.argmax(-1)
            for b, t in enumerate(tokens.tolist()):
                seqs[b].append(t)
            logits = decoder.decode(cache, tokens)
    assert cache.lens.tolist() == [len(s) for s in seqs]


def test_packed_prefill_equals_each_prompt_alone():
    model = small_model()
    prompts = [list(range(1, 60)), [7], [200, 3, 4], list(range(100, 331))]
    with torch.inference_mode():
        decoder = CachedDecoder(model)
        cache = decoder.new_cache(len(prompts), 240)
        packed = decoder.prefill(cache, prompts)
        for b, p in enumerate(prompts):
            alone_cache = decoder.new_cache(1, 240)
            alone = decoder.prefill(alone_cache, [p])
            torch.testing.assert_close(packed[b], alone[0], **TOL)
            torch.testing.assert_close(packed[b], _full_logits(model, p), **TOL)
            n = len(p)  # the cached keys and values too
            torch.testing.assert_close(cache.keys[0][b, :n], alone_cache.keys[0][0, :n], **TOL)
            torch.testing.assert_close(cache.values[1][b, :n], alone_cache.values[1][0, :n], **TOL)


def test_dropping_finished_rows_keeps_the_others_exact():
    model = small_model()
    prompts = [[1, 2, 3], list(range(10, 50)), [9] * 7, [4, 5]]
    with torch.inference_mode():
        decoder = CachedDecoder(model)
        cache = decoder.new_cache(4, 80)
        logits = decoder.prefill(cache, prompts)
        seqs = [list(p) for p in prompts]
        live = [0, 1, 2, 3]
        for drop in [[], [0], [], [2], []]:
            keep = [i for i, row in enumerate(live) if row not in drop]
            tokens = logits.argmax(-1)
            for i, row in enumerate(live):
                seqs[row].append(int(tokens[i]))
            cache.keep(keep)
            live = [live[i] for i in keep]
            logits = decoder.decode(cache, tokens[keep])
            for i, row in enumerate(live):
                torch.testing.assert_close(logits[i], _full_logits(model, seqs[row]), **TOL)
        assert live == [1, 3] and cache.batch == 2
    with pytest.raises(ValueError, match="ascending"):
        cache.keep([1, 0])


def test_reference_backend_runs_the_same_path():
    model = small_model()
    prompts = [[3, 4, 5, 6], [7, 8]]
    out = {}
    for name in ("cpu", "ref"):
        with use_backend(name), torch.inference_mode():
            decoder = CachedDecoder(model)
            cache = decoder.new_cache(2, 16)
            first = decoder.prefill(cache, prompts)
            out[name] = (first, decoder.decode(cache, first.argmax(-1)))
    for a, b in zip(out["cpu"], out["ref"]):
        torch.testing.assert_close(a, b, **TOL)


def test_decode_weights_follow_parameter_updates():
    model = small_model()
    prompt = [[5, 6, 7]]
    with torch.inference_mode():
        before = CachedDecoder(model).prefill(CachedDecoder(model).new_cache(1, 8), prompt)
    with torch.no_grad():
        model.model.layers[0].self_attn.k_proj.weight.mul_(-1.0)  # an in-place update, as an optimizer does
    with torch.inference_mode():
        decoder = CachedDecoder(model)
        after = decoder.prefill(decoder.new_cache(1, 8), prompt)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after[0], _full_logits(model, prompt[0]), **TOL)
