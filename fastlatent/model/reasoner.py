"""LatentReasoner: a Hugging Face causal LM + LatentRATT + the thought token.

The prompt ends in the thought token (prompts are left-padded, so it sits in the last
column of every row). Its input embedding is replaced by ``r``, which LatentRATT computes
from the LLM's final-norm hidden states of the prompt without that column.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from fastlatent.data.tokenizer import THOUGHT_TOKEN, add_thought_token
from fastlatent.errors import CheckpointError
from fastlatent.model.latent_ratt import LatentRATT
from fastlatent.model.lora import lora_layers, merged_state_dict, save_adapters
from fastlatent.model.quantize import quantization_of
from fastlatent.ops.positions import last_real_index, positions_from_mask

LATENT_MODES = ("ratt", "last-hidden", "none")
FORMAT_VERSION = 1
CONFIG_FILE, RATT_FILE, LLM_DIR = "fastlatent.json", "latent_ratt.safetensors", "llm"
CATALOGUE_FILE = "catalogue.json"


@dataclass
class ReasonerConfig:
    latent: str = "ratt"  # ratt | last-hidden | none
    ratt_heads: int = 1
    ratt_rope_base: float = 1000.0
    num_latents: int = 1  # latent tokens in a row (paper App. E); the release uses 1
    thought_token: str = THOUGHT_TOKEN
    thought_token_id: int = -1  # set by LatentReasoner.build when a latent is used

    def __post_init__(self):
        if self.latent not in LATENT_MODES:
            raise ValueError(f"expected latent in {LATENT_MODES}, got {self.latent!r}")
        if self.latent != "none" and self.num_latents < 1:
            raise ValueError(f"expected num_latents >= 1 with latent={self.latent!r}, got "
                             f"{self.num_latents} (no latent at all is latent='none')")


class LatentReasoner(nn.Module):
    def __init__(self, llm: nn.Module, tokenizer, config: ReasonerConfig,
                 ratt: LatentRATT | None = None):
        super().__init__()
        self.llm, self.tokenizer, self.config = llm, tokenizer, config
        if config.latent == "ratt" and ratt is None:
            raise ValueError("latent='ratt' needs a LatentRATT module")
        self.ratt = ratt.float() if ratt is not None else None
        # What recommending from a saved model needs besides weights: the catalogue's
        # titles and the prompt's wording ({"titles", "template", "domain",
        # "release_domain"}); saved beside the weights as catalogue.json when set.
        self.catalogue: dict | None = None

    @classmethod
    def build(cls, llm: nn.Module, tokenizer, config: ReasonerConfig) -> LatentReasoner:
        """Add the thought token (resizing the embeddings) and a fresh LatentRATT."""
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        ratt = None
        if config.latent != "none":
            config.thought_token_id = add_thought_token(tokenizer)
            if llm.get_input_embeddings().num_embeddings < len(tokenizer):
                llm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        if config.latent == "ratt":
            ratt = LatentRATT(llm.config.hidden_size, config.ratt_heads, config.ratt_rope_base)
            ratt.to(llm.device)
        return cls(llm, tokenizer, config, ratt)

    # ---- properties --------------------------------------------------------------
    @property
    def uses_latent(self) -> bool:
        return self.config.latent != "none"

    @property
    def device(self) -> torch.device:
        return self.llm.get_input_embeddings().weight.device

    @property
    def body(self) -> nn.Module:
        """The LLM's transformer body (HF ``base_model``: no LM head), whose output is the
        final-norm hidden state. Not the engine's :class:`fastlatent.engine.decoder.Decoder`."""
        body = self.llm.base_model
        if body is self.llm:
            raise ValueError(f"{type(self.llm).__name__} exposes no separate transformer body "
                             "(base_model); fastlatent needs a causal LM with one")
        return body

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if self.ratt is not None:  # fp32 master weights whatever the LLM's dtype
            for p in self.ratt.parameters():
                if p.dtype != torch.float32:
                    p.data = p.data.float()
        return self

    # ---- the latent ----------------------------------------------------------------
    def check_prompt(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> None:
        if prompt_ids.dim() != 2 or prompt_ids.shape != prompt_mask.shape:
            raise ValueError(f"expected prompt_ids and prompt_mask [B, L] of one shape, got "
                             f"{tuple(prompt_ids.shape)} and {tuple(prompt_mask.shape)}")
        if not self.uses_latent:
            return
        last = prompt_ids[:, -1]
        if not bool((last == self.config.thought_token_id).all() & prompt_mask[:, -1].bool().all()):
            raise ValueError("with a latent, prompts must be left-padded and end in the thought "
                             f"token {self.config.thought_token!r} "
                             f"(id {self.config.thought_token_id}) in every row")

    def prefix_hidden(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
        """Final-norm hidden states [B, L', d] of the prompt, thought column excluded."""
        ids, mask = (prompt_ids[:, :-1], prompt_mask[:, :-1]) if self.uses_latent else (
            prompt_ids, prompt_mask)
        out = self.body(input_ids=ids, attention_mask=mask,
                        position_ids=positions_from_mask(mask), use_cache=False)
        return out.last_hidden_state

    def thought(self, hidden: torch.Tensor, mask: torch.Tensor, *,
                noise: torch.Tensor | None = None, sigma: float = 0.0) -> torch.Tensor:
        """r [B, d] float32 from prefix hidden states (``mask`` without the thought column);
        with ``noise`` [B, K, d], the K-way expansion r + sigma * noise [B, K, d]."""
        if self.config.latent == "ratt":
            return self.ratt(hidden, mask, noise=noise, sigma=sigma)
        if self.config.latent == "last-hidden":
            rows = torch.arange(hidden.shape[0], device=hidden.device)
            r = hidden[rows, last_real_index(mask)].float()
            return r if noise is None else r[:, None] + sigma * noise.to(r)
        raise ValueError("this model has no latent (latent='none')")

    def latent(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
        self.check_prompt(prompt_ids, prompt_mask)
        return self.thought(self.prefix_hidden(prompt_ids, prompt_mask), prompt_mask[:, :-1])

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.llm.get_input_embeddings()(ids)

    def full_sequence_latents(self, prompt_embeds: torch.Tensor, prompt_mask: torch.Tensor,
                              first: torch.Tensor) -> torch.Tensor:
        """The ``num_latents`` latents of each row [R, N, d] float32, straightforwardly
        (full forwards of the model's own body; the engine does the same against a cache).

        ``prompt_embeds`` [R, L', d] / ``prompt_mask`` [R, L']: the prompt without the
        thought column; ``first`` [R, d]: latent 1 (r, or r + sigma*eps in RL). Latent j+1
        is :meth:`thought` over the final hidden states of [prompt, latents 1..j] with the
        query at latent j's position; only latent 1 carries noise (paper App. E).
        """
        latents = [first.float()]
        for _ in range(1, self.config.num_latents):
            embeds = torch.cat((prompt_embeds, torch.stack(latents, 1).to(prompt_embeds)), 1)
            mask = torch.cat((prompt_mask, prompt_mask.new_ones(len(first), len(latents))), 1)
            hidden = self.body(inputs_embeds=embeds, attention_mask=mask,
                               position_ids=positions_from_mask(mask),
                               use_cache=False).last_hidden_state
            latents.append(self.thought(hidden, mask))
        return torch.stack(latents, 1)

    def prompt_inputs(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                      r: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Input embeddings and mask of the prompt as the LLM reads it: with a latent, the
        thought column is replaced by the ``num_latents`` latents ([B, L - 1 + N, d]);
        without, the token embeddings [B, L, d]. ``r`` [B, d] overrides latent 1."""
        self.check_prompt(prompt_ids, prompt_mask)
        emb = self.embed(prompt_ids)
        if not self.uses_latent:
            return emb, prompt_mask
        if r is None:
            r = self.latent(prompt_ids, prompt_mask)
        latents = self.full_sequence_latents(emb[:, :-1], prompt_mask[:, :-1], r)
        mask = torch.cat((prompt_mask[:, :-1],
                          prompt_mask.new_ones(len(r), self.config.num_latents)), 1)
        return torch.cat((emb[:, :-1], latents.to(emb.dtype)), dim=1), mask

    def prompt_embeds(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                      r: torch.Tensor | None = None) -> torch.Tensor:
        """Input embeddings [B, L, d] of the prompt; with a latent, the thought column holds
        ``r`` (computed here when not given). One latent only: see :meth:`prompt_inputs`."""
        if self.uses_latent and self.config.num_latents != 1:
            raise ValueError(f"prompt_embeds keeps the prompt's length, which holds one "
                             f"latent; this model has {self.config.num_latents}: use "
                             "prompt_inputs, which also returns the longer mask")
        return self.prompt_inputs(prompt_ids, prompt_mask, r)[0]

    # ---- checkpoints -----------------------------------------------------------------
    def save(self, directory: str | os.PathLike) -> Path:
        """Write LLM (save_pretrained), tokenizer, LatentRATT (safetensors) and config.
        A quantised LLM (``--base-quant``) is written as the full-precision LLM it was
        made from (copied from its source folder).

        Atomic: everything goes to a temporary sibling directory that replaces
        ``directory`` only once complete, so a crash never leaves a half checkpoint.
        """
        target = Path(directory)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        quantized = quantization_of(self.llm)
        lora = bool(lora_layers(self.llm))
        if lora or quantized is None:
            # with LoRA: plain merged weights, and the adapters to resume SFT from
            merged = merged_state_dict(self.llm) if lora else None
            self.llm.save_pretrained(tmp / LLM_DIR, state_dict=merged)
            self.tokenizer.save_pretrained(tmp / LLM_DIR)
            if lora:
                save_adapters(self.llm, tmp)
        elif quantized["source"] and (Path(quantized["source"]) / LLM_DIR).is_dir():
            shutil.copytree(Path(quantized["source"]) / LLM_DIR, tmp / LLM_DIR)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(f"this model's LLM is quantised ({quantized['mode']}) and "
                                  f"its full-precision source {quantized['source']} is gone; "
                                  "save the model before quantising it")
        if self.ratt is not None:
            self.save_ratt(tmp)
        meta = {"format_version": FORMAT_VERSION, "hidden_size": self.llm.config.hidden_size,
                **asdict(self.config)}
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        if self.catalogue is not None:
            (tmp / CATALOGUE_FILE).write_text(
                json.dumps(self.catalogue, ensure_ascii=False) + "\n", encoding="utf-8")
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
        return target

    def save_ratt(self, directory: str | os.PathLike) -> Path:
        """Write LatentRATT's fp32 weights to ``directory/latent_ratt.safetensors`` (what a
        checkpoint and an RL training checkpoint hold of it)."""
        from safetensors.torch import save_file

        path = Path(directory) / RATT_FILE
        save_file({k: v.detach().float().contiguous().cpu()
                   for k, v in self.ratt.state_dict().items()}, str(path))
        return path

    def load_ratt(self, directory: str | os.PathLike) -> None:
        """Load LatentRATT's weights saved by :meth:`save_ratt` (same shapes)."""
        load_ratt_state(self.ratt, directory)

    @classmethod
    def load(cls, directory: str | os.PathLike, *, dtype: str | None = None) -> LatentReasoner:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from fastlatent.model.loading import DTYPES

        src = Path(directory)
        meta = read_checkpoint_config(src)
        hidden_size = meta.pop("hidden_size")
        meta.pop("format_version")
        config = ReasonerConfig(**meta)
        kwargs = {"dtype": DTYPES[dtype]} if dtype else {}
        try:
            llm = AutoModelForCausalLM.from_pretrained(src / LLM_DIR, **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(src / LLM_DIR)
        except Exception as err:  # transformers/safetensors raise many types here
            raise CheckpointError(f"{src / LLM_DIR}: the checkpoint's LLM cannot be loaded "
                                  f"({type(err).__name__}: {err})") from None
        ratt = None
        if config.latent == "ratt":
            ratt = LatentRATT(hidden_size, config.ratt_heads, config.ratt_rope_base)
            load_ratt_state(ratt, src)
        reasoner = cls(llm, tokenizer, config, ratt)
        if (src / CATALOGUE_FILE).is_file():
            try:
                reasoner.catalogue = json.loads((src / CATALOGUE_FILE).read_text("utf-8"))
            except ValueError as err:
                raise CheckpointError(f"{src / CATALOGUE_FILE}: unreadable ({err})") from None
        return reasoner


def read_checkpoint_config(directory: str | os.PathLike) -> dict:
    """The ``fastlatent.json`` of a saved LatentReasoner, checked; a missing, truncated or
    foreign file is a :class:`CheckpointError` naming it."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{Path(directory)} is not a fastlatent checkpoint (no "
                              f"{CONFIG_FILE}); pass the directory LatentReasoner.save wrote, "
                              "e.g. OUTPUT_DIR/sft")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: unreadable ({err}); the checkpoint is damaged") from None
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        version = meta.get("format_version") if isinstance(meta, dict) else None
        raise CheckpointError(f"{path}: checkpoint format {version} is not the supported "
                              f"{FORMAT_VERSION}")
    fields = {f.name for f in dataclasses.fields(ReasonerConfig)}
    unknown = set(meta) - fields - {"format_version", "hidden_size"}
    if unknown or "hidden_size" not in meta:
        raise CheckpointError(f"{path}: unexpected contents (unknown keys {sorted(unknown)} "
                              f"or no hidden_size); the checkpoint is damaged")
    return meta


def load_ratt_state(ratt: LatentRATT, directory: str | os.PathLike) -> None:
    """Load ``directory/latent_ratt.safetensors`` into ``ratt``; a missing or damaged file
    is a :class:`CheckpointError` naming it."""
    from safetensors.torch import load_file

    path = Path(directory) / RATT_FILE
    try:
        ratt.load_state_dict(load_file(str(path)))
    except Exception as err:  # safetensors and torch raise many types for a bad file
        raise CheckpointError(f"{path}: LatentRATT cannot be loaded "
                              f"({type(err).__name__}: {err})") from None
