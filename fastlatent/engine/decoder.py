"""Two-phase forward over a Hugging Face causal LM: encode each prompt once, then score
many suffix rows (K latent samples, or beams) against its KV cache without copying it.

The caches form a tree: the tokens every prompt of the batch starts with (the
instruction, found from the ids) are encoded once, each prompt's own tokens once against
them, and each suffix row against both.

:class:`Decoder` runs the model's own modules (embeddings, norms, q/k/v/o projections,
Qwen3's q/k norms, MLPs, rotary embedding) in its own layer loop, so it matches the
model's forward to float tolerance and works unchanged with quantised linear layers.
Supported families: Llama, Mistral, Qwen2/Qwen2.5, Qwen3. Attention dropout is not
applied (the models are used in eval mode or with ``attention_dropout=0``).

Layout: prompts are left-padded ``[G, L]``; suffix rows are right-padded ``[R, T]`` and
grouped contiguously, ``rows_per_group`` per prompt (row r belongs to prompt
r // rows_per_group). Position ids come from the masks: prompt tokens 0..n-1, suffix
token j of row r at n + (valid suffix tokens before it).

With a common start of C tokens, the prompt level holds each prompt's tokens from
position C on (columns C.. of the left-padded ids, still left-padded, ``L - C`` wide) and
``PrefixCache.common`` the C shared tokens (one group); the prompt level's hidden states
are the whole prompt's, ``[common | own]`` with ``hidden_mask``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from fastlatent.ops.positions import last_real_index, positions_from_mask, rotate_half
from fastlatent.ops.shared_prefix_attention import shared_prefix_attention

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


class UnsupportedModelError(ValueError):
    """The causal LM is not of a family whose layer code :class:`Decoder` reproduces."""


@dataclass
class PrefixCache:
    """The prompts' per-layer keys/values and final hidden states.

    keys, values: per layer [G, Hkv, L, D] (after RoPE, and after k_norm for Qwen3) of
    each prompt's own tokens (all of them without ``common``). mask: [G, L], 1 = real
    own token (left-padded). lengths: [G] real tokens per prompt, common ones included:
    the position of each prompt's first suffix token. hidden: [G, C + L, d] final-norm
    states of the whole prompt (the input of the LM head and of LatentRATT), real where
    ``hidden_mask`` [G, C + L] is 1. common: the batch's shared start (C tokens, one
    group, no ``common`` of its own), or None (C = 0).
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    mask: torch.Tensor
    lengths: torch.Tensor
    hidden: torch.Tensor
    hidden_mask: torch.Tensor
    common: PrefixCache | None = None

    @property
    def num_groups(self) -> int:
        return self.mask.shape[0]

    @property
    def last_hidden(self) -> torch.Tensor:
        """[G, d] the hidden state at each prompt's last real token."""
        rows = torch.arange(self.num_groups, device=self.hidden.device)
        return self.hidden[rows, last_real_index(self.hidden_mask)]

    @property
    def common_length(self) -> int:
        return 0 if self.common is None else self.common.mask.shape[1]

    def select(self, groups: torch.Tensor) -> PrefixCache:
        """The cache of the prompts ``groups`` [G'] (int64), in that order; the common
        start is shared, not copied."""
        return PrefixCache([k[groups] for k in self.keys], [v[groups] for v in self.values],
                           self.mask[groups], self.lengths[groups], self.hidden[groups],
                           self.hidden_mask[groups], self.common)

    def extend(self, hidden: torch.Tensor, cache: SuffixCache) -> PrefixCache:
        """The cache of the prompts followed by their suffix: one suffix row per prompt
        (``rows_per_group = 1``), every slot real (tokens generated after the prompt),
        ``hidden`` [G, T, d] its final-norm states over all the calls that built ``cache``.
        Equals :meth:`Decoder.prefix` of the longer prompts to float tolerance, without
        encoding them again."""
        g, t = cache.valid.shape
        if cache.rows_per_group != 1 or g != self.num_groups or not bool(cache.valid.all()):
            raise ValueError(f"expected a suffix cache of one all-real row per prompt "
                             f"({self.num_groups} rows), got {g} rows, rows_per_group="
                             f"{cache.rows_per_group}, {int((~cache.valid).sum())} holes")
        if hidden.shape[:2] != (g, t):
            raise ValueError(f"expected suffix hidden states [{g}, {t}, d], got "
                             f"{list(hidden.shape)}")
        ones = torch.ones(g, t, dtype=self.mask.dtype, device=self.mask.device)
        return PrefixCache(
            [torch.cat((k, ck), dim=2) for k, ck in zip(self.keys, cache.keys, strict=True)],
            [torch.cat((v, cv), dim=2) for v, cv in zip(self.values, cache.values, strict=True)],
            torch.cat((self.mask, ones), dim=1), self.lengths + t,
            torch.cat((self.hidden, hidden), dim=1),
            torch.cat((self.hidden_mask, ones.to(self.hidden_mask.dtype)), dim=1), self.common)


