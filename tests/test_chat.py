"""chat / stream_chat with InternLM's template and defaults, and the terminal chat end to end."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import internlm_fast
from internlm_fast.infer import CHAT_DEFAULTS, chat_prompt_ids
from internlm_fast.infer.chat import chat_config
from internlm_fast.train.checkpoint import model_tensors, save_checkpoint
from internlm_fast.train.config import TrainConfig, config_to_dict

from .generate_helpers import SMALL, one_thread, small_model, train_small_tokenizer  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_small_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def model():
    return small_model()


def test_template_is_the_documented_token_sequence(tokenizer):
    t = tokenizer
    ids = chat_prompt_ids(t, "and 2+2?", [("hi", "Hello!")])
    expected = (
        [t.bos_id]
        + t.sp.EncodeAsIds("<|User|>:hi")
        + [t.eoh_id]
        + t.sp.EncodeAsIds("\n<|Bot|>:")
        + t.sp.EncodeAsIds("Hello!")
        + [t.eoa_id]
        + t.sp.EncodeAsIds("\n")
        + [t.bos_id]
        + t.sp.EncodeAsIds("<|User|>:and 2+2?")
        + [t.eoh_id]
        + t.sp.EncodeAsIds("\n<|Bot|>:")
    )
    assert ids == expected
    documented = "<s><|User|>:hi<eoh>\n<|Bot|>:Hello!<eoa>\n<s><|User|>:and 2+2?<eoh>\n<|Bot|>:"
    assert t.decode(ids, skip_special=False) == documented
    assert chat_prompt_ids(t, "q") == [t.bos_id] + t.sp.EncodeAsIds("<|User|>:q") + [t.eoh_id] + t.sp.EncodeAsIds(
        "\n<|Bot|>:"
    )
    with pytest.raises(ValueError, match=r"history\[0\] must be a \(query, response\) pair"):
        chat_prompt_ids(t, "q", [("only one",)])


def test_chat_defaults_are_internlms(tokenizer):
    cfg = chat_config(tokenizer)
    assert (cfg.do_sample, cfg.temperature, cfg.top_p, cfg.max_new_tokens) == (True, 0.8, 0.8, 1024)
    assert cfg.eos_ids == {tokenizer.eos_id, tokenizer.eoa_id} and CHAT_DEFAULTS["max_new_tokens"] == 1024
    assert chat_config(tokenizer, temperature=0.5, do_sample=False).temperature == 0.5


def test_chat_and_stream_chat(model, tokenizer):
    response, history = model.chat(tokenizer, "hi", seed=3, max_new_tokens=30)
    assert history == [("hi", response)] and response
    again, _ = model.chat(tokenizer, "hi", seed=3, max_new_tokens=30)
    assert again == response
    streamed = list(model.stream_chat(tokenizer, "hi", seed=3, max_new_tokens=30))
    assert streamed[-1] == (response, [("hi", response)])
    for (a, _), (b, _) in zip(streamed, streamed[1:]):
        assert b.startswith(a) and len(b) > len(a)
    # a second turn sees the first in its prompt and keeps the history it was given
    second, history2 = model.chat(tokenizer, "more", history, do_sample=False, max_new_tokens=10)
    assert history2 == [("hi", response), ("more", second)] and history == [("hi", response)]


def test_chat_stops_at_a_stop_id(model, tokenizer):
    free, _ = model.chat(tokenizer, "hi", do_sample=False, max_new_tokens=20)
    ids = chat_prompt_ids(tokenizer, "hi")
    new = model.generate(torch.tensor([ids]), max_new_tokens=20)[0, len(ids) :].tolist()
    assert tokenizer.decode(new) == free
    stopped, _ = model.chat(tokenizer, "hi", do_sample=False, max_new_tokens=20, eos_token_id=[new[4]])
    assert stopped == tokenizer.decode(new[: new.index(new[4])])


def test_stream_chat_checks_arguments_when_called(model, tokenizer):
    with pytest.raises(ValueError, match="top_p"):
        model.stream_chat(tokenizer, "hi", top_p=0)
    with pytest.raises(TypeError, match="query must be a str"):
        model.chat(tokenizer, None)


# -- the terminal chat ---------------------------------------------------------------------------


def _run_cli(args: list[str], stdin: str, cwd: Path) -> subprocess.CompletedProcess:
    src = str(Path(internlm_fast.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": src, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "internlm_fast.chat", *args],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=120,
    )


def _save_training_checkpoint(model, tokenizer, folder: Path) -> Path:
    cfg = TrainConfig()
    cfg.model.fields = dict(SMALL)
    cfg.data.tokenizer = str(tokenizer.model_path)
    cfg.data.seq_len = SMALL["max_position_embeddings"]
    return save_checkpoint(folder, 7, model_tensors(model), {"optimizer": {}}, {"config": config_to_dict(cfg)})


def test_terminal_chat_end_to_end_with_piped_stdin(model, tokenizer, tmp_path):
    ckpt = _save_training_checkpoint(model, tokenizer, tmp_path / "checkpoints")
    stdin = "hello\n/clear\n\nhi again\n/exit\nnever answered\n"
    out = _run_cli(["--model", str(ckpt), "--greedy", "--max-new-tokens", "12"], stdin, tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("Bot: ") == 2 and "(conversation cleared)" in out.stdout
    first = out.stdout.split("Bot: ")[1].split("\n(conversation cleared)")[0]
    expected, _ = model.chat(tokenizer, "hello", do_sample=False, max_new_tokens=12)
    assert first == expected
    # history: without /clear the second answer is conditioned on the first turn
    out2 = _run_cli(["--model", str(ckpt), "--greedy", "--max-new-tokens", "12"], "hello\nhi again\n", tmp_path)
    turn1, _ = model.chat(tokenizer, "hello", do_sample=False, max_new_tokens=12)
    turn2, _ = model.chat(tokenizer, "hi again", [("hello", turn1)], do_sample=False, max_new_tokens=12)
    assert out2.stdout == f"Bot: {turn1}\nBot: {turn2}\n"


def test_terminal_chat_without_a_model_says_what_to_do(tmp_path):
    out = _run_cli([], "hello\n", tmp_path)
    assert out.returncode == 2
    assert "python -m internlm_fast.train" in out.stderr


def test_terminal_chat_refuses_bad_options(tmp_path):
    out = _run_cli(["--model", str(tmp_path), "--top-p", "1.5"], "", tmp_path)
    assert out.returncode == 2 and "top_p" in out.stderr
    out = _run_cli(["--model", str(tmp_path / "missing")], "", tmp_path)
    assert out.returncode == 2 and "does not exist" in out.stderr
