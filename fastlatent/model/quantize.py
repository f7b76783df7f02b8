"""The frozen LLM in 8-bit or NF4 (bitsandbytes) for RL and evaluation: ``--base-quant``.

Every ``nn.Linear`` inside the decoder layers (attention and MLP projections) is replaced
by bitsandbytes' ``Linear8bitLt`` (int8 weights, per-row scales, no outlier threshold) or
``Linear4bit`` (NF4, blocks of 64) holding the same weights; the embeddings, norms and the
LM head stay as they are (the fused log-prob head reads the head's weight directly, and it
is tied to the embeddings in the models used here). The engine's Decoder calls the
projection modules, so it runs over the quantised ones unchanged. Compute dtype: the
model's (``--dtype``: bf16 with the paper preset on GPUs, fp32 on the CPU). Nothing
quantised trains: SFT runs on the full-precision model, RL
trains LatentRATT (fp32) over the quantised LLM.

Saving a quantised model (``LatentReasoner.save``) writes the full-precision LLM it was
made from (``source``), so a saved model never holds lossy weights it was not trained as.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

MODES = ("none", "int8", "nf4")


def quantized_linear(linear: nn.Linear, mode: str, compute_dtype: torch.dtype) -> nn.Module:
    """A bitsandbytes layer computing ``linear`` with ``mode`` weights (frozen)."""
    import bitsandbytes as bnb

    device = linear.weight.device
    weight = linear.weight.data.detach().to("cpu", torch.float32)
    has_bias = linear.bias is not None
    if mode == "int8":
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=has_bias,
                                    has_fp16_weights=False, threshold=0.0)
        layer.weight = bnb.nn.Int8Params(weight.to(compute_dtype), requires_grad=False,
                                         has_fp16_weights=False)
    elif mode == "nf4":
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=has_bias,
                                  compute_dtype=compute_dtype, quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(weight.to(compute_dtype), requires_grad=False,
                                         quant_type="nf4")
    else:
        raise ValueError(f"expected a quantisation mode in {MODES[1:]}, got {mode!r}")
    if has_bias:
        layer.bias = nn.Parameter(linear.bias.data.detach().to(compute_dtype),
                                  requires_grad=False)
    return layer.to(device)  # bitsandbytes quantises when the weight is moved


def quantize_llm(llm: nn.Module, mode: str, *, source: str | Path | None) -> int:
    """Replace the decoder layers' linear projections of ``llm`` in place; returns how
    many. ``source``: a saved LatentReasoner folder holding this LLM in full precision
    (``LatentReasoner.save`` copies its ``llm/`` instead of writing quantised weights)."""
    if mode == "none":
        return 0
    compute_dtype = llm.get_input_embeddings().weight.dtype  # the model's own dtype
    layers = llm.get_decoder().layers
    count = 0
    for layer in layers:
        for name, child in list(layer.named_modules()):
            if not isinstance(child, nn.Linear) or not name:
                continue
            parent_name, _, attr = name.rpartition(".")
            parent = layer.get_submodule(parent_name) if parent_name else layer
            setattr(parent, attr, quantized_linear(child, mode, compute_dtype))
            count += 1
    llm.requires_grad_(False)
    llm.fastlatent_quantized = {"mode": mode, "source": str(source) if source else None}
    return count


def dequantized_weight(layer: nn.Module) -> torch.Tensor:
    """The weight a (possibly bitsandbytes) linear layer computes with, as a plain tensor
    in the layer's compute dtype (exact: what its matmul uses)."""
    weight = layer.weight
    kind = type(weight).__name__
    if kind == "Params4bit":
        import bitsandbytes as bnb

        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state).to(
            layer.compute_dtype or torch.float32)
    if kind == "Int8Params":
        import bitsandbytes as bnb

        dtype = layer.bias.dtype if layer.bias is not None else torch.float32
        scales = weight.SCB if weight.SCB is not None else layer.state.SCB  # moves on use
        return bnb.functional.int8_vectorwise_dequant(weight.data, scales).to(dtype)
    return weight.detach()


def forget_quantization(llm: nn.Module) -> None:
    """Mark ``llm`` as plain again (its quantised layers were all replaced)."""
    if hasattr(llm, "fastlatent_quantized"):
        del llm.fastlatent_quantized


def quantization_of(llm: nn.Module) -> dict | None:
    """``{"mode", "source"}`` when :func:`quantize_llm` changed ``llm``, else None."""
    return getattr(llm, "fastlatent_quantized", None)
