"""Training config: Python config files, --key=value overrides, coercion, errors that say where and what."""

from __future__ import annotations

import json
import textwrap

import pytest

from internlm_fast.model import preset
from internlm_fast.train.config import (
    ConfigError,
    TrainConfig,
    config_from_dict,
    config_to_dict,
    format_config_help,
    load_config,
    valid_keys,
)


def write(tmp_path, text: str, name: str = "cfg.py"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_defaults():
    cfg = load_config()
    assert cfg == TrainConfig()
    assert (cfg.job_name, cfg.seed, cfg.device, cfg.threads) == ("nano-pycorpus", 0, "auto", 0)
    assert (cfg.data.seq_len, cfg.data.micro_bsz, cfg.data.micro_num, cfg.data.total_steps) == (512, 4, 1, 1500)
    assert (cfg.optimizer.lr, cfg.optimizer.adam_beta2, cfg.optimizer.clip_grad_norm) == (3e-3, 0.95, 1.0)
    assert (cfg.lr_scheduler.warmup_ratio, cfg.lr_scheduler.eta_min) == (0.05, 3e-4)
    assert (cfg.ckpt.checkpoint_every, cfg.ckpt.keep_last, cfg.ckpt.resume) == (250, 2, None)
    assert (cfg.generate.prompt, cfg.generate.temperature, cfg.generate.top_p) == ("def ", 0.8, 0.8)
    assert str(cfg.checkpoint_folder) == "runs/nano-pycorpus/checkpoints"
    assert str(cfg.log_folder) == "runs/nano-pycorpus"
    assert cfg.model.build() == preset("nano")


def test_file_with_constants_imports_and_helpers(tmp_path):
    path = write(
        tmp_path,
        """
        import math
        from os import path as osp

        SEQ_LEN = 256
        _HIDDEN = 128


        def half(x):
            return x // 2


        job_name = "mine"
        seed = 7
        model = dict(preset="tiny", dtype="bf16", checkpointing=True, hidden_size=_HIDDEN, num_hidden_layers=2)
        data = dict(seq_len=SEQ_LEN, micro_bsz=half(8), shuffle=False)
        optimizer = {"lr": 1e-3 * math.sqrt(4), "weight_decay": 0}
        ckpt = dict(folder=osp.join("out", "ck"))
        """,
    )
    cfg = load_config(path)
    assert (cfg.job_name, cfg.seed) == ("mine", 7)
    assert (cfg.model.dtype, cfg.model.checkpointing) == ("bf16", True)
    assert cfg.model.fields == {"hidden_size": 128, "num_hidden_layers": 2}
    built = cfg.model.build()
    assert (built.hidden_size, built.num_hidden_layers, built.gradient_checkpointing) == (128, 2, True)
    assert (cfg.data.seq_len, cfg.data.micro_bsz, cfg.data.shuffle) == (256, 4, False)
    assert cfg.optimizer.lr == pytest.approx(2e-3) and cfg.optimizer.weight_decay == 0.0
    assert isinstance(cfg.optimizer.weight_decay, float)
    assert cfg.ckpt.folder == "out/ck" and str(cfg.checkpoint_folder) == "out/ck"
    assert cfg.data.micro_num == 1  # untouched keys keep their defaults


def test_command_line_overrides_the_file(tmp_path):
    path = write(tmp_path, "optimizer = dict(lr=1e-3, adam_beta1=0.8)\ndata = dict(micro_bsz=8)\n")
    cfg = load_config(
        path,
        [
            "--optimizer.lr=5e-4",
            "data.micro_bsz=2",
            "--ckpt.resume",
            "auto",
            "--model.hidden_size=512",
            "--job_name=123",
            "--generate.prompt='class '",
            "--data.train=data/corpus",
            "--data.val=None",
        ],
    )
    assert (cfg.optimizer.lr, cfg.optimizer.adam_beta1, cfg.data.micro_bsz) == (5e-4, 0.8, 2)
    assert cfg.ckpt.resume == "auto" and cfg.model.fields == {"hidden_size": 512}
    assert cfg.job_name == "123" and cfg.generate.prompt == "class "
    assert cfg.data.train == "data/corpus" and cfg.data.val is None


@pytest.mark.parametrize(
    "override,key,value",
    [
        ("--log.tensorboard=false", "log.tensorboard", False),
        ("--log.tensorboard=0", "log.tensorboard", False),
        ("--log.progress=True", "log.progress", True),
        ("--log.progress=1", "log.progress", True),
        ("--optimizer.lr=1", "optimizer.lr", 1.0),
        ("--data.total_steps=1e3", "data.total_steps", 1000),
        ("--model.rope_theta=5e5", "model.rope_theta", 500000.0),
        ("--model.num_key_value_heads=None", "model.num_key_value_heads", None),
        ("--model.bias=no", "model.bias", False),
    ],
)
def test_values_are_coerced_to_the_key_type(override, key, value):
    cfg = load_config(None, [override])
    section, name = key.split(".")
    got = cfg.model.fields[name] if section == "model" else getattr(getattr(cfg, section), name)
    assert got == value and type(got) is type(value)


@pytest.mark.parametrize(
    "override,message",
    [
        ("--data.micro_bsz=abc", "data.micro_bsz expects an int, got 'abc'"),
        ("--data.micro_bsz=2.5", "data.micro_bsz expects an int"),
        ("--log.tensorboard=maybe", "log.tensorboard expects a bool"),
        ("--optimizer.lr=fast", "optimizer.lr expects a number"),
        ("--model.dtype=fp16", "model.dtype must be one of 'fp32', 'bf16', got 'fp16'"),
        ("--model.preset=huge", "model.preset must be one of"),
        ("--device=tpu", "device must be one of"),
        ("--data.seq_len=0", "data.seq_len must be > 0, got 0"),
        ("--lr_scheduler.warmup_ratio=1.5", r"lr_scheduler.warmup_ratio must be in \[0, 1\]"),
        ("--optimizer.adam_beta2=1", r"optimizer.adam_beta2 must be in \[0, 1\)"),
        ("--generate.top_p=0", r"generate.top_p must be in \(0, 1\]"),
        ("--seed=-1", "seed must be >= 0"),
        ("--data.seq_len=4096", "data.seq_len 4096 exceeds the model's max_position_embeddings 1024"),
        ("--lr_scheduler.eta_min=0.1", "eta_min 0.1 exceeds optimizer.lr"),
        ("--model.hidden_size=130", "hidden_size 130 is not a multiple of num_attention_heads"),
        ("--optimizer=3", "'optimizer' is a section"),
        ("justaword", "'justaword' is not --key=value"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


@pytest.mark.parametrize(
    "key,suggestion",
    [
        ("optimizer.learning_rate", "optimizer.lr"),
        ("lr", "optimizer.lr"),
        ("resume", "ckpt.resume"),
        ("data.micro_batch_size", "data.micro_bsz"),
        ("model.hiden_size", "model.hidden_size"),
        ("model.gradient_checkpointing", "model.checkpointing"),
        ("log.evry", "log.every"),
        ("optimiser.lr", "optimizer.lr"),
    ],
)
def test_unknown_command_line_key_suggests_the_closest(key, suggestion):
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"--{key}=1"])
    assert f"unknown config key '{key}'; did you mean '{suggestion}'?" in str(err.value)
    assert f"--{key}" in str(err.value)


def test_unknown_file_key_names_file_and_line(tmp_path):
    path = write(tmp_path, "SEQ_LEN = 128\n\noptimizer = dict(\n    lr=1e-3,\n    learning_rate=2e-3,\n)\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == (f"{path}:5: unknown config key 'optimizer.learning_rate'; did you mean 'optimizer.lr'?")
    path = write(tmp_path, "data = {\n  'seq_len': 64,\n  'micro_bsz': 2,\n  'suffle': True}\n", "b.py")
    with pytest.raises(ConfigError, match=rf"{path}:4: unknown config key 'data.suffle'; did you mean 'data.shuffle'"):
        load_config(path)
    path = write(tmp_path, "x = 1\nseeed = 3\n", "c.py")
    with pytest.raises(ConfigError, match=rf"{path}:1: unknown config key 'x'"):
        load_config(path)
    path = write(tmp_path, "seeed = 3\n", "d.py")
    with pytest.raises(ConfigError, match=rf"{path}:1: unknown config key 'seeed'; did you mean 'seed'"):
        load_config(path)


def test_bad_file_value_names_file_and_line(tmp_path):
    path = write(tmp_path, "model = dict(preset='tiny')\ndata = dict(\n    seq_len='long',\n)\n")
    with pytest.raises(ConfigError, match=rf"{path}:3: data.seq_len expects an int, got 'long'"):
        load_config(path)
    path = write(tmp_path, "optimizer = 0.1\n", "b.py")
    with pytest.raises(ConfigError, match=rf"{path}:1: 'optimizer' is a section: give it as dict"):
        load_config(path)


def test_syntax_and_runtime_errors_give_file_and_line(tmp_path):
    path = write(tmp_path, "seed = 1\nmodel = dict(preset='tiny'\ndata = dict()\n")
    with pytest.raises(ConfigError, match=rf"{path}:2: syntax error"):
        load_config(path)
    path = write(tmp_path, "seed = 1\n\ndata = dict(seq_len=SEQ)\n", "b.py")
    with pytest.raises(ConfigError, match=rf"{path}:3: NameError: name 'SEQ' is not defined"):
        load_config(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.py")


def test_round_trip_through_a_plain_dict(tmp_path):
    cfg = load_config(
        None,
        ["--model.hidden_size=512", "--model.dtype=bf16", "--ckpt.resume=auto", "--data.val=x/val", "--seed=3"],
    )
    d = config_to_dict(cfg)
    model = {"preset": "nano", "dtype": "bf16", "checkpointing": False, "init_from": None, "hidden_size": 512}
    assert d["model"] == model
    restored = config_from_dict(json.loads(json.dumps(d)))
    assert restored == cfg
    assert config_to_dict(restored) == d
    with pytest.raises(ConfigError, match="unknown config key 'optimizer.momentum'"):
        config_from_dict({**d, "optimizer": {"momentum": 0.9}})


def test_help_lists_every_key_with_default_and_doc():
    text = format_config_help()
    for key in valid_keys():
        if not key.startswith("model.") or key.split(".")[1] in ("preset", "dtype", "checkpointing"):
            assert f"  {key} " in text
    assert "model.<field>" in text and "hidden_size" in text
    line = next(line for line in text.splitlines() if line.strip().startswith("optimizer.lr "))
    assert "0.003" in line and "learning rate" in line
    table = format_config_help(markdown=True)
    assert table.splitlines()[0] == "| key | default | meaning |"
    assert "| `data.micro_bsz` | `4` |" in table
