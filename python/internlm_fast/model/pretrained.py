"""Loading and saving models as Hugging Face folders.

Our model folder is a transformers LLaMA folder: config.json (LlamaForCausalLM, attention_bias true),
model.safetensors (sharded with model.safetensors.index.json past max_shard_size), the tokenizer
(tokenizer.model, tokenizer_config.json, special_tokens_map.json) and generation_config.json. Stock
transformers loads it offline without trust_remote_code.

load_pretrained reads that, transformers LLaMA and InternLM (model_type internlm) folders with .bin or
.safetensors weights (single or sharded), our trainer checkpoints (step-NNNNNNNN/ with trainer.json)
and InternLM training checkpoints (model_tp0_pp{p}.pt). The model is built on the meta device and
the memory-mapped tensors are assigned to it, so weights are in RAM once (and only the pages used);
they keep their stored dtype unless `dtype` is given. With inference=True a bf16 model on the CPU is
built in InternLMForCausalLM.prepare_inference_'s layout instead: each linear weight is read on its
own with plain file reads (safetensors) and laid out as decode panels, so the process never holds the
checkpoint's linear weights beside the panels (see weight_files.UnmappedReader).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from internlm_fast.ops.inference import inference_kernels

from .config import InternLMConfig
from .hf_config import config_from_hf, config_from_trainer_state, config_to_hf, read_json
from .internlm_checkpoint import (
    config_from_model_config_pt,
    derived_fields,
    is_internlm_checkpoint,
    read_internlm_checkpoint,
    to_hf_names,
)
from .modeling import InternLMForCausalLM, rotary_tables
from .projection import WeightRows
from .weight_files import UnmappedReader, check_names_and_shapes, read_tensors, save_sharded, weight_files

DEFAULT_MAX_SHARD_SIZE = "5GB"


def load_model_config(path: str | Path) -> InternLMConfig:
    """The model config of a model folder (config.json) or of a trainer checkpoint (trainer.json)."""
    path = Path(path)
    if (path / "config.json").is_file():
        return config_from_hf(read_json(path / "config.json"), str(path / "config.json"))
    if (path / "trainer.json").is_file():
        return config_from_trainer_state(read_json(path / "trainer.json"), str(path / "trainer.json"))
    if is_internlm_checkpoint(path):
        fields = config_from_model_config_pt(path)
        if fields is None:
            raise ValueError(f"{path}: an InternLM training checkpoint without model_config.pt; give a config")
        tensors, _ = read_internlm_checkpoint(path)
        return InternLMConfig(**{**fields, **derived_fields(tensors)})
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    raise FileNotFoundError(f"{path}: no config.json or trainer.json (not a model folder or trainer checkpoint)")


def load_pretrained(
    path: str | Path,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    config: InternLMConfig | None = None,
    progress: bool = False,
    inference: bool = False,
) -> InternLMForCausalLM:
    """An InternLMForCausalLM (in eval mode) from a model folder, a transformers LLaMA/InternLM folder,
    a trainer checkpoint or an InternLM training checkpoint. `config` overrides the folder's own
    (an InternLM training checkpoint without model_config.pt needs one). inference: a bf16 model in
    the inference layout (see the module docstring)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a folder" if path.exists() else f"{path} does not exist")
    if is_internlm_checkpoint(path):
        if config is None:
            config = load_model_config(path)
        tensors, origin = to_hf_names(*read_internlm_checkpoint(path), config)
    else:
        config = config or load_model_config(path)
        if (path / "trainer.json").is_file() and not (path / "config.json").is_file():
            files = [path / "model.safetensors"]
            if not files[0].is_file():
                raise FileNotFoundError(f"{files[0]} is missing (incomplete trainer checkpoint)")
        else:
            files = weight_files(path)
            if not files:
                raise FileNotFoundError(
                    f"{path}: no weights (model.safetensors, pytorch_model.bin or a sharded index of either)"
                )
        tensors, origin = read_tensors(files)
        from .quantized_folder import load_quantized, read_quantization_config

        if read_quantization_config(path) is not None:  # an int8 folder: its linears never in float
            return load_quantized(config, tensors, origin, dtype=dtype, device=device)
    return model_from_tensors(
        config, tensors, origin, dtype=dtype, device=device, progress=progress, inference=inference
    )


