"""Stage 1, SFT warm-up: full fine-tune on -log p(y | x, r) over target + EOS.

Token-weighted cross-entropy over each optimiser batch (micro-batches accumulate),
AdamW, linear warm-up then linear decay, gradient clipping, validation loss after every
epoch, early stopping with patience, and the best checkpoint kept on disk.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from fastlatent import distributed
from fastlatent.checkpoint import (
    LoadedCheckpoint,
    TrainingState,
    checkpoint_after_step,
    restore_optimisation,
)
from fastlatent.config import SFTConfig
from fastlatent.data.batch import EncodedExample, collate
from fastlatent.data.sampling import chunks, shuffled_batches
from fastlatent.engine.generic import step_for
from fastlatent.errors import TrainingStopped
from fastlatent.model.lora import lora_layers
from fastlatent.model.reasoner import LatentReasoner
from fastlatent.optim import NonFiniteGuard, clipped_update, fitted_warmup, make_scheduler
from fastlatent.runlog import StepLog


@dataclass
class SFTResult:
    best_valid_loss: float
    best_epoch: int
    epochs_run: int
    steps: int
    checkpoint: Path
    warmup_steps: int
    notes: list[str]


def validation_loss(reasoner: LatentReasoner, examples: Sequence[EncodedExample],
                    micro_batch: int) -> float:
    """Token-weighted mean NLL over ``examples`` (no gradient); the micro-batches are
    dealt over the processes and the sums reduced."""
    pad = reasoner.tokenizer.pad_token_id
    score = step_for(reasoner, "sft")
    total, tokens = 0.0, 0
    was_training = reasoner.training
    reasoner.eval()
    with torch.no_grad():
        for _, part in distributed.deal(list(chunks(examples, micro_batch))):
            out = score(reasoner, collate(part, pad).to(reasoner.device))
            total, tokens = total + float(out.nll_sum), tokens + out.num_tokens
    reasoner.train(was_training)
    total, tokens = distributed.sum_floats(total, tokens)
    return total / max(1, tokens)


def accumulate_sft_gradients(reasoner: LatentReasoner, batch: Sequence[EncodedExample],
                             micro_batch: int, train_step) -> tuple[float, int]:
    """Backward of the token-weighted mean NLL over the whole optimiser ``batch`` (global:
    the same on every process), in micro-batches of ``micro_batch`` examples dealt over
    the processes: each micro-batch's NLL sum is divided by the batch's token count, and
    the gradients are summed over the processes, so the result equals one full-batch pass
    in one process. Returns (mean NLL of the batch, its target tokens)."""
    pad = reasoner.tokenizer.pad_token_id
    n_tokens = sum(len(ex.target_ids) for ex in batch)
    loss_sum = 0.0
    for _, part in distributed.deal(list(chunks(batch, micro_batch))):
        out = train_step(reasoner, collate(part, pad).to(reasoner.device))
        (out.nll_sum / n_tokens).backward()
        loss_sum += float(out.nll_sum.detach())
    distributed.all_reduce_gradients(reasoner.parameters())
    (loss_sum,) = distributed.sum_floats(loss_sum)
    return loss_sum / n_tokens, n_tokens


def make_optimizer(cfg: SFTConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """AdamW (torch) or bitsandbytes' 8-bit AdamW (``--optim adamw8bit``)."""
    if cfg.optim == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=cfg.sft_lr, weight_decay=cfg.sft_weight_decay)
    return torch.optim.AdamW(params, lr=cfg.sft_lr, weight_decay=cfg.sft_weight_decay)


