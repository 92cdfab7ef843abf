"""Training configuration: InternLM-style Python config files plus `--key=value` command-line overrides.

A config file is Python. Its lowercase top-level names form the config: sections are dicts, e.g.
`optimizer = dict(lr=1e-3)`; UPPERCASE names are helper constants, and imports, functions and names
starting with `_` are ignored. Overrides use dotted keys: `--optimizer.lr=1e-3 --data.micro_bsz=2`;
values are Python literals or, failing that, the raw text. Precedence: defaults < file < command line.
Unknown keys and bad values raise ConfigError naming the key, where it was set and the closest valid key.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import traceback
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from internlm_fast.model.config import PRESETS, InternLMConfig, preset


class ConfigError(ValueError):
    """An unknown key, a bad value or an unreadable config file; the message says which and where."""


_Check = tuple[Callable[[Any], bool], str]
POSITIVE: _Check = (lambda v: v > 0, "> 0")
NON_NEGATIVE: _Check = (lambda v: v >= 0, ">= 0")
FRACTION: _Check = (lambda v: 0 <= v <= 1, "in [0, 1]")
BETA: _Check = (lambda v: 0 <= v < 1, "in [0, 1)")
PROBABILITY: _Check = (lambda v: 0 < v <= 1, "in (0, 1]")
NON_EMPTY: _Check = (lambda v: bool(v.strip()), "non-empty")


def _key(default: Any, doc: str, choices: tuple = (), check: _Check | None = None) -> Any:
    """A config key: its default, the one-line doc that --help and the README show, and its constraints."""
    return field(default=default, metadata={"doc": doc, "choices": choices, "check": check})


# model keys taken directly from InternLMConfig; gradient checkpointing is spelled model.checkpointing
MODEL_FIELDS = tuple(f.name for f in dataclasses.fields(InternLMConfig) if f.name != "gradient_checkpointing")
# model fields that may differ from model.init_from's
INIT_FROM_OVERRIDABLE = ("max_position_embeddings", "rope_scaling")


@dataclass
class ModelSection:
    preset: str = _key("nano", "model preset from internlm_fast.model.PRESETS", choices=tuple(PRESETS))
    dtype: str = _key("fp32", "parameter and compute dtype", choices=("fp32", "bf16"))
    checkpointing: bool = _key(False, "activation checkpointing: recompute each layer in the backward to save memory")
    init_from: str | None = _key(
        None,
        "start from these weights: a model folder (ours, HF LLaMA/InternLM), a checkpoint or an InternLM training "
        "checkpoint; the model config is read from it (preset ignored)",
    )
    # InternLMConfig fields written directly in the section (model.hidden_size=512), set over the preset
    fields: dict = field(default_factory=dict)

    def build(self) -> InternLMConfig:
        if self.init_from is None:
            return preset(self.preset, **self.fields, gradient_checkpointing=self.checkpointing)
        from internlm_fast.model.pretrained import load_model_config

        try:
            config = load_model_config(self.init_from)
        except OSError as e:
            raise ValueError(f"model.init_from: {e}") from None
        for name, value in self.fields.items():
            # rotary tables are computed, not stored: the context length may change when training on
            if name not in INIT_FROM_OVERRIDABLE and getattr(config, name) != value:
                raise ValueError(
                    f"model.{name}={value!r} conflicts with {getattr(config, name)!r} in model.init_from "
                    f"{self.init_from}; remove model.{name}"
                )
        return dataclasses.replace(config, **self.fields, gradient_checkpointing=self.checkpointing)


@dataclass
class DataSection:
    train: str = _key("builtin", "training data: 'builtin' (Python's own sources) or the path prefix of token files")
    val: str | None = _key(None, "validation data path prefix; None: the held-out split of the builtin corpus")
    tokenizer: str | None = _key(None, "sentencepiece .model path; None: the tokenizer that came with the data")
    seq_len: int = _key(512, "tokens per packed sequence (no segment is longer)", check=POSITIVE)
    micro_bsz: int = _key(4, "sequences per micro batch", check=POSITIVE)
    micro_num: int = _key(1, "micro batches per optimizer step (gradient accumulation)", check=POSITIVE)
    total_steps: int = _key(1500, "optimizer steps to train", check=POSITIVE)
    shuffle: bool = _key(True, "shuffle documents, in a new deterministic order each epoch")


@dataclass
class OptimizerSection:
    lr: float = _key(3e-3, "peak learning rate of AdamW", check=POSITIVE)
    adam_beta1: float = _key(0.9, "AdamW beta1", check=BETA)
    adam_beta2: float = _key(0.95, "AdamW beta2", check=BETA)
    adam_eps: float = _key(1e-8, "AdamW epsilon", check=POSITIVE)
    weight_decay: float = _key(0.01, "AdamW decoupled weight decay", check=NON_NEGATIVE)
    clip_grad_norm: float = _key(1.0, "clip the global gradient norm to this (0 = off)", check=NON_NEGATIVE)


@dataclass
class LRSchedulerSection:
    warmup_ratio: float = _key(0.05, "fraction of total_steps with linear warmup from 0 to lr", check=FRACTION)
    eta_min: float = _key(3e-4, "learning rate the cosine decay ends at", check=NON_NEGATIVE)


@dataclass
class CkptSection:
    folder: str | None = _key(None, "checkpoint folder; None: checkpoints/ in the log folder")
    checkpoint_every: int = _key(250, "save every N steps and at the end (0 = only at the end)", check=NON_NEGATIVE)
    keep_last: int = _key(2, "keep the newest K checkpoints, delete older ones", check=POSITIVE)
    resume: str | None = _key(None, "None: start fresh; 'auto': the newest valid checkpoint; or a checkpoint path")


@dataclass
class LogSection:
    folder: str | None = _key(None, "folder of metrics.jsonl and TensorBoard logs; None: runs/{job_name}")
    every: int = _key(
        10, "print a metrics line every N steps (metrics.jsonl and TensorBoard get every step)", check=POSITIVE
    )
    eval_every: int = _key(250, "validation loss every N steps and at the end (0 = only at end)", check=NON_NEGATIVE)
    eval_batches: int = _key(
        8,
        "micro batches per periodic validation (a fixed random sample); the final one uses the whole split",
        check=POSITIVE,
    )
    tensorboard: bool = _key(True, "also write TensorBoard event files")
    progress: bool = _key(True, "show a progress bar (only on a terminal)")


@dataclass
class GenerateSection:
    prompt: str = _key("def ", "prompt of the sample generated at the end of training")
    max_new_tokens: int = _key(120, "tokens to generate for that sample (0 = no sample)", check=NON_NEGATIVE)
    temperature: float = _key(0.8, "sampling temperature (0 = greedy)", check=NON_NEGATIVE)
    top_p: float = _key(0.8, "nucleus sampling: sample among the top tokens holding this mass", check=PROBABILITY)


@dataclass
class DistSection:
    bucket_mb: float = _key(
        25.0, "torchrun runs: gradient bucket size in MB (smaller starts reducing sooner)", check=POSITIVE
    )
    zero_stage: int = _key(
        2, "1: all-reduce buckets, shard the optimizer; 2: reduce-scatter, shard gradients too", choices=(1, 2)
    )
    timeout_s: float = _key(300.0, "a collective waiting longer than this fails: a rank died or hung", check=POSITIVE)
    backend: str = _key(
        "auto", "torch.distributed backend: auto (nccl on CUDA, gloo on CPU)", choices=("auto", "nccl", "gloo")
    )


@dataclass
class TrainConfig:
    job_name: str = _key("nano-pycorpus", "name of the run; default folders are runs/{job_name}", check=NON_EMPTY)
    seed: int = _key(0, "seed of initialisation, data order and sampling", check=NON_NEGATIVE)
    device: str = _key("auto", "where to train: auto (cuda if available), cpu or cuda", choices=("auto", "cpu", "cuda"))
    threads: int = _key(0, "CPU threads for torch (0 = all cores)", check=NON_NEGATIVE)
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    lr_scheduler: LRSchedulerSection = field(default_factory=LRSchedulerSection)
    ckpt: CkptSection = field(default_factory=CkptSection)
    log: LogSection = field(default_factory=LogSection)
    generate: GenerateSection = field(default_factory=GenerateSection)
    dist: DistSection = field(default_factory=DistSection)

    @property
    def log_folder(self) -> Path:
        return Path(self.log.folder) if self.log.folder is not None else Path("runs") / self.job_name

    @property
    def checkpoint_folder(self) -> Path:
        return Path(self.ckpt.folder) if self.ckpt.folder is not None else self.log_folder / "checkpoints"


SECTIONS: dict[str, type] = {
    f.name: f.default_factory for f in dataclasses.fields(TrainConfig) if "doc" not in f.metadata
}


def _schema(cls: type) -> dict[str, tuple[dataclasses.Field, Any]]:
    """name -> (field, resolved type) of the documented keys of a config dataclass."""
    hints = typing.get_type_hints(cls)
    return {f.name: (f, hints[f.name]) for f in dataclasses.fields(cls) if "doc" in f.metadata}


_MODEL_TYPES = typing.get_type_hints(InternLMConfig)


def valid_keys() -> list[str]:
    keys = list(_schema(TrainConfig))
    for section, cls in SECTIONS.items():
        keys += [f"{section}.{name}" for name in _schema(cls)]
    return keys + [f"model.{name}" for name in MODEL_FIELDS]


def _suggestion(key: str) -> str:
    valid = valid_keys()
    section, _, leaf = key.rpartition(".")
    same_section = [k for k in valid if k.rpartition(".")[0] == section]
    match = difflib.get_close_matches(key, same_section, 1, 0.6) or difflib.get_close_matches(key, valid, 1, 0.6)
    if not match:  # a leaf without its section (--lr) or misspelt: compare leaf names alone
        by_leaf = {k.rpartition(".")[2]: k for k in reversed(valid)}
        match = [by_leaf[m] for m in difflib.get_close_matches(leaf, list(by_leaf), 1, 0.75)]
    return f"; did you mean '{match[0]}'?" if match else "; see --help for the valid keys"


_BOOLS = {"true": True, "false": False, "yes": True, "no": False, "on": True, "off": False, "1": True, "0": False}


def _type_name(tp: Any) -> str:
    args = typing.get_args(tp)
    if type(None) in args:
        return " or ".join(_type_name(a) for a in args if a is not type(None)) + " or None"
    names = {bool: "a bool (true/false/1/0)", int: "an int", float: "a number", str: "a string", dict: "a dict"}
    return names.get(tp, str(tp))


def _coerce(key: str, value: Any, tp: Any, raw: str | None, where: str) -> Any:
    """value converted to the key's type; raw is the command-line text the value was parsed from."""
    args = typing.get_args(tp)
    if type(None) in args:  # X | None
        if value is None or (raw is not None and raw.strip().lower() in ("none", "null")):
            return None
        (base,) = (a for a in args if a is not type(None))
        return _coerce(key, value, base, raw, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, (int, str)) and str(value).strip().lower() in _BOOLS:
            return _BOOLS[str(value).strip().lower()]
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
        if raw is not None:  # --job_name=123 means the text 123
            return raw
    elif tp is dict:  # --model.rope_scaling='{"rope_type": "linear", "factor": 2}' arrives parsed
        if isinstance(value, dict):
            return value
    raise ConfigError(f"{where}{key} expects {_type_name(tp)}, got {value!r}")


