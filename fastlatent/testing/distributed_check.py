"""One set of training and evaluation computations, run in one process and under
``torchrun`` (``python -m fastlatent.testing.distributed_check OUT``), so the test can
compare what the processes computed with what one process computes.

Each case is small and deliberately uneven: an odd global batch whose micro-batches do not
split evenly over two processes, RL batches whose shares take the one-pass and the
two-pass (micro-batched) paths, evaluation batches that leave one process a batch short.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from fastlatent import distributed
from fastlatent.config import EvalConfig, RLConfig
from fastlatent.data.prompt import PromptBuilder
from fastlatent.data.synthetic import make_synthetic
from fastlatent.engine.generic import step_for
from fastlatent.evaluate import build_title_trie, evaluate, target_nll
from fastlatent.model.loading import load_llm
from fastlatent.model.reasoner import LatentReasoner, ReasonerConfig
from fastlatent.rl import accumulate_rl_gradients, freeze_llm
from fastlatent.sft import accumulate_sft_gradients, validation_loss

SFT_BATCH, SFT_MICRO = 7, 2
RL_BATCH, K = 5, 4
RL_CASES = [(pool, micro) for pool in ("batch", "group") for micro in (0, 2, 4)]
EVAL_USERS, EVAL_BATCH = 5, 2


def build():
    """The tiny reasoner (LatentRATT weights widened so r varies), its prompt builder and
    the synthetic dataset; the same in every process."""
    torch.manual_seed(0)
    dataset = make_synthetic(seed=0)
    llm, tokenizer = load_llm("tiny-random", tokenizer_texts=dataset.catalogue.titles, seed=0)
    reasoner = LatentReasoner.build(llm, tokenizer, ReasonerConfig(latent="ratt"))
    with torch.no_grad():
        gen = torch.Generator().manual_seed(1)
        for p in reasoner.ratt.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return reasoner, PromptBuilder(tokenizer, domain=dataset.domain), dataset


def _grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.detach().clone() for name, p in module.named_parameters()
            if p.grad is not None}


def compute() -> dict[str, object]:
    """Every computation the test compares, as plain tensors and lists."""
    reasoner, builder, dataset = build()
    rows = dataset.split("train")
    encoded = [builder.encode(ex) for ex in rows[:SFT_BATCH]]
    results: dict[str, object] = {}

    reasoner.train()
    loss, tokens = accumulate_sft_gradients(reasoner, encoded, SFT_MICRO,
                                            step_for(reasoner, "sft"))
    results["sft"] = {"loss": loss, "tokens": tokens, "grads": _grads(reasoner)}
    reasoner.zero_grad(set_to_none=True)
    results["valid_loss"] = validation_loss(reasoner, encoded, SFT_MICRO)

    freeze_llm(reasoner)
    prompts = [builder.encode(ex) for ex in rows[SFT_BATCH:SFT_BATCH + RL_BATCH]]
    for pool, micro in RL_CASES:
        cfg = RLConfig(rl_batch_size=RL_BATCH, rl_micro_batch=micro, num_samples=K,
                       sigma=0.5, advantage=pool)
        out = accumulate_rl_gradients(reasoner, prompts, cfg, step_for(reasoner, "rl"),
                                      torch.Generator().manual_seed(7))
        results[f"rl-{pool}-{micro}"] = {
            "loss": out.loss, "rewards": out.rewards.cpu(),
            "advantages": out.advantages.cpu(), "grads": _grads(reasoner.ratt)}
        reasoner.zero_grad(set_to_none=True)

    users = dataset.split("test")[:EVAL_USERS]
    trie = build_title_trie(builder, dataset.catalogue)
    cfg = EvalConfig(num_beams=3, max_new_tokens=24, eval_batch_size=EVAL_BATCH)
    result = evaluate(reasoner, users, builder, trie, cfg, seed=0)
    results["eval"] = {"metrics": result.metrics, "predictions": result.predictions,
                       "nll": target_nll(reasoner, users, builder, EVAL_BATCH)}
    return results


def main(out: str) -> None:
    distributed.init("cpu", timeout_minutes=5)
    try:
        torch.save(compute(), Path(out) / f"rank{distributed.rank()}.pt")
    finally:
        distributed.close()


if __name__ == "__main__":
    main(sys.argv[1])
