"""int8 model folders: a quantized model (quantize_("int8"), from_pretrained(..., quantize="int8"),
convert --quantize int8) saved as it is, and loaded without ever making its linears' float weights.

The folder is a float model folder (pretrained.py) whose quantized linears are stored as int8:

  config.json        the float folder's, plus "quantization_config": {"quant_method": "internlm_fast_int8",
                     "bits": 8, "group_size": 64, "sym": true, "scale_dtype": "float32", "format_version": 1}
  model.safetensors  (or shards + model.safetensors.index.json past max_shard_size), for every
                     quantized linear L (each layer's q/k/v/o_proj and gate/up/down_proj, and an untied
                     lm_head):
                       L.weight        int8 (out, in), q = clamp(round(w / scale), -127, 127)
                       L.weight_scale  float32 (out, ceil(in / 64)), scale = absmax / 127 of each group
                                       of 64 consecutive inputs of an output row
                     and every other tensor (embedding, norms, biases) in float as a float folder has it;
                     W[o, i] = weight[o, i] * weight_scale[o, i // 64]
  tokenizer and generation_config.json as in a float folder.

A lm_head tied to the embedding is not stored: the embedding stays float, and the head's int8 copy is
made from it at load exactly as quantize_ makes it.

Each linear is stored under its own Hugging Face name in the plain (out, in) row-major layout, not as
the few_rows_linear_int8 kernel's panels (q/k/v side by side, 16 columns and 2 inputs interleaved):
the file then says what the weights are to any reader (one line of numpy dequantizes a tensor), and
it outlives changes of the kernel's layout. Laying the panels out again at load is one int8 copy per
projection.

quant_method names this format and no other: the tensors are neither compressed-tensors' nor GPTQ's
nor bitsandbytes', and claiming one of those names would send other loaders down a path that misreads
them. transformers does not read these folders: it warns that it does not know the method, skips it
and would load the int8 values as weights. internlm_fast loads them (from_pretrained, chat, serve),
and convert writes them from any folder it reads.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from internlm_fast.ops.inference import INT8_GROUP, PANEL_COLUMNS, int8_panels, int8_weights

from .hf_config import read_json
from .weight_files import UnmappedReader, check_names_and_shapes

if TYPE_CHECKING:
    from .config import InternLMConfig
    from .modeling import InternLMForCausalLM
    from .projection import Projection

QUANT_METHOD = "internlm_fast_int8"
FORMAT_VERSION = 1
SCALE_SUFFIX = "_scale"  # L.weight -> L.weight_scale


def quantization_config() -> dict:
    """The config.json entry of an int8 folder."""
    return {
        "quant_method": QUANT_METHOD,
        "bits": 8,
        "group_size": INT8_GROUP,
        "sym": True,
        "scale_dtype": "float32",
        "format_version": FORMAT_VERSION,
    }


def read_quantization_config(folder: str | Path) -> dict | None:
    """The quantization_config of folder/config.json, checked to be this module's format; None when the
    folder has no config.json or no quantization_config (a float folder)."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        return None
    q = read_json(path).get("quantization_config")
    if q is None:
        return None
    if not isinstance(q, dict):
        raise ValueError(f"{path}: quantization_config must be an object, got {type(q).__name__}")
    method = q.get("quant_method")
    if method != QUANT_METHOD:
        raise ValueError(
            f"{path}: quantization_config quant_method {method!r} is not supported; internlm_fast reads "
            f"{QUANT_METHOD!r} folders (convert --quantize int8 writes them from a float folder)"
        )
    expected = quantization_config()
    for key in ("bits", "group_size", "sym", "scale_dtype", "format_version"):
        if q.get(key, expected[key]) != expected[key]:
            raise ValueError(
                f"{path}: quantization_config {key} {q[key]!r} is not supported ({QUANT_METHOD} has {expected[key]!r})"
            )
    return q