def _set(cfg: TrainConfig, key: str, value: Any, raw: str | None, where: str) -> None:
    section, _, name = key.rpartition(".")
    if not section and name in SECTIONS:
        raise ConfigError(f"{where}'{name}' is a section: set its keys as {name}.<key>; in a file: {name} = dict(...)")
    target = getattr(cfg, section) if section in SECTIONS else cfg if not section else None
    schema = _schema(type(target)) if target is not None else {}
    if name in schema:
        f, tp = schema[name]
        value = _coerce(key, value, tp, raw, where)
        choices, check = f.metadata["choices"], f.metadata["check"]
        if choices and value not in choices:
            raise ConfigError(f"{where}{key} must be one of {', '.join(map(repr, choices))}, got {value!r}")
        if check and value is not None and not check[0](value):
            raise ConfigError(f"{where}{key} must be {check[1]}, got {value!r}")
        setattr(target, name, value)
    elif section == "model" and name in MODEL_FIELDS:
        target.fields[name] = _coerce(key, value, _MODEL_TYPES[name], raw, where)
    else:
        raise ConfigError(f"{where}unknown config key '{key}'{_suggestion(key)}")


def _apply_mapping(cfg: TrainConfig, mapping: dict, where: Callable[[str], str]) -> None:
    for name, value in mapping.items():
        if name in SECTIONS:
            if not isinstance(value, dict):
                kind = type(value).__name__
                raise ConfigError(f"{where(name)}'{name}' is a section: give it as dict(...), not {kind}")
            for key, item in value.items():
                _set(cfg, f"{name}.{key}", item, None, where(f"{name}.{key}"))
        else:
            _set(cfg, name, value, None, where(name))


