"""The naive oracle of the exact-match (original GRPO) step: each latent row decoded
alone by Hugging Face ``generate`` under the trie constraint, its reward and the loss
over the written tokens recomputed from full sequences and full logits. Written apart
from the engine: it computes the group advantage itself and imports nothing of
``fastlatent.engine``."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastlatent.data.batch import Batch
from fastlatent.data.trie import TitleTrie
from fastlatent.model.reasoner import LatentReasoner


@dataclass
class NaiveExactMatchOutput:
    loss: torch.Tensor  # scalar, with gradient
    rewards: torch.Tensor  # [B, K] in {0, 1}
    advantages: torch.Tensor  # [B, K]
    answers: list[list[tuple[int, ...]]]  # [B][K] written tokens, ending in EOS


@torch.no_grad()
def naive_greedy_title(reasoner: LatentReasoner, embeds: torch.Tensor,
                       trie: TitleTrie) -> tuple[int, ...]:
    """One row [1, L, d] (prompt then its latents) decoded by ``generate`` with one beam,
    constrained to ``trie``; the tokens through the first EOS."""
    eos = trie.eos_token_id

    def allowed(_: int, generated: torch.Tensor) -> list[int]:
        return trie.allowed(generated.tolist()) or [eos]

    out = reasoner.llm.generate(
        inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
        prefix_allowed_tokens_fn=allowed, num_beams=1, do_sample=False,
        max_new_tokens=trie.max_length, eos_token_id=eos,
        pad_token_id=reasoner.tokenizer.pad_token_id, repetition_penalty=1.0,
        no_repeat_ngram_size=0, min_new_tokens=0, use_cache=True)
    tokens = out[0].tolist()
    return tuple(tokens[:tokens.index(eos) + 1] if eos in tokens else tokens)


def naive_exact_match_rl_step(reasoner: LatentReasoner, batch: Batch, *, k: int,
                              sigma: float, noise: torch.Tensor, trie: TitleTrie,
                              train_llm: bool = False, eps: float = 1e-4
                              ) -> NaiveExactMatchOutput:
    """The loss ``-(1/(B*K)) sum A_bk mean_t log pi(yhat_t | x_b, r_b^k, yhat_<t)`` with
    A the group advantage ``(s - mean_k s) / (std_k s + eps)`` (unbiased std)."""
    b = len(batch)
    with torch.set_grad_enabled(train_llm and torch.is_grad_enabled()):
        hidden = reasoner.prefix_hidden(batch.prompt_ids, batch.prompt_mask)
    r = reasoner.thought(hidden, batch.prompt_mask[:, :-1])  # [B, d]
    latents = r[:, None] + sigma * noise.to(r)  # [B, K, d]
    rewards = torch.zeros(b, k)
    answers: list[list[tuple[int, ...]]] = []
    per_row = []
    for i in range(b):
        ids = batch.prompt_ids[i, :-1][batch.prompt_mask[i, :-1].bool()]
        target = tuple(batch.target_ids[i][batch.target_mask[i].bool()].tolist())
        prompt = reasoner.embed(ids)[None].expand(k, -1, -1)
        ones = torch.ones(k, ids.numel(), dtype=torch.long)
        chain = reasoner.full_sequence_latents(prompt, ones, latents[i]).to(prompt.dtype)
        row_answers = []
        for j in range(k):
            embeds = torch.cat((prompt[j:j + 1], chain[j:j + 1]), dim=1)
            answer = naive_greedy_title(reasoner, embeds.detach(), trie)
            row_answers.append(answer)
            rewards[i, j] = float(answer == target)
            answer_ids = torch.tensor(answer)
            full = torch.cat((embeds, reasoner.embed(answer_ids)[None]), dim=1)
            logits = reasoner.llm(inputs_embeds=full, use_cache=False).logits[0].float()
            first = embeds.shape[1] - 1  # the first answer token is predicted at the last latent
            logp = torch.log_softmax(logits[first:first + len(answer)], dim=-1)
            per_row.append(logp.gather(1, answer_ids[:, None]).mean())
        answers.append(row_answers)
    centered = rewards - rewards.mean(dim=1, keepdim=True)
    advantages = centered / (rewards.std(dim=1, unbiased=True, keepdim=True) + eps)
    loss = -(advantages.flatten() * torch.stack(per_row)).mean()
    return NaiveExactMatchOutput(loss, rewards, advantages, answers)