def model_from_tensors(
    config: InternLMConfig,
    tensors: dict[str, torch.Tensor],
    origin: dict[str, Path],
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    progress: bool = False,
    inference: bool = False,
) -> InternLMForCausalLM:
    """The model with `tensors` (HF names) as its weights, assigned without copies where the dtype and
    device already match. Missing, unexpected and mis-shaped tensors are errors naming the file.

    inference=True: the projections that prepare_inference_ would lay out (bf16 on the CPU) get their
    panels straight from the weights, read one at a time from the safetensors file `origin` names
    (another source: the tensor itself, copied, and the dict's entry dropped, so a file's mapping
    goes with its last tensor); their parameters are never made. `tensors` is emptied as it is read."""
    from tqdm import tqdm

    if not inference:
        tensors = dict(tensors)  # the caller's dict stays as it was
    for name in [k for k in tensors if k.endswith("rotary_emb.inv_freq")]:
        del tensors[name]
    with torch.device("meta"):
        model = InternLMForCausalLM(config)
    expected = model.state_dict()
    tied = config.tie_word_embeddings
    if tied:  # one tensor for both; a stored lm_head.weight (some exporters write it) is ignored, as in transformers
        expected.pop("lm_head.weight")
        tensors.pop("lm_head.weight", None)
    check_names_and_shapes({k: v.shape for k, v in expected.items()}, tensors, origin)

    def target(t: torch.Tensor) -> torch.dtype:
        return dtype if dtype is not None and t.is_floating_point() else t.dtype

    module_names = {id(m): n for n, m in model.named_modules()}

    def weight_name(lin: torch.nn.Linear) -> str:
        return "model.embed_tokens.weight" if tied and lin is model.lm_head else f"{module_names[id(lin)]}.weight"

    layout = []
    if inference:
        kernels = inference_kernels(torch.empty(0, dtype=torch.bfloat16, device=device))
        layout = [
            p
            for p in model.projections()
            if p.fits_bf16_layout(kernels)
            and all(target(tensors[weight_name(lin)]) == torch.bfloat16 for lin in p.linears)
        ]
    laid_out = {weight_name(lin) for p in layout for lin in p.linears} - {"model.embed_tokens.weight"}
    state = {}
    bar = tqdm(total=len(tensors), desc="loading", unit="tensor", disable=not (progress and _tty()))
    for name in [k for k in tensors if k not in laid_out]:
        t = tensors[name] if tied and name == "model.embed_tokens.weight" else tensors.pop(name)
        moved = t.to(device=device, dtype=target(t))
        if inference and moved is t and name in origin and origin[name].suffix != ".safetensors":
            moved = t.clone()  # not a view into the file's mapping, which can then go
        state[name] = moved
        bar.update(1)
    model.load_state_dict(state, strict=not (tied or laid_out), assign=True)
    del state
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
        tensors.pop("model.embed_tokens.weight", None)
    reader = UnmappedReader()

    def read(lin: torch.nn.Linear) -> WeightRows:
        name = weight_name(lin)
        held = tensors.pop(name, None)
        rows = reader.rows(origin[name], name) if name in origin else None
        bar.update(name in laid_out)
        if rows is not None and rows.shape == expected[name].shape:
            return rows
        return held if held is not None else model.model.embed_tokens.weight  # a tied lm_head's, assigned above

    model._lay_out_bf16(layout, device, read)
    bar.close()
    model.rotary_cos, model.rotary_sin = rotary_tables(config, device)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"internal error: {', '.join(left)} not initialised by loading")
    return model.eval()


def save_pretrained(
    model: InternLMForCausalLM,
    path: str | Path,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    tokenizer=None,
    dtype: torch.dtype | None = None,
    progress: bool = True,
) -> Path:
    """Write `model` as a transformers LLaMA folder at `path` (created; files of an earlier save there
    are replaced). tokenizer: a data.Tokenizer or the path of a sentencepiece model (or of a folder
    holding tokenizer.model), written so AutoTokenizer loads it; dtype: cast floating-point weights."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if model.quantization is not None:  # an int8 folder: see quantized_folder.py
        from .quantized_folder import quantization_config, quantized_state

        tensors, weights_dtype = quantized_state(model, dtype)
        dtype = None  # the float tensors are cast already; the scales stay fp32
    else:
        tensors = {}
        for name, t in model.state_dict().items():
            if name == "lm_head.weight" and model.config.tie_word_embeddings:
                continue  # stored once, as the embedding (transformers' convention)
            tensors[name] = t.detach()
        floating = [t.dtype for t in tensors.values() if t.is_floating_point()]
        weights_dtype = dtype or (floating[0] if floating else torch.float32)
    save_sharded(path, tensors, max_shard_size, dtype, progress)
    special = {"bos_token_id": 1, "eos_token_id": 2}
    if tokenizer is not None:
        from internlm_fast.data.tokenizer import save_tokenizer_files

        model_file = getattr(tokenizer, "model_path", tokenizer)
        special = save_tokenizer_files(model_file, path)
    hf = config_to_hf(model.config, weights_dtype, special["bos_token_id"], special["eos_token_id"])
    if model.quantization is not None:
        hf["quantization_config"] = quantization_config()
    _write_json(path / "config.json", hf)
    stop = [special["eos_token_id"]] + ([special["eoa_token_id"]] if special.get("eoa_token_id") is not None else [])
    generation = {"bos_token_id": special["bos_token_id"], "eos_token_id": stop if len(stop) > 1 else stop[0]}
    _write_json(path / "generation_config.json", generation)
    return path


@contextmanager
def atomic_output_folder(dst: str | Path, force: bool = False) -> Iterator[Path]:
    """Yields a temporary folder beside `dst`, renamed to `dst` when the block succeeds (removed when it
    fails). A non-empty `dst` is an error unless force, in which case it is replaced as a whole."""
    dst = Path(dst)
    if dst.exists() and not force and (not dst.is_dir() or any(dst.iterdir())):
        raise FileExistsError(f"{dst} exists and is not empty; choose another destination or use --force")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".tmp-{dst.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if dst.exists():  # swap, so there is always either the old or the new folder
        old = dst.with_name(f".old-{dst.name}-{os.getpid()}")
        os.rename(dst, old)
        os.rename(tmp, dst)
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    else:
        os.rename(tmp, dst)


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def _tty() -> bool:
    import sys

    return sys.stderr.isatty()