def _validate(cfg: TrainConfig, where: Callable[[str], str]) -> None:
    """Checks that involve several keys; each key's own constraints were checked when it was set."""
    try:
        model = cfg.model.build()
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{where('model')}model: {e}") from None
    if cfg.data.seq_len > model.context_length:
        raise ConfigError(
            f"{where('data.seq_len')}data.seq_len {cfg.data.seq_len} exceeds the model's "
            f"max_position_embeddings {model.max_position_embeddings}"
            + (f" times its rope_scaling factor: {model.context_length}" if model.rope_scaling else "")
        )
    if cfg.lr_scheduler.eta_min > cfg.optimizer.lr:
        raise ConfigError(
            f"{where('lr_scheduler.eta_min')}lr_scheduler.eta_min {cfg.lr_scheduler.eta_min} exceeds "
            f"optimizer.lr {cfg.optimizer.lr}"
        )


def _config_lines(tree: ast.Module) -> tuple[dict[str, int], set[str]]:
    """Line of each top-level name and of each key of a dict(...) or {...} section; names bound by imports."""
    lines: dict[str, int] = {}
    imported: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            imported |= {(a.asname or a.name).split(".")[0] for a in node.names}
            continue
        if isinstance(node, ast.Assign):
            targets = node.targets
        else:
            targets = [node.target] if isinstance(node, ast.AnnAssign) else []
        for target in targets:
            if not isinstance(target, ast.Name):
                continue
            lines[target.id] = node.lineno
            value = node.value
            if isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id == "dict":
                lines.update({f"{target.id}.{kw.arg}": kw.lineno for kw in value.keywords if kw.arg})
            elif isinstance(value, ast.Dict):
                lines.update({f"{target.id}.{k.value}": k.lineno for k in value.keys if isinstance(k, ast.Constant)})
    return lines, imported