def common_prefix_length(input_ids: torch.Tensor, mask: torch.Tensor) -> int:
    """The number of leading real tokens that every left-padded prompt [G, L] shares, at
    most the shortest prompt's length and L - 1: the prompt level keeps at least one
    column, which is padding for a prompt made of the common tokens only. 0 for one
    prompt, or when a mask is not left-padded 0..0 1..1."""
    g, length = input_ids.shape
    if g < 2 or length < 2:
        return 0
    real = mask.bool()
    if bool((real[:, 1:] < real[:, :-1]).any()):
        return 0
    n = real.sum(-1)
    limit = min(int(n.min()), length - 1)
    if limit < 1:
        return 0
    cols = (length - n)[:, None] + torch.arange(limit, device=input_ids.device)  # [G, limit]
    starts = input_ids.gather(1, cols)
    differs = (starts != starts[:1]).any(0)
    return int(differs.long().argmax()) if bool(differs.any()) else limit


@dataclass
class SuffixCache:
    """The suffix rows' per-layer keys/values: [R, Hkv, S, D]; ``valid`` [R, S] bool marks
    the real slots (padding and finished beams leave holes)."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    valid: torch.Tensor
    rows_per_group: int

    @property
    def num_rows(self) -> int:
        return self.valid.shape[0]

    def reorder(self, row_index: torch.Tensor) -> SuffixCache:
        """Beam search: row i takes the cache of row ``row_index[i]``, which must lie in
        row i's own group (a beam never moves to another prompt)."""
        rows = torch.arange(self.num_rows, device=self.valid.device)
        if row_index.shape != rows.shape or row_index.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"expected row_index of int64 [{self.num_rows}], got "
                             f"{row_index.dtype} {list(row_index.shape)}")
        row_index = row_index.to(self.valid.device)
        if bool((row_index < 0).any() | (row_index >= self.num_rows).any()):
            raise ValueError(f"expected row_index in [0, {self.num_rows}), got {row_index}")
        if not bool((row_index // self.rows_per_group == rows // self.rows_per_group).all()):
            raise ValueError(f"expected every row_index inside its own group of "
                             f"{self.rows_per_group} rows, got {row_index.tolist()}")
        return self.gather(row_index, self.rows_per_group)

    def gather(self, row_index: torch.Tensor, rows_per_group: int) -> SuffixCache:
        """A cache whose row i is row ``row_index[i]`` of this one, grouped
        ``rows_per_group`` per prompt (beam search: the beams that run at the next step,
        possibly fewer rows and prompts; the caller pairs it with the matching prefix)."""
        return SuffixCache([k[row_index] for k in self.keys], [v[row_index] for v in self.values],
                           self.valid[row_index], rows_per_group)


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, heads, T, D]; cos, sin [B, T, D] from the model's rotary embedding."""
    cos, sin = cos[:, None], sin[:, None]
    return x * cos + rotate_half(x) * sin


def _project(attn: nn.Module, x: torch.Tensor, cos: torch.Tensor,
             sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q [B, H, T, D], k and v [B, Hkv, T, D] of the normed input x [B, T, d], the way the
    HF attention modules compute them (Qwen3: q/k norms on the head dim before RoPE)."""
    shape = (*x.shape[:-1], -1, attn.head_dim)
    q, k = attn.q_proj(x).view(shape), attn.k_proj(x).view(shape)
    v = attn.v_proj(x).view(shape).transpose(1, 2)
    if getattr(attn, "q_norm", None) is not None:
        q, k = attn.q_norm(q), attn.k_norm(k)
    return _apply_rope(q.transpose(1, 2), cos, sin), _apply_rope(k.transpose(1, 2), cos, sin), v


def _expand_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[B, Hkv, L, D] -> [B, Hkv * n_rep, L, D] (query head h reads kv head h // n_rep)."""
    if n_rep == 1:
        return x
    b, hkv, length, d = x.shape
    return x[:, :, None].expand(b, hkv, n_rep, length, d).reshape(b, hkv * n_rep, length, d)


def _sliding_window(llm: nn.Module, layers: nn.ModuleList) -> int | None:
    """The smallest enabled attention window (None: full attention everywhere)."""
    windows = [getattr(layer.self_attn, "sliding_window", None) for layer in layers]
    if llm.config.model_type == "mistral":  # Mistral reads it from the config at runtime
        windows.append(getattr(llm.config, "sliding_window", None))
    return min((w for w in windows if w), default=None)


class Decoder:
    """Prefix/suffix forward of a supported HF causal LM (see module docstring)."""

    def __init__(self, llm: nn.Module):
        model_type = getattr(getattr(llm, "config", None), "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(
                f"expected a causal LM of model_type in {SUPPORTED_MODEL_TYPES}, got "
                f"{model_type!r} ({type(llm).__name__}); use the model's own forward instead")
        body = getattr(llm, "model", None)
        missing = [name for name in ("embed_tokens", "layers", "norm", "rotary_emb")
                   if not hasattr(body, name)]
        if missing or not hasattr(llm, "lm_head"):
            raise UnsupportedModelError(f"{type(llm).__name__} lacks the modules Decoder uses "
                                        f"(model.{missing}, lm_head)")
        self.llm, self.body = llm, body
        self.layers = body.layers[: llm.config.num_hidden_layers]
        self.window = _sliding_window(llm, self.layers)

    # ---- checks ---------------------------------------------------------------------------
    def _check_window(self, positions: torch.Tensor, real: torch.Tensor) -> None:
        """Raise if a real token's position reaches the sliding window (nothing to check,
        and no device sync, for full-attention models)."""
        if self.window is None or not bool(real.any()):
            return
        span = int(positions[real].max()) + 1
        if span > self.window:
            raise ValueError(f"expected sequences within the model's sliding window of "
                             f"{self.window} tokens, got {span} (Decoder does not implement "
                             f"windowed attention)")

    def _check_embeds(self, embeds: torch.Tensor, name: str) -> None:
        d, dtype = self.llm.config.hidden_size, self.body.embed_tokens.weight.dtype
        if embeds.dim() != 3 or embeds.shape[-1] != d or embeds.dtype != dtype:
            raise ValueError(f"expected {name} [rows, tokens, {d}] of dtype {dtype}, got "
                             f"{embeds.dtype} {list(embeds.shape)}")

    def _check_suffix(self, embeds: torch.Tensor, mask: torch.Tensor, prefix: PrefixCache,
                      rows_per_group: int, cache: SuffixCache | None) -> None:
        self._check_embeds(embeds, "inputs_embeds")
        r = embeds.shape[0]
        if mask.shape != embeds.shape[:2]:
            raise ValueError(f"expected suffix_mask {list(embeds.shape[:2])}, got "
                             f"{list(mask.shape)}")
        if rows_per_group < 1 or r != prefix.num_groups * rows_per_group:
            raise ValueError(f"expected rows = prompts * rows_per_group, got {r} rows, "
                             f"{prefix.num_groups} prompts, rows_per_group={rows_per_group}")
        if cache is not None and (cache.num_rows != r or cache.rows_per_group != rows_per_group
                                  or len(cache.keys) != len(self.layers)):
            raise ValueError(f"expected a cache of {r} rows, rows_per_group={rows_per_group} "
                             f"and {len(self.layers)} layers, got {cache.num_rows} rows, "
                             f"rows_per_group={cache.rows_per_group}, {len(cache.keys)} layers")

    # ---- the layer ------------------------------------------------------------------------
    def _run_layers(self, hidden: torch.Tensor, attend) -> torch.Tensor:
        """Pre-norm residual blocks, then the final norm. ``attend(i, attn, x)`` is layer
        i's attention on normed input x [B, T, d], returning [B, T, H*D] before o_proj."""
        for i, layer in enumerate(self.layers):
            hidden = self._layer(layer, hidden, partial(attend, i, layer.self_attn))
        return self.body.norm(hidden)

    @staticmethod
    def _layer(layer: nn.Module, hidden: torch.Tensor, attend) -> torch.Tensor:
        attended = attend(layer.input_layernorm(hidden))
        hidden = hidden + layer.self_attn.o_proj(attended)
        return hidden + layer.mlp(layer.post_attention_layernorm(hidden))

    # ---- phase 1: the prompts -------------------------------------------------------------
    def prefix(self, input_ids: torch.Tensor | None = None,
               attention_mask: torch.Tensor | None = None, *,
               inputs_embeds: torch.Tensor | None = None,
               share_common: bool = True) -> PrefixCache:
        """Encode left-padded prompts [G, L] (ids or embeddings; mask defaults to all real).

        With ids and ``share_common``, the tokens every prompt starts with
        (:func:`common_prefix_length`) are encoded once and each prompt's own tokens
        against them; the result equals the flat encoding to float tolerance.
        Differentiable when called with grad enabled (the common tokens receive the sum
        of every prompt's gradient). Padded positions get finite, meaningless hidden
        states.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("expected exactly one of input_ids and inputs_embeds")
        embeds = self.body.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        self._check_embeds(embeds, "prompt embeddings")
        g, length = embeds.shape[:2]
        mask = (torch.ones(g, length, dtype=torch.long, device=embeds.device)
                if attention_mask is None else attention_mask)
        if mask.shape != (g, length):
            raise ValueError(f"expected attention_mask [{g}, {length}], got {list(mask.shape)}")
        c = (common_prefix_length(input_ids, mask)
             if share_common and input_ids is not None else 0)
        if c == 0:
            return self._encode(embeds, mask)
        start = length - int(mask[0].bool().sum())  # prompt 0's first real column
        common = self._encode(embeds[:1, start:start + c],
                              torch.ones(1, c, dtype=mask.dtype, device=mask.device))
        own_mask = mask[:, :length - c]
        hidden, cache = self.suffix(embeds[:, c:], own_mask, common, g)
        hidden = torch.cat((common.hidden.expand(g, -1, -1), hidden), dim=1)
        hidden_mask = torch.cat((common.mask.expand(g, -1), own_mask), dim=1)
        return PrefixCache(cache.keys, cache.values, own_mask, mask.bool().long().sum(-1),
                           hidden, hidden_mask, common)

    def _encode(self, embeds: torch.Tensor, mask: torch.Tensor) -> PrefixCache:
        """Flat encoding of left-padded prompt embeddings [G, L] (no common level)."""
        g, length = embeds.shape[:2]
        real, positions = mask.bool(), positions_from_mask(mask)
        self._check_window(positions, real)
        cos, sin = self.body.rotary_emb(embeds, positions)
        rows = torch.arange(length, device=embeds.device)
        causal = rows[None, :] <= rows[:, None]  # [L, L]
        allowed = causal & (real[:, None, :] | torch.eye(length, dtype=torch.bool,
                                                         device=embeds.device))
        keys, values = [], []

        def attend(i: int, attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
            q, k, v = _project(attn, x, cos, sin)
            keys.append(k)
            values.append(v)
            n_rep = q.shape[1] // k.shape[1]
            out = nn.functional.scaled_dot_product_attention(
                q, _expand_kv(k, n_rep), _expand_kv(v, n_rep), attn_mask=allowed[:, None],
                scale=attn.scaling)
            return out.transpose(1, 2).reshape(g, length, -1)

        hidden = self._run_layers(embeds, attend)
        return PrefixCache(keys, values, mask, real.long().sum(-1), hidden, mask)

    # ---- phase 2: the suffix rows ---------------------------------------------------------
    def suffix(self, inputs_embeds: torch.Tensor, suffix_mask: torch.Tensor,
               prefix: PrefixCache, rows_per_group: int,
               cache: SuffixCache | None = None) -> tuple[torch.Tensor, SuffixCache]:
        """Run T new tokens of each of R = G * rows_per_group suffix rows.

        inputs_embeds [R, T, d] (the first suffix token is usually the latent ``r``, not a
        token embedding); suffix_mask [R, T], nonzero = real (right-padded). ``cache``: the
        SuffixCache of earlier calls (incremental decoding), None for a new suffix.
        Returns the final-norm hidden states [R, T, d] and the cache extended by the T
        tokens. Differentiable in inputs_embeds, the weights and the prefix cache.
        """
        self._check_suffix(inputs_embeds, suffix_mask, prefix, rows_per_group, cache)
        r, t = suffix_mask.shape
        new_valid = suffix_mask.bool()
        start = prefix.lengths.repeat_interleave(rows_per_group).to(new_valid.device)
        if cache is not None:
            start = start + cache.valid.sum(-1)
        positions = start[:, None] + new_valid.long().cumsum(-1) - new_valid.long()
        self._check_window(positions, new_valid)
        valid = new_valid if cache is None else torch.cat((cache.valid, new_valid), dim=1)
        cos, sin = self.body.rotary_emb(inputs_embeds, positions)
        keys, values = [], []

        def attend(i: int, attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
            q, k, v = _project(attn, x, cos, sin)
            if cache is not None:
                k = torch.cat((cache.keys[i], k), dim=2)
                v = torch.cat((cache.values[i], v), dim=2)
            keys.append(k)
            values.append(v)
            common = {} if prefix.common is None else dict(
                common_k=prefix.common.keys[i], common_v=prefix.common.values[i])
            out = shared_prefix_attention(q, k, v, valid, prefix.keys[i], prefix.values[i],
                                          prefix.mask, rows_per_group, scale=attn.scaling,
                                          **common)
            return out.transpose(1, 2).reshape(r, t, -1)

        hidden = self._run_layers(inputs_embeds, attend)
        return hidden, SuffixCache(keys, values, valid, rows_per_group)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head on final-norm hidden states [..., d] -> [..., V]."""
        return self.llm.lm_head(hidden)
