"""LoRA for the SFT stage (``--sft-lora-r``), with PEFT's adapter layers.

The adapters go onto the attention and MLP projections of the decoder layers (PEFT's
``inject_adapter_in_model``: the model keeps its class, and the engine's Decoder calls the
wrapped projections unchanged). SFT then trains the adapters and LatentRATT; the base
weights, embeddings and head stay frozen. A saved model always holds plain, merged
weights (W + ΔW) that load without PEFT, plus the adapters themselves
(``lora_adapter.safetensors``, ``lora.json``) so an interrupted SFT resumes exactly from
the same base. Before RL the adapters are merged into the base in place (the same sum),
so RL and evaluation see an ordinary model. With ``--base-quant`` the adapters train over
the quantised base (QLoRA) and the merge adds them to the dequantised weights the SFT
forward used.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from fastlatent.model.quantize import dequantized_weight, forget_quantization

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_FILE, LORA_CONFIG_FILE = "lora_adapter.safetensors", "lora.json"
ADAPTER = "default"


@dataclass(frozen=True)
class LoraSettings:
    r: int
    alpha: float
    dropout: float


def lora_layers(llm: nn.Module) -> dict[str, nn.Module]:
    """Module name -> PEFT LoRA layer, for every adapter in ``llm``."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return {}
    return {name: m for name, m in llm.named_modules() if isinstance(m, LoraLayer)}


def add_lora(llm: nn.Module, settings: LoraSettings) -> int:
    """Inject fresh adapters (A random, B zero: the model is unchanged) and freeze
    everything else of ``llm``; returns the number of adapted projections."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=settings.r, lora_alpha=settings.alpha,
                        lora_dropout=settings.dropout, target_modules=list(TARGETS),
                        bias="none")
    llm.requires_grad_(False)
    inject_adapter_in_model(config, llm)
    layers = lora_layers(llm)
    for layer in layers.values():
        for p in [*layer.lora_A.parameters(), *layer.lora_B.parameters()]:
            p.requires_grad_(True)
    llm.fastlatent_lora = settings
    return len(layers)


def merged_weight(layer: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """W + ΔW of one LoRA layer in ``dtype``, as saving and merging both compute it; W is
    the base's weight as its matmul uses it (dequantised for an 8-bit/NF4 base: QLoRA)."""
    base = dequantized_weight(layer.get_base_layer()).float()
    return (base + layer.get_delta_weight(ADAPTER).detach().float()).to(dtype)


def _dtype(llm: nn.Module) -> torch.dtype:
    return llm.get_input_embeddings().weight.dtype


def merged_state_dict(llm: nn.Module) -> dict[str, torch.Tensor]:
    """``llm``'s state dict as a plain model's: adapters added into their base weights,
    the base layers' own tensors (PEFT's ``base_layer.`` names, bitsandbytes' scales)
    replaced by the merged weight and the bias, adapter tensors left out."""
    out, dtype = {}, _dtype(llm)
    layers = lora_layers(llm)
    for name, layer in layers.items():
        out[f"{name}.weight"] = merged_weight(layer, dtype)
        bias = layer.get_base_layer().bias
        if bias is not None:
            out[f"{name}.bias"] = bias.detach().to(dtype)
    owned = tuple(f"{name}." for name in layers)
    for key, value in llm.state_dict().items():
        if not key.startswith(owned):
            out[key] = value
    return out


def adapter_state(llm: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous() for k, v in llm.state_dict().items() if ".lora_" in k}


def save_adapters(llm: nn.Module, directory: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.cpu() for k, v in adapter_state(llm).items()},
              str(directory / ADAPTER_FILE))
    (directory / LORA_CONFIG_FILE).write_text(
        json.dumps(asdict(llm.fastlatent_lora), indent=2) + "\n")


def load_adapters(llm: nn.Module, directory: Path) -> None:
    """Put saved adapter weights into ``llm`` (which holds adapters of the same shape)."""
    from safetensors.torch import load_file

    from fastlatent.errors import CheckpointError

    path = Path(directory) / ADAPTER_FILE
    try:
        saved = load_file(str(path))
    except Exception as err:  # safetensors raises several types for a damaged file
        raise CheckpointError(f"{path}: the LoRA adapters cannot be read ({err})") from None
    missing = set(adapter_state(llm)) ^ set(saved)
    if missing:
        raise CheckpointError(f"{path}: adapters do not match this model ({sorted(missing)[:3]})")
    llm.load_state_dict(saved, strict=False)


def merge_lora(llm: nn.Module) -> int:
    """Replace every adapted projection by a plain ``nn.Linear`` holding W + ΔW (in
    place; a quantised base becomes full precision again); returns how many."""
    layers = lora_layers(llm)
    dtype = _dtype(llm)
    for name, layer in layers.items():
        base = layer.get_base_layer()
        plain = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                          device=layer.lora_A[ADAPTER].weight.device, dtype=dtype)
        with torch.no_grad():
            plain.weight.copy_(merged_weight(layer, dtype))
            if base.bias is not None:
                plain.bias.copy_(base.bias)
        plain.requires_grad_(False)
        parent_name, _, attr = name.rpartition(".")
        setattr(llm.get_submodule(parent_name) if parent_name else llm, attr, plain)
    if layers:
        forget_quantization(llm)
    if hasattr(llm, "fastlatent_lora"):
        del llm.fastlatent_lora
    return len(layers)