def _read_config_file(path: Path) -> tuple[dict, dict[str, int]]:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    source = path.read_text(encoding="utf-8")
    try:
        tree = ast.parse(source, filename=str(path))
    except SyntaxError as e:
        raise ConfigError(f"{path}:{e.lineno}: syntax error: {e.msg}") from None
    lines, imported = _config_lines(tree)
    namespace: dict[str, Any] = {"__file__": str(path), "__name__": "__config__"}
    try:
        exec(compile(tree, str(path), "exec"), namespace)
    except Exception as e:
        frames = [f for f in traceback.extract_tb(e.__traceback__) if f.filename == str(path)]
        line = frames[-1].lineno if frames else "?"
        raise ConfigError(f"{path}:{line}: {type(e).__name__}: {e}") from e
    values = {
        name: value
        for name, value in namespace.items()
        if not name.startswith("_")
        and name != name.upper()
        and name not in imported
        and not isinstance(value, (types.ModuleType, type, types.FunctionType, types.BuiltinFunctionType))
    }
    return values, lines


def _parse_overrides(overrides: Sequence[str]) -> list[tuple[str, str]]:
    """[(key, raw value)] from `--key=value`, `key=value` or `--key value`."""
    items, pairs, i = list(overrides), [], 0
    while i < len(items):
        item = items[i]
        i += 1
        key, eq, raw = item.removeprefix("--").partition("=")
        if not eq:
            if not (item.startswith("--") and i < len(items) and not items[i].startswith("--")):
                raise ConfigError(f"command line: '{item}' is not --key=value")
            raw, i = items[i], i + 1
        pairs.append((key.strip(), raw))
    return pairs


