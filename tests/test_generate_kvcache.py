"""The model's forward with a KV cache (packed prefill, decode steps, shrinking cache) equals its
forward without one."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

from internlm_fast.infer import KVCache, decode, prefill
from internlm_fast.model.modeling import rotary_tables
from internlm_fast.ops import use_backend

from .conftest import ATOL, assert_matches_oracle
from .generate_helpers import one_thread, small_model  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = dict(atol=2e-5, rtol=1e-5)


def _full_logits(model, seq: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([seq])).logits[0, -1]


@pytest.mark.parametrize("kv_heads", [4, 2])
@pytest.mark.parametrize("prompts", [[[5, 9, 2, 7, 30]], [[5, 9, 2, 7, 30], [3], list(range(40, 137)), [8, 8]]])
def test_decoding_equals_full_forward_at_every_step(prompts, kv_heads):
    """Each step's logits against the full forward of the sequence so far, by the 2x rule: the fp64
    oracle, and plain torch in fp32 for the error the precision allows (the cache path sums its
    softmax in other blocks than the full forward, so the two differ by rounding only)."""
    model = small_model(num_key_value_heads=kv_heads)
    oracle = copy.deepcopy(model).double()
    oracle.rotary_cos, oracle.rotary_sin = (t.double() for t in rotary_tables(model.config))
    seqs = [list(p) for p in prompts]

    def full(m, s):
        with use_backend("ref"):
            return _full_logits(m, s)

    with torch.inference_mode():
        cache = KVCache.for_model(model, len(prompts), 160)
        logits = prefill(model, cache, prompts)
        for _ in range(12):
            for b, seq in enumerate(seqs):
                name = f"sequence {b}, {len(seq)} tokens"
                assert_matches_oracle(name, logits[b], full(model, seq), full(oracle, seq), ATOL[torch.float32])
            tokens = logits.argmax(-1)
            for b, t in enumerate(tokens.tolist()):
                seqs[b].append(t)
            logits = decode(model, cache, tokens)
    assert cache.lens.tolist() == [len(s) for s in seqs]


def test_packed_prefill_equals_each_prompt_alone():
    model = small_model()
    prompts = [list(range(1, 60)), [7], [200, 3, 4], list(range(100, 331))]
    with torch.inference_mode():
        cache = KVCache.for_model(model, len(prompts), 240)
        packed = prefill(model, cache, prompts)
        for b, p in enumerate(prompts):
            alone_cache = KVCache.for_model(model, 1, 240)
            alone = prefill(model, alone_cache, [p])
            torch.testing.assert_close(packed[b], alone[0], **TOL)
            torch.testing.assert_close(packed[b], _full_logits(model, p), **TOL)
            n = len(p)  # the cached keys and values too
            torch.testing.assert_close(cache.keys[0][b, :n], alone_cache.keys[0][0, :n], **TOL)
            torch.testing.assert_close(cache.values[1][b, :n], alone_cache.values[1][0, :n], **TOL)


def test_dropping_finished_rows_keeps_the_others_exact():
    model = small_model()
    prompts = [[1, 2, 3], list(range(10, 50)), [9] * 7, [4, 5]]
    with torch.inference_mode():
        cache = KVCache.for_model(model, 4, 80)
        logits = prefill(model, cache, prompts)
        seqs = [list(p) for p in prompts]
        live = [0, 1, 2, 3]
        for drop in [[], [0], [], [2], []]:
            keep = [i for i, row in enumerate(live) if row not in drop]
            tokens = logits.argmax(-1)
            for i, row in enumerate(live):
                seqs[row].append(int(tokens[i]))
            cache.keep(keep)
            live = [live[i] for i in keep]
            logits = decode(model, cache, tokens[keep])
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
            cache = KVCache.for_model(model, 2, 16)
            first = prefill(model, cache, prompts)
            out[name] = (first, decode(model, cache, first.argmax(-1)))
    for a, b in zip(out["cpu"], out["ref"]):
        torch.testing.assert_close(a, b, **TOL)


def test_decode_weights_follow_parameter_updates():
    model = small_model()
    prompt = [[5, 6, 7]]
    with torch.inference_mode():
        before = prefill(model, KVCache.for_model(model, 1, 8), prompt)
    with torch.no_grad():
        model.model.layers[0].self_attn.k_proj.weight.mul_(-1.0)  # an in-place update, as an optimizer does
    with torch.inference_mode():
        after = prefill(model, KVCache.for_model(model, 1, 8), prompt)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after[0], _full_logits(model, prompt[0]), **TOL)


def test_forward_with_a_cache_checks_its_inputs():
    model = small_model()
    with torch.inference_mode():
        cache = KVCache.for_model(model, 2, 8)
        with pytest.raises(ValueError, match="one token per live sequence"):
            model(torch.tensor([[1], [2], [3]]), cache=cache)
        with pytest.raises(ValueError, match="cu_seqlens must run from 0 to 5"):
            model(torch.tensor([[1, 2, 3, 4, 5]]), cu_seqlens=torch.tensor([0, 2, 4], dtype=torch.int32), cache=cache)
        with pytest.raises(ValueError, match="prompt 0 has 9 tokens after 0 cached ones: more than 8"):
            prefill(model, cache, [list(range(9))])
        with pytest.raises(ValueError, match="at most|1 to 2 prompts"):
            prefill(model, cache, [[1], [2], [3]])
        logits = model(torch.tensor([[5, 6, 7]]), cu_seqlens=torch.tensor([0, 3], dtype=torch.int32), cache=cache)
        assert logits.logits.shape == (1, model.config.vocab_size) and cache.lens.tolist() == [3, 0]
        with pytest.raises(ValueError, match="prompt 0 has 6 tokens after 3 cached ones: more than 8"):
            prefill(model, cache, [[1] * 6])
        cache.keep([0])
        for _ in range(5):
            decode(model, cache, torch.tensor([4]))
        with pytest.raises(ValueError, match="a sequence is full: 8 tokens"):
            decode(model, cache, torch.tensor([4]))
        with pytest.raises(ValueError, match="labels"):
            model(torch.tensor([[4]]), labels=torch.tensor([[4]]), cache=cache)
    with pytest.raises(RuntimeError, match="no autograd"):
        decode(model, cache, torch.tensor([4]))


def test_a_generating_model_copies_and_pickles():
    """The decoding copies of the weights and the bound kernels are not part of the model's state."""
    model = small_model()
    ids = torch.tensor([[3, 4, 5]])
    first = model.generate(ids, max_new_tokens=5)
    for other in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert torch.equal(other.generate(ids, max_new_tokens=5), first)