def _linear_names(model: nn.Module) -> dict[int, str]:
    return {id(m): n for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def _stored_projections(model: InternLMForCausalLM) -> list[Projection]:
    """The projections whose int8 weights the folder holds: all but a lm_head tied to the embedding."""
    tied = model.config.tie_word_embeddings
    return [p for p in model.projections() if not (tied and p is model.head)]


def quantized_state(
    model: InternLMForCausalLM, dtype: torch.dtype | None = None
) -> tuple[dict[str, Tensor], torch.dtype]:
    """The tensors of an int8 folder for a quantized model (see the module docstring), in state dict
    order, and the dtype config.json names: `dtype`, which casts the float tensors, when given, else
    the embedding's (they keep their own, as in a float folder). The int8 weights are copies out of
    the kernel's panels: while saving, the process holds them twice."""
    if model.quantization != "int8":
        raise ValueError(f"the model is not int8-quantized (quantization={model.quantization!r})")
    names = _linear_names(model)
    stored = {}
    for proj in _stored_projections(model):
        panels, scales, _ = proj._int8
        q, s = int8_weights(panels, scales, proj.linears[0].in_features)
        row = 0
        for lin in proj.linears:
            out = lin.out_features
            stored[names[id(lin)]] = (q[row : row + out], s[row : row + out])
            row += out
    float_dtype = dtype or model.model.embed_tokens.weight.dtype
    tensors: dict[str, Tensor] = {}
    for name, t in model.state_dict().items():
        module = name.removesuffix(".weight")
        if name.endswith(".weight") and module in stored:
            tensors[name], tensors[name + SCALE_SUFFIX] = stored[module]
        elif name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue  # the embedding, stored once (transformers' convention)
        else:
            tensors[name] = t.detach().to(dtype) if dtype is not None and t.is_floating_point() else t.detach()
    missing = set(stored) - {n.removesuffix(".weight") for n in tensors}
    if missing:
        raise RuntimeError(f"internal error: quantized linears {sorted(missing)} not in the state dict")
    return tensors, float_dtype


def _checked_scales(s: Tensor, name: str, origin: dict[str, Path]) -> Tensor:
    if not (torch.isfinite(s).all() and (s >= 0).all()):
        raise ValueError(f"{origin[name]}: tensor {name!r} holds negative or non-finite scales")
    return s


def load_quantized(
    config: InternLMConfig,
    tensors: dict[str, Tensor],
    origin: dict[str, Path],
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> InternLMForCausalLM:
    """The int8 model of an int8 folder's tensors (HF names, memory-mapped; origin: the file of each),
    its projections' panels laid out straight from the stored int8 weights: the linears' float
    weights are never made. `dtype` casts the float tensors (else they keep their stored dtype); the
    scales stay fp32. A missing, unexpected, mis-shaped or mistyped tensor is an error naming its
    file and the tensor."""
    from .modeling import InternLMForCausalLM, rotary_tables

    tensors = {k: v for k, v in tensors.items() if not k.endswith("rotary_emb.inv_freq")}
    with torch.device("meta"):
        model = InternLMForCausalLM(config)
    tied = config.tie_word_embeddings
    names = _linear_names(model)
    stored = _stored_projections(model)
    quantized = {names[id(lin)]: lin for proj in stored for lin in proj.linears}
    expected: dict[str, tuple[tuple[int, ...], str]] = {}  # name -> (shape, kind)
    for name, t in model.state_dict().items():
        module = name.removesuffix(".weight")
        if name.endswith(".weight") and module in quantized:
            out, k = t.shape
            expected[name] = ((out, k), "int8")
            expected[name + SCALE_SUFFIX] = ((out, -(-k // INT8_GROUP)), "scale")
        elif not (tied and name == "lm_head.weight"):
            expected[name] = (tuple(t.shape), "float")
    if tied:
        tensors.pop("lm_head.weight", None)  # some exporters write the tied copy; transformers ignores it
    check_names_and_shapes(
        {k: shape for k, (shape, _) in expected.items()}, tensors, origin, ValueError, "int8 folder: "
    )
    for name, t in tensors.items():
        kind = expected[name][1]
        want = {"int8": torch.int8, "scale": torch.float32}.get(kind)
        if want is not None and t.dtype != want:
            raise ValueError(f"{origin[name]}: tensor {name!r} is {t.dtype}; an int8 folder stores it as {want}")
        if kind == "float" and not t.is_floating_point():
            raise ValueError(f"{origin[name]}: tensor {name!r} is {t.dtype}; expected a floating-point tensor")

    float_dtype = dtype or tensors["model.embed_tokens.weight"].dtype
    state = {}
    for name, t in tensors.items():
        if expected[name][1] == "float":
            state[name] = t.to(device=device, dtype=dtype or t.dtype)
    for lin in quantized.values():  # released as quantize_int8_ leaves them: inference only
        lin.weight = nn.Parameter(torch.empty(0, dtype=float_dtype, device=device), requires_grad=False)
    model.load_state_dict(state, strict=False, assign=True)
    del state
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight

    # the int8 bytes read with plain file reads: through the file's mapping, which the float tensors
    # keep alive, every page read would stay resident beside the panels made from it
    reader = UnmappedReader()

    def read(name: str) -> Tensor:
        rows = reader.rows(origin[name], name)
        return tensors[name] if rows is None else rows[:]

    for proj in stored:
        lins = [names[id(lin)] for lin in proj.linears]
        n = sum(lin.out_features for lin in proj.linears)
        if n % PANEL_COLUMNS:
            raise ValueError(
                f"int8 folder: {' + '.join(lins)} have {n} output features together, not whole panels of "
                f"{PANEL_COLUMNS}: few_rows_linear_int8 cannot hold them"
            )
        qs = [read(f"{name}.weight") for name in lins]
        q = qs[0] if len(qs) == 1 else torch.cat(qs)
        del qs
        s = torch.cat(
            [
                _checked_scales(read(f"{name}.weight{SCALE_SUFFIX}"), f"{name}.weight{SCALE_SUFFIX}", origin)
                for name in lins
            ]
        )
        panels, scales = int8_panels(q.to(device), s.to(device))
        del q
        bias = torch.cat([lin.bias for lin in proj.linears]).detach() if proj.linears[0].bias is not None else None
        proj._key = proj._copies = None
        proj._int8 = (panels, scales, bias)
    if tied:
        model.head.quantize_int8_(release=False)
    model.quantization = "int8"
    model._inference = None
    model.rotary_cos, model.rotary_sin = rotary_tables(config, device)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"internal error: {', '.join(left)} not initialised by loading")
    return model.eval()