def _literal(raw: str) -> Any:
    try:
        return ast.literal_eval(raw)
    except Exception:  # not a Python literal (auto, data/corpus, true): the text itself
        return raw


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """The defaults, updated by the config file at `path` (if given), then by the command-line overrides."""
    cfg = TrainConfig()
    origins: dict[str, str] = {}
    if path is not None:
        path = Path(path)
        values, lines = _read_config_file(path)

        def where(key: str) -> str:
            line = lines.get(key, lines.get(key.partition(".")[0]))
            return f"{path}:{line}: " if line else f"{path}: "

        _apply_mapping(cfg, values, where)
        origins.update({key: where(key) for key in lines})
    for key, raw in _parse_overrides(overrides):
        origins[key] = f"command line --{key}: "
        _set(cfg, key, _literal(raw), raw, origins[key])

    def origin(key: str) -> str:  # where the key, its section or the last key of its section was set
        section = key.partition(".")[0]
        in_section = [o for k, o in origins.items() if k.startswith(section + ".")]
        return origins.get(key) or origins.get(section) or (in_section[-1] if in_section else "")

    _validate(cfg, origin)
    return cfg


def config_to_dict(cfg: TrainConfig) -> dict:
    """Plain JSON-serialisable dict, as a config file would write it (model fields inline in `model`)."""
    d = dataclasses.asdict(cfg)
    d["model"].update(d["model"].pop("fields"))
    return d


def config_from_dict(d: dict) -> TrainConfig:
    """The inverse of config_to_dict, validated like a config file (for configs stored in checkpoints)."""
    if not isinstance(d, dict):
        raise ConfigError(f"a config dict is expected, got {type(d).__name__}")
    cfg = TrainConfig()
    _apply_mapping(cfg, d, lambda key: "config dict: ")
    _validate(cfg, lambda key: "config dict: ")
    return cfg


def _help_rows() -> list[tuple[str, str, str]]:
    rows = [(name, repr(f.default), f.metadata["doc"]) for name, (f, _) in _schema(TrainConfig).items()]
    for section, cls in SECTIONS.items():
        rows += [(f"{section}.{name}", repr(f.default), f.metadata["doc"]) for name, (f, _) in _schema(cls).items()]
        if section == "model":
            doc = "any InternLMConfig field, set over the preset: " + ", ".join(MODEL_FIELDS)
            rows.append(("model.<field>", "(preset)", doc))
    return rows


def format_config_help(markdown: bool = False) -> str:
    """Every key with its default and doc: a plain listing for --help, or a Markdown table for the README."""
    rows = _help_rows()
    if markdown:
        lines = ["| key | default | meaning |", "| --- | --- | --- |"]
        return "\n".join(lines + [f"| `{k}` | `{d}` | {doc} |" for k, d, doc in rows])
    width_key, width_default = (max(len(r[i]) for r in rows) for i in (0, 1))
    header = (
        "Config keys: set them in a Python config file (section = dict(key=value)) or on the command line\n"
        "as --key=value, dotted for sections (--optimizer.lr=1e-3). Command line > file > default.\n"
    )
    return header + "\n".join(f"  {k:<{width_key}}  {d:<{width_default}}  {doc}" for k, d, doc in rows)