def test_bf16_decoding_follows_the_oracle():
    """A bf16 model's cache steps (fp32 rotary tables, copies in bf16) against its own full forward in
    bf16 and the fp64 oracle on the same weights: the 2x rule on each step's logits."""
    model = small_model(std=0.1).to(torch.bfloat16)
    oracle = copy.deepcopy(model).double()
    oracle.rotary_cos, oracle.rotary_sin = (t.double() for t in rotary_tables(model.config))  # unrounded
    seq = [5, 9, 2, 7, 30, 11]

    def full(m, s, backend):
        with use_backend(backend), torch.no_grad():
            return m(torch.tensor([s])).logits[0, -1]

    with torch.inference_mode():
        cache = KVCache.for_model(model, 1, 16)
        logits = prefill(model, cache, [seq])[0]
        for token in (3, 17, 200, 4):
            assert_matches_oracle(
                f"logits after {len(seq)} tokens",
                logits,
                full(model, seq, "cpu"),
                full(oracle, seq, "ref"),
                ATOL[torch.bfloat16],
            )
            seq.append(token)
            logits = decode(model, cache, torch.tensor([token]))[0]


@pytest.mark.parametrize("split", [1, 17, 40])
def test_prefill_after_cached_tokens_equals_one_prefill(split):
    """A prompt prefilled after tokens its row already caches (a reused prefix) gives the logits and
    cache of prefilling everything at once, and the decode steps after it match too."""
    model = small_model()
    prompts = [list(range(1, 60)), [7, 8, 9, 10, 11] * 9]
    with torch.inference_mode():
        whole = KVCache.for_model(model, 2, 80)
        expect = prefill(model, whole, prompts)
        parts = KVCache.for_model(model, 2, 80)
        prefill(model, parts, [p[:split] for p in prompts])
        got = prefill(model, parts, [p[split:] for p in prompts])
        torch.testing.assert_close(got, expect, **TOL)
        assert parts.lens.tolist() == whole.lens.tolist() == [len(p) for p in prompts]
        tokens = expect.argmax(-1)
        for _ in range(3):
            a, b = decode(model, whole, tokens), decode(model, parts, tokens)
            torch.testing.assert_close(b, a, **TOL)
            tokens = a.argmax(-1)
