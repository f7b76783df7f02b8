"""Naive oracle for shared-prefix attention: the common keys and the prompt copied into
every row, one concatenated key sequence, one full mask, plain softmax in float64."""

from __future__ import annotations

import torch


def naive_shared_prefix_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                  suffix_valid: torch.Tensor, prefix_k: torch.Tensor,
                                  prefix_v: torch.Tensor, prefix_mask: torch.Tensor,
                                  rows_per_group: int, *, scale: float,
                                  common_k: torch.Tensor | None = None,
                                  common_v: torch.Tensor | None = None) -> torch.Tensor:
    """Same contract as ``fastlatent.ops.shared_prefix_attention``; float64 output.

    A query with no visible key at all (a padded query over an empty prompt) gets zeros.
    """
    r, h, t, _ = q.shape
    hkv, s = k.shape[1], k.shape[2]
    n_rep = h // hkv
    keys = torch.cat((prefix_k.repeat_interleave(rows_per_group, 0), k), dim=2).double()
    values = torch.cat((prefix_v.repeat_interleave(rows_per_group, 0), v), dim=2).double()
    prompt_seen = prefix_mask.bool().repeat_interleave(rows_per_group, 0)[:, None, :]
    if common_k is not None:
        keys = torch.cat((common_k.double().expand(r, -1, -1, -1), keys), dim=2)
        values = torch.cat((common_v.double().expand(r, -1, -1, -1), values), dim=2)
        prompt_seen = torch.cat((torch.ones(r, 1, common_k.shape[2], dtype=torch.bool,
                                            device=q.device), prompt_seen), dim=-1)
    keys, values = keys.repeat_interleave(n_rep, 1), values.repeat_interleave(n_rep, 1)
    prompt_seen = prompt_seen.expand(r, t, -1)
    query_at = torch.arange(s - t, s, device=q.device)[:, None]
    causal = torch.arange(s, device=q.device)[None, :] <= query_at  # [T, S]
    suffix_seen = causal[None] & suffix_valid.bool()[:, None, :]
    seen = torch.cat((prompt_seen, suffix_seen), dim=-1)[:, None]  # [R, 1, T, L + S]
    scores = (q.double() @ keys.transpose(-1, -2)) * scale
    any_seen = seen.any(-1, keepdim=True)
    weights = torch.softmax(scores.masked_fill(~(seen | ~any_seen), float("-inf")), dim=-1)
    return (weights * any_seen) @ values
