"""LatentR3 problem sizes shared by every benchmark (see ../shared/reference/LATENTR3.md).

Prompt ~126 tokens (CDs, Qwen2.5 tokenizer), target ~9 tokens incl. EOS, K = 8 rows per
prompt, 32 prompts per RL step. Model heads: SmolLM2-135M (d=576, V=49152) and
Qwen2.5-1.5B (d=1536, V=151936). ``CPU_*`` are the shrunken sizes used on the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class HeadShape:
    name: str
    hidden: int
    vocab: int


@dataclass(frozen=True)
class StepShape:
    name: str
    prompts: int
    k: int
    prompt_len: int  # each prompt's own tokens (after the common start)
    target_len: int
    common_len: int = 0  # tokens every prompt of the batch starts with


SMOLLM2_HEAD = HeadShape("smollm2", 576, 49152)
QWEN25_15B_HEAD = HeadShape("qwen2.5-1.5b", 1536, 151936)
PAPER_STEP = StepShape("paper", prompts=32, k=8, prompt_len=126, target_len=9)
CPU_STEP = StepShape("cpu", prompts=4, k=8, prompt_len=126, target_len=9)
# The release's template with SmolLM2's tokenizer: 78 of ~135 prompt tokens are common to
# every prompt of a batch (counted on 500 CDs test prompts; benchmarks/RESULTS.md).
PAPER_TREE_STEP = StepShape("paper-tree", prompts=32, k=8, prompt_len=57, target_len=9,
                            common_len=78)
CPU_TREE_STEP = StepShape("cpu-tree", prompts=4, k=8, prompt_len=57, target_len=9,
                          common_len=78)
