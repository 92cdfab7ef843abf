"""Weight-only quantization for inference: every projection's linears (q/k/v/o, gate/up/down and
lm_head) held as int8 with fp32 scales (ops.inference.quantize_int8), the embedding and the norms in
float. Decode steps run few_rows_linear_int8; prefill and the forward without a cache dequantize one
projection at a time. The float weights of those linears are released, so the model no longer
trains, and its state dict holds empty tensors in their place."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:
    from .modeling import InternLMForCausalLM

QUANTIZE_METHODS = ("int8",)


def check_quantize(quantize: str | None) -> None:
    """Raises ValueError unless quantize is None or one of QUANTIZE_METHODS."""
    if quantize is not None and quantize not in QUANTIZE_METHODS:
        raise ValueError(f"quantize must be one of {QUANTIZE_METHODS} or None, got {quantize!r}")


def quantize_model(model: InternLMForCausalLM, quantize: str = "int8") -> InternLMForCausalLM:
    """Quantizes the model in place (see the module docstring) and returns it. A lm_head tied to the
    embedding keeps its float weight, which the embedding needs, and decodes on int8 copies too."""
    check_quantize(quantize)
    if quantize is None:
        return model
    if model.quantization is not None:
        raise ValueError(f"the model is already quantized ({model.quantization!r})")
    embedding = model.model.embed_tokens.weight
    for proj in model.projections():
        if not proj.quantized:
            proj.quantize_int8_(release=all(lin.weight is not embedding for lin in proj.linears))
    model.quantization = quantize
    model._inference = None
    return model


def resident_bytes(model: nn.Module) -> int:
    """The bytes of the model's parameters and buffers (shared ones once) and of its projections'
    int8 weights, scales and biases or bf16 inference panels; not the float decoding copies, which are
    made on first use."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    for proj in model.projections():
        held = proj._int8 if proj.quantized else proj._bf16[:2] if proj.laid_out else ()
        tensors.update((id(t), t) for t in held if t is not None)
    return sum(t.numel() * t.element_size() for t in tensors.values())


def quantize_loaded(model: InternLMForCausalLM, quantize: str | None) -> InternLMForCausalLM:
    """from_pretrained's quantize: quantize_model, except that a model read from a folder stored
    quantized with this very method (model.quantized_folder) is returned as it is."""
    check_quantize(quantize)
    if quantize is None or model.quantization == quantize:
        return model
    return quantize_model(model, quantize)
