"""One RL optimiser step per reward (the paper's Figure 4): the PPL reward of latent GRPO
against the exact-match reward of the original GRPO (decoded answers), on LatentRATT and
on the whole model. The tiny random model on the CPU; SmolLM2-135M's shape (random
weights, bf16) at 32 prompts x K = 8 on a GPU. ``benchmarks/grpo_cost.py`` prints the
same steps' ratios in one interleaved run."""

from __future__ import annotations

import argparse
import copy

import pytest
import torch
from conftest import device, timed
from grpo_cost import PATHS, build, step_function


@pytest.fixture(scope="module")
def setup():
    dev = device()
    cuda = dev.type == "cuda"
    args = argparse.Namespace(
        model="smollm2-135m-random" if cuda else "tiny-random", data="synthetic",
        train_split="train", template="default", prompts=32 if cuda else 4, num_samples=8,
        sigma=1.5,
        dtype="bfloat16" if cuda else "float32", device=str(dev))
    return args, *build(args)


@pytest.mark.parametrize("provider", list(PATHS))
def test_grpo_step(benchmark, setup, provider):
    args, reasoner, rows, trie = setup
    reward, trainable = PATHS[provider]
    run, stats = step_function(copy.deepcopy(reasoner), rows, trie, reward, trainable, args)
    benchmark.group = f"grpo_step/{args.model}-{args.prompts}x{args.num_samples}"
    benchmark.extra_info.update(prompts=args.prompts, k=args.num_samples, reward=reward,
                                trainable=trainable)
    benchmark(timed(run))
    benchmark.extra_info["equal_reward_groups"] = stats["equal_reward_groups"][-1]
    if torch.cuda.is_available():
        benchmark.extra_info["peak_mib"] = torch.cuda.max_memory_allocated() / 2 ** 20
