"""Stage 2, latent GRPO: the LLM is frozen, LatentRATT learns from perplexity rewards.

For each optimiser batch of prompts: K rows per prompt (r^0 = r, r^k = r + sigma*eps),
reward -PPL of the target, advantages computed once per optimiser batch over all its rows
(however it is split into micro-batches and processes), loss of LATENTR3.md Eq. 8, AdamW
with warm-up + cosine, clipping. ``--reward exact-match`` swaps in the original GRPO of the paper's
App. F (each row writes a title; reward 1 if it is the target) and ``--rl-trainable all``
trains the LLM too (its own learning rate).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from fastlatent import distributed
from fastlatent.checkpoint import (
    MODEL_DIR,
    LoadedCheckpoint,
    TrainingState,
    checkpoint_after_step,
    restore_optimisation,
)
from fastlatent.config import RLConfig
from fastlatent.data.batch import EncodedExample, collate
from fastlatent.data.sampling import shuffled_batches
from fastlatent.data.trie import TitleTrie
from fastlatent.engine.generic import step_for
from fastlatent.engine.grpo import grpo_advantages, grpo_loss, sample_noise
from fastlatent.model.reasoner import LatentReasoner
from fastlatent.optim import (
    NonFiniteGuard,
    all_finite,
    clipped_update,
    fitted_warmup,
    make_scheduler,
)
from fastlatent.runlog import StepLog


@dataclass
class RLResult:
    steps: int
    mean_reward_first: float  # mean s^0 of the first step
    mean_reward_last: float  # mean s^0 of the last step
    checkpoint: Path
    warmup_steps: int
    notes: list[str]


@dataclass
class RLBatchResult:
    loss: float
    rewards: torch.Tensor  # [B, K] float32
    advantages: torch.Tensor  # [B, K] float32
    latent_norm: torch.Tensor  # [B] float32 ||r^0||: RL that drives it far from its SFT
    # size takes the LLM off the inputs it was trained on (a sign of divergence)


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


def rl_param_groups(reasoner: LatentReasoner, cfg: RLConfig) -> list[dict]:
    """AdamW's parameter groups: LatentRATT at ``--rl-lr``; with ``--rl-trainable all``
    the LLM too, at ``--rl-llm-lr`` (kept in eval mode: no dropout while it samples)."""
    groups = [{"params": freeze_llm(reasoner), "lr": cfg.rl_lr}]
    if cfg.rl_trainable == "all":
        llm = [p for p in reasoner.llm.parameters()]
        for p in llm:
            p.requires_grad_(True)
        groups.append({"params": llm, "lr": cfg.rl_llm_lr})
    return groups


def load_rl_weights(reasoner: LatentReasoner, directory: Path, cfg: RLConfig) -> None:
    """Put an RL checkpoint's trained weights into ``reasoner``: LatentRATT, and with
    ``--rl-trainable all`` the LLM (the checkpoint then holds the whole model)."""
    if cfg.rl_trainable == "all":
        saved = LatentReasoner.load(directory / MODEL_DIR if (directory / MODEL_DIR).is_dir()
                                    else directory)
        reasoner.llm.load_state_dict(saved.llm.state_dict())
        reasoner.ratt.load_state_dict(saved.ratt.state_dict())
        return
    reasoner.load_ratt(directory)


def accumulate_rl_gradients(reasoner: LatentReasoner, batch: Sequence[EncodedExample],
                            cfg: RLConfig, train_step, generator: torch.Generator,
                            params: Sequence[torch.nn.Parameter] | None = None
                            ) -> RLBatchResult:
    """Backward of the latent GRPO loss of one optimiser ``batch`` (global: the same on
    every process), in one shape: forward (token log-probs and rewards of each
    micro-batch) -> the rewards of the whole batch gathered -> advantages computed once
    over that pool -> loss -> backward. The result equals one full-batch pass in one
    process, however the batch is split into micro-batches and processes.

    The noise for all B*K rows is drawn once from ``generator`` (the same state on every
    process), so a prompt's noise depends on the seed and its place in the batch, not on
    the process. The micro-batches (``--rl-micro-batch``; 0 = each process's share in one
    forward) are dealt over the processes. A process holding one micro-batch keeps its
    forward's graph until the advantages are known. A process holding several cannot keep
    all their graphs (that is what micro-batches save), so it scores them without
    gradient first and runs each again with gradient once the advantages are known: one
    extra no-grad forward per micro-batch, the price of the lower peak memory. Each
    micro-batch's loss is weighted by its share of the prompts and the gradients are
    summed over the processes.
    """
    pad = reasoner.tokenizer.pad_token_id
    d = reasoner.llm.config.hidden_size
    noise = sample_noise(len(batch), cfg.num_samples, d, generator=generator,
                         device=reasoner.device)
    micro = cfg.rl_micro_batch or distributed.rounds(len(batch))
    starts = list(range(0, len(batch), micro))
    mine = [start for _, start in distributed.deal(starts)]
    parts = {start: collate(batch[start:start + micro], pad).to(reasoner.device)
             for start in mine}

    def forward(start: int):
        return train_step(reasoner, parts[start], noise=noise[start:start + micro],
                          sigma=cfg.sigma)

    keep_graphs = len(mine) == 1
    with torch.set_grad_enabled(keep_graphs and torch.is_grad_enabled()):
        outs = {start: forward(start) for start in mine}
    # one gather (a collective under torchrun) for both: rewards [B, K] and ||r0|| [B]
    gathered = gather_rows({start: torch.cat((out.rewards, out.latent_norm[:, None]), 1)
                            for start, out in outs.items()}, starts, reasoner.device)
    rewards, latent_norm = gathered[:, :-1], gathered[:, -1]
    advantages = grpo_advantages(rewards, pool=cfg.advantage)
    loss = 0.0
    for start in mine:
        out = outs[start] if keep_graphs else forward(start)
        rows = slice(start, start + len(parts[start]))
        part = grpo_loss(out.token_logprobs, out.mask, advantages[rows])
        share = len(parts[start]) / len(batch)
        (part * share).backward()
        loss += float(part.detach()) * share
    distributed.all_reduce_gradients(reasoner.ratt.parameters() if params is None else params)
    (loss,) = distributed.sum_floats(loss)
    return RLBatchResult(loss, rewards, advantages, latent_norm)


def gather_rows(local: dict[int, torch.Tensor], starts: Sequence[int],
                device: torch.device) -> torch.Tensor:
    """The rows of every micro-batch (``local``: this process's, by start), concatenated
    in batch order on every process."""
    if distributed.active():
        local = distributed.gather_dealt({start: t.cpu() for start, t in local.items()})
    return torch.cat([local[start].to(device) for start in starts])


def run_rl(reasoner: LatentReasoner, prompts: Sequence[EncodedExample], cfg: RLConfig, *,
           grad_clip: float, output_dir: Path, log: StepLog, seed: int, save_every: int = 0,
           max_nonfinite_steps: int = 3, resume: LoadedCheckpoint | None = None,
           trie: TitleTrie | None = None) -> RLResult:
    """Train LatentRATT (with ``--rl-trainable all``, the LLM too) in place. ``resume``:
    an RL training checkpoint; its trained weights are loaded into ``reasoner`` (which
    must hold the LLM RL started from) and the loop continues from its step with its
    optimiser, schedule and RNG states. ``trie``: the catalogue, for the exact-match
    reward's decoding."""
    if not prompts:
        raise ValueError("RL needs at least one training prompt")
    if cfg.num_samples < 1:
        raise ValueError(f"expected --num-samples >= 1, got {cfg.num_samples}")
    groups = rl_param_groups(reasoner, cfg)
    params = [p for group in groups for p in group["params"]]
    names = {id(p): name for name, p in reasoner.named_parameters()}
    trained = [(names.get(id(p), f"parameter {i}"), p) for i, p in enumerate(params)]
    optimizer = torch.optim.AdamW(groups, lr=cfg.rl_lr, weight_decay=0.0)
    whole_model = cfg.rl_trainable == "all"
    steps_per_epoch = math.ceil(len(prompts) / cfg.rl_batch_size)
    total_steps = steps_per_epoch * cfg.rl_epochs
    if cfg.rl_max_steps > 0:
        total_steps = min(total_steps, cfg.rl_max_steps)
    warmup, note = fitted_warmup(cfg.rl_warmup_steps, total_steps, "rl", cfg.rl_warmup_fit)
    if note and resume is None:
        tqdm.write(f"note: {note}")
    scheduler = make_scheduler(optimizer, "rl", warmup, total_steps)
    generator = torch.Generator().manual_seed(seed)
    train_step = step_for(reasoner, "rl", reward=cfg.reward, trie=trie, train_llm=whole_model)
    checkpoint = output_dir / "rl"
    guard = NonFiniteGuard("rl", max_nonfinite_steps,
                           f"the noise (--sigma {cfg.sigma:g}) or learning rate (--rl-lr "
                           f"{cfg.rl_lr:g}) is too large, so the latent and its perplexity "
                           "reward overflow")
    state = TrainingState("rl", step=0, epoch=0, batch=0,
                          extra=dict(first=math.nan, last=math.nan))
    if resume is None:
        log.write("rl", "start", prompts=len(prompts), total_steps=total_steps,
                  k=cfg.num_samples, sigma=cfg.sigma, advantage=cfg.advantage,
                  reward=cfg.reward, trainable=cfg.rl_trainable, warmup_steps=warmup,
                  note=note)
    else:
        load_rl_weights(reasoner, resume.path, cfg)
        state = restore_optimisation(resume, "rl", optimizer, scheduler, generator)
        log.write("rl", "resume", step=state.step, epoch=state.epoch, batch=state.batch,
                  path=str(resume.path))
    x = state.extra
    bar = tqdm(total=total_steps, initial=state.step, desc="RL", unit="step",
               dynamic_ncols=True, disable=not distributed.is_main())
    try:
        while state.epoch < cfg.rl_epochs and state.step < total_steps:
            epoch = state.epoch
            batches = list(shuffled_batches(prompts, cfg.rl_batch_size, seed + 1000 + epoch))
            for batch in batches[state.batch:]:
                if state.step >= total_steps:
                    break
                started = time.perf_counter()
                out = accumulate_rl_gradients(reasoner, batch, cfg, train_step, generator, params)
                finite = all_finite(out.loss, out.rewards, out.advantages)
                grad_norm, lr, applied = clipped_update(optimizer, scheduler, params, grad_clip,
                                                        finite=finite)
                seconds = time.perf_counter() - started
                state.step, state.batch = state.step + 1, state.batch + 1
                reward0 = float(out.rewards[:, 0].mean())
                x["first"] = reward0 if state.step == 1 else x["first"]
                x["last"] = reward0
                bar.update(1)
                bar.set_postfix(loss=f"{out.loss:.4f}", reward=f"{reward0:.3f}")
                noisy = out.advantages[:, 1:]
                log.write("rl", "step", step=state.step, epoch=epoch, loss=out.loss,
                          reward_r0=reward0, reward_all=float(out.rewards.mean()),
                          reward_std_within=float(out.rewards.std(dim=1).mean())
                          if cfg.num_samples > 1 else 0.0,
                          mean_noisy_advantage=float(noisy.mean()) if noisy.numel() else 0.0,
                          latent_norm_r0=float(out.latent_norm.mean()),
                          grad_norm=grad_norm, lr=lr, prompts=len(batch), skipped=not applied,
                          seconds=round(seconds, 4),
                          # groups whose K rewards are all equal: zero advantage, no signal
                          equal_reward_groups=float((out.rewards == out.rewards[:, :1])
                                                    .all(dim=1).float().mean()))
                guard.update(applied, state.step, {"loss": out.loss, "reward_r0": reward0,
                                                   "grad_norm": grad_norm})
                if state.batch == len(batches):
                    state.epoch, state.batch = epoch + 1, 0
                stage_or_epoch_over = state.batch == 0 or state.step >= total_steps
                if stage_or_epoch_over:
                    guard.check_result(state.step, trained, final=state.step >= total_steps
                                       or state.epoch >= cfg.rl_epochs)
                if stage_or_epoch_over and distributed.is_main():
                    reasoner.save(checkpoint)
                checkpoint_after_step(output_dir, state, reasoner, optimizer, scheduler,
                                      save_every=save_every, log=log, generator=generator,
                                      final=stage_or_epoch_over, whole_model=whole_model)
    finally:  # the bar ends before any error is printed
        bar.close()
    return RLResult(state.step, x["first"], x["last"], checkpoint, warmup,
                    [note] if note else [])