def run_sft(reasoner: LatentReasoner, train: Sequence[EncodedExample],
            valid: Sequence[EncodedExample], cfg: SFTConfig, *, grad_clip: float,
            output_dir: Path, log: StepLog, seed: int, save_every: int = 0,
            max_nonfinite_steps: int = 3, resume: LoadedCheckpoint | None = None
            ) -> SFTResult:
    """Train in place; returns where the best checkpoint (by validation loss) lies.

    The model in memory is the LAST epoch's; load the checkpoint for the best one.
    ``resume``: an SFT training checkpoint whose model ``reasoner`` already is; the loop
    continues from its step with its optimiser, schedule and RNG states.
    """
    if not train:
        raise ValueError("SFT needs at least one training example")
    if not valid:
        raise ValueError("SFT needs validation examples for early stopping")
    if not lora_layers(reasoner.llm):  # full fine-tuning; with LoRA, add_lora chose
        for p in reasoner.parameters():
            p.requires_grad_(True)
    params = [p for p in reasoner.parameters() if p.requires_grad]
    optimizer = make_optimizer(cfg, params)
    steps_per_epoch = math.ceil(len(train) / cfg.sft_batch_size)
    total_steps = steps_per_epoch * cfg.sft_epochs
    warmup, note = fitted_warmup(cfg.sft_warmup_steps, total_steps, "sft", cfg.sft_warmup_fit)
    if note and resume is None:
        tqdm.write(f"note: {note}")
    scheduler = make_scheduler(optimizer, "sft", warmup, total_steps)
    train_step = step_for(reasoner, "sft")
    checkpoint = output_dir / "sft"
    guard = NonFiniteGuard("sft", max_nonfinite_steps,
                           f"the learning rate (--sft-lr {cfg.sft_lr:g}) is too high for "
                           "this model, or its weights/data hold non-finite values")
    state = TrainingState("sft", step=0, epoch=0, batch=0, extra=dict(
        best=math.inf, best_epoch=-1, bad_epochs=0, stopped=False))
    if resume is None:
        log.write("sft", "start", train=len(train), valid=len(valid),
                  total_steps=total_steps, warmup_steps=warmup, note=note)
    else:
        state = restore_optimisation(resume, "sft", optimizer, scheduler)
        log.write("sft", "resume", step=state.step, epoch=state.epoch, batch=state.batch,
                  path=str(resume.path))
    x = state.extra

    def save(final: bool = False) -> None:
        checkpoint_after_step(output_dir, state, reasoner, optimizer, scheduler,
                              save_every=save_every, log=log, final=final)

    while state.epoch < cfg.sft_epochs and not x["stopped"]:
        epoch = state.epoch
        reasoner.train()
        batches = list(shuffled_batches(train, cfg.sft_batch_size, seed + epoch))
        bar = tqdm(batches[state.batch:], initial=state.batch, total=steps_per_epoch,
                   desc=f"SFT epoch {epoch + 1}/{cfg.sft_epochs}", unit="step",
                   dynamic_ncols=True, disable=not distributed.is_main())
        for batch in bar:
            loss, n_tokens = accumulate_sft_gradients(reasoner, batch, cfg.sft_micro_batch,
                                                      train_step)
            grad_norm, lr, applied = clipped_update(optimizer, scheduler, params, grad_clip,
                                                    finite=math.isfinite(loss))
            state.step, state.batch = state.step + 1, state.batch + 1
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
            log.write("sft", "step", step=state.step, epoch=epoch, loss=loss,
                      grad_norm=grad_norm, lr=lr, examples=len(batch), tokens=n_tokens,
                      skipped=not applied)
            guard.update(applied, state.step, {"loss": loss, "grad_norm": grad_norm})
            if state.batch < steps_per_epoch:
                save()
        bar.close()
        guard.check_result(state.step, reasoner.named_parameters(),
                           final=epoch + 1 >= cfg.sft_epochs)
        valid_loss = validation_loss(reasoner, valid, cfg.sft_micro_batch)
        if not math.isfinite(valid_loss):
            raise TrainingStopped(
                f"SFT epoch {epoch + 1} (step {state.step}): the validation loss is "
                f"{valid_loss} — the model diverged; lower --sft-lr ({cfg.sft_lr:g}) "
                "and start again")
        improved = valid_loss < x["best"]
        log.write("sft", "epoch", epoch=epoch, valid_loss=valid_loss, improved=improved)
        tqdm.write(f"SFT epoch {epoch + 1}: validation loss {valid_loss:.4f}"
                   + (" (best, saved)" if improved else ""))
        if improved:
            x.update(best=valid_loss, best_epoch=epoch, bad_epochs=0)
            if distributed.is_main():
                reasoner.save(checkpoint)
        else:
            x["bad_epochs"] += 1
            if x["bad_epochs"] >= cfg.patience:
                tqdm.write(f"SFT: early stop after epoch {epoch + 1} (patience {cfg.patience})")
                x["stopped"] = True
        state.epoch, state.batch = epoch + 1, 0
        save(final=True)  # the epoch's end: validation done, best model on disk
    distributed.barrier()  # the best model is on disk before any process reloads it
    return SFTResult(x["best"], x["best_epoch"], state.epoch, state.step, checkpoint, warmup,
                     [note] if note else [])
