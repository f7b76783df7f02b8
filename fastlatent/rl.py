"""Stage 2, latent GRPO: the LLM is frozen, LatentRATT learns from perplexity rewards.

For each optimiser batch of prompts: K rows per prompt (r^0 = r, r^k = r + sigma*eps),
reward -PPL of the target, advantage pooled over each micro-batch (default: the whole
optimiser batch), loss of LATENTR3.md Eq. 8, AdamW with warm-up + cosine, clipping.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from fastlatent.config import RLConfig
from fastlatent.data.batch import EncodedExample, collate
from fastlatent.data.sampling import chunks, shuffled_batches
from fastlatent.engine.steps import step_for
from fastlatent.model.reasoner import LatentReasoner
from fastlatent.optim import clipped_update, warmup_cosine
from fastlatent.runlog import StepLog


@dataclass
class RLResult:
    steps: int
    mean_reward_first: float  # mean s^0 of the first step
    mean_reward_last: float  # mean s^0 of the last step
    checkpoint: Path


def freeze_llm(reasoner: LatentReasoner) -> list[torch.nn.Parameter]:
    """Freeze the LLM (and LM head); return LatentRATT's parameters, the only trainable ones."""
    if reasoner.ratt is None:
        raise ValueError(f"RL trains LatentRATT, but this model has latent="
                         f"{reasoner.config.latent!r}; use --latent ratt")
    reasoner.llm.requires_grad_(False)
    reasoner.llm.eval()
    reasoner.ratt.requires_grad_(True)
    reasoner.ratt.train()
    return list(reasoner.ratt.parameters())


def run_rl(reasoner: LatentReasoner, prompts: Sequence[EncodedExample], cfg: RLConfig, *,
           grad_clip: float, output_dir: Path, log: StepLog, seed: int) -> RLResult:
    if not prompts:
        raise ValueError("RL needs at least one training prompt")
    if cfg.num_samples < 1:
        raise ValueError(f"expected --num-samples >= 1, got {cfg.num_samples}")
    params = freeze_llm(reasoner)
    optimizer = torch.optim.AdamW(params, lr=cfg.rl_lr, weight_decay=0.0)
    steps_per_epoch = math.ceil(len(prompts) / cfg.rl_batch_size)
    total_steps = steps_per_epoch * cfg.rl_epochs
    if cfg.rl_max_steps > 0:
        total_steps = min(total_steps, cfg.rl_max_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(cfg.rl_warmup_steps, total_steps))
    generator = torch.Generator().manual_seed(seed)
    pad = reasoner.tokenizer.pad_token_id
    micro = cfg.rl_micro_batch or cfg.rl_batch_size
    train_step = step_for(reasoner, "rl")
    checkpoint = output_dir / "rl"
    log.write("rl", "start", prompts=len(prompts), total_steps=total_steps, k=cfg.num_samples,
              sigma=cfg.sigma, advantage=cfg.advantage)
    bar = tqdm(total=total_steps, desc="RL", unit="step", dynamic_ncols=True)
    step, first, last = 0, math.nan, math.nan
    for epoch in range(cfg.rl_epochs):
        for batch in shuffled_batches(prompts, cfg.rl_batch_size, seed + 1000 + epoch):
            if step >= total_steps:
                break
            loss_sum, s0, rewards_all = 0.0, [], []
            for part in chunks(batch, micro):
                out = train_step(reasoner, collate(part, pad).to(reasoner.device),
                           k=cfg.num_samples, sigma=cfg.sigma, pool=cfg.advantage,
                           generator=generator)
                (out.loss * len(part) / len(batch)).backward()
                loss_sum += float(out.loss.detach()) * len(part) / len(batch)
                s0.append(out.rewards[:, 0])
                rewards_all.append(out.rewards.flatten())
            grad_norm, lr = clipped_update(optimizer, scheduler, params, grad_clip)
            step += 1
            reward0 = float(torch.cat(s0).mean())
            reward = float(torch.cat(rewards_all).mean())
            first = reward0 if step == 1 else first
            last = reward0
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum:.4f}", reward=f"{reward0:.3f}")
            log.write("rl", "step", step=step, epoch=epoch, loss=loss_sum, reward_r0=reward0,
                      reward_all=reward, grad_norm=grad_norm, lr=lr,
                      prompts=len(batch))
        reasoner.save(checkpoint)
        if step >= total_steps:
            break
    bar.close()
    return RLResult(step, first, last, checkpoint)
