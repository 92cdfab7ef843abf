"""InternLM training checkpoints (the format of InternLM's own trainer) -> our (Hugging Face) names.

A checkpoint folder holds `model_tp{t}_pp{p}.pt` (one state dict per tensor- and pipeline-parallel
rank) and usually `model_config.pt`. Keys, with or without a `model.` prefix:
  embedding.weight (or embedding.word_embeddings.weight, tok_embeddings.weight), norm.weight, head.weight,
  blocks.{i}.mixer.Wqkv.{weight,bias}    q, k and v packed as (3, heads, head_dim, hidden)
  blocks.{i}.mixer.out_proj.{weight,bias}
  blocks.{i}.mlp.w1 / w2 / w3.weight     gate, up, down
  blocks.{i}.norm1 / norm2.weight        before attention / before the MLP
  blocks.{i}.mixer.rotary_emb.inv_freq   (a buffer; ignored)
Each pipeline stage numbers its blocks from 0; stage p's blocks follow stage p-1's.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from .config import InternLMConfig
from .weight_files import read_tensors

_SHARD = re.compile(r"^model_tp(\d+)_pp(\d+)\.pt$")
_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")
_EMBEDDINGS = ("embedding.weight", "embedding.word_embeddings.weight", "tok_embeddings.weight")
_BLOCK_KEYS = {
    "mixer.out_proj.weight": "self_attn.o_proj.weight",
    "mixer.out_proj.bias": "self_attn.o_proj.bias",
    "mlp.w1.weight": "mlp.gate_proj.weight",
    "mlp.w2.weight": "mlp.up_proj.weight",
    "mlp.w3.weight": "mlp.down_proj.weight",
    "norm1.weight": "input_layernorm.weight",
    "norm2.weight": "post_attention_layernorm.weight",
}


def is_internlm_checkpoint(folder: Path) -> bool:
    return folder.is_dir() and any(_SHARD.match(p.name) for p in folder.iterdir())


def pipeline_shards(folder: Path) -> list[Path]:
    """The model_tp0_pp{p}.pt files in pipeline order; tensor parallelism is not supported."""
    found = {}
    for p in folder.iterdir():
        m = _SHARD.match(p.name)
        if m:
            found[(int(m.group(1)), int(m.group(2)))] = p
    if not found:
        raise FileNotFoundError(f"{folder}: no model_tp*_pp*.pt files (not an InternLM training checkpoint)")
    tps = sorted({tp for tp, _ in found})
    if tps != [0]:
        raise ValueError(
            f"{folder}: tensor-parallel shards (tp ranks {tps}) are not supported; merge them to tp=1 with "
            "InternLM's tools first"
        )
    pps = sorted(pp for _, pp in found)
    if pps != list(range(len(pps))):
        raise ValueError(f"{folder}: pipeline shards {pps} are not 0..{len(pps) - 1}; a shard file is missing")
    return [found[(0, pp)] for pp in pps]


def config_from_model_config_pt(folder: Path) -> dict | None:
    """InternLMConfig fields from InternLM's model_config.pt, or None if the folder has none."""
    path = folder / "model_config.pt"
    if not path.is_file():
        return None
    try:
        mc = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: cannot load ({e})") from None
    names = {
        "vocab_size": "vocab_size",
        "hidden_size": "hidden_size",
        "num_attention_heads": "num_attention_heads",
        "num_layers": "num_hidden_layers",
        "layer_norm_epsilon": "rms_norm_eps",
        "rope_base": "rope_theta",
        "max_position_embeddings": "max_position_embeddings",
    }
    return {ours: mc[theirs] for theirs, ours in names.items() if theirs in mc}


def read_internlm_checkpoint(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Path]]:
    """All pipeline shards merged, blocks renumbered globally, `model.` prefixes dropped (still
    InternLM's names); and name -> the shard file it came from."""
    merged: dict[str, torch.Tensor] = {}
    origin: dict[str, Path] = {}
    offset = 0
    for shard in pipeline_shards(folder):
        tensors, _ = read_tensors([shard])
        local = set()
        for key, t in tensors.items():
            name = key.removeprefix("model.")
            m = _BLOCK.match(name)
            if m:
                local.add(int(m.group(1)))
                name = f"blocks.{int(m.group(1)) + offset}.{m.group(2)}"
            if name in merged:
                raise ValueError(f"{shard}: {key!r} is also in {origin[name]}")
            merged[name], origin[name] = t, shard
        if local and sorted(local) != list(range(len(local))):
            raise ValueError(f"{shard}: block indices {sorted(local)} are not 0..{len(local) - 1}")
        offset += len(local)
    return merged, origin


def derived_fields(tensors: dict[str, torch.Tensor]) -> dict:
    """Config fields the tensors themselves fix: vocab, hidden and intermediate sizes, layer count."""
    fields = {"num_hidden_layers": len({k.split(".")[1] for k in tensors if k.startswith("blocks.")})}
    emb = next((tensors[k] for k in _EMBEDDINGS if k in tensors), None)
    if emb is not None:
        fields["vocab_size"], fields["hidden_size"] = emb.shape
    if "blocks.0.mlp.w1.weight" in tensors:
        fields["intermediate_size"] = tensors["blocks.0.mlp.w1.weight"].shape[0]
    return fields


def to_hf_names(
    tensors: dict[str, torch.Tensor], origin: dict[str, Path], config: InternLMConfig
) -> tuple[dict[str, torch.Tensor], dict[str, Path]]:
    """InternLM names -> our (HF) names, Wqkv unpacked into q/k/v. Unknown keys are an error naming
    the shard file; missing ones are left for the caller's check against the model."""
    if config.num_key_value_heads != config.num_attention_heads:
        raise ValueError("InternLM training checkpoints pack q/k/v for as many k/v heads as attention heads (no GQA)")
    heads, d, h = config.num_attention_heads, config.head_dim, config.hidden_size
    out: dict[str, torch.Tensor] = {}
    where: dict[str, Path] = {}
    for key, t in tensors.items():
        src = origin[key]
        m = _BLOCK.match(key)
        if key in _EMBEDDINGS:
            names = {"model.embed_tokens.weight": t}
        elif key == "norm.weight":
            names = {"model.norm.weight": t}
        elif key == "head.weight":
            names = {"lm_head.weight": t}
        elif m and m.group(2) in _BLOCK_KEYS:
            names = {f"model.layers.{m.group(1)}.{_BLOCK_KEYS[m.group(2)]}": t}
        elif m and m.group(2) in ("mixer.Wqkv.weight", "mixer.Wqkv.bias"):
            kind = m.group(2).rsplit(".", 1)[1]
            packed = (3, heads, d, h) if kind == "weight" else (3, heads, d)
            if t.numel() != torch.Size(packed).numel():
                raise ValueError(
                    f"{src}: {key} has shape {tuple(t.shape)}, which does not hold 3 x {heads} heads x {d} dims"
                    + (f" x hidden {h}" if kind == "weight" else "")
                    + " (check num_attention_heads / hidden_size of the config)"
                )
            q, k, v = t.reshape(packed).unbind(0)
            shape = (heads * d, h) if kind == "weight" else (heads * d,)
            prefix = f"model.layers.{m.group(1)}.self_attn"
            names = {f"{prefix}.{p}_proj.{kind}": x.reshape(shape) for p, x in zip("qkv", (q, k, v))}
        elif m and m.group(2) == "mixer.rotary_emb.inv_freq":
            continue
        else:
            raise ValueError(f"{src}: unexpected tensor {key!r} for an InternLM training checkpoint")
        out.update(names)
        where.update(dict.fromkeys(names, src))
    return out, where
