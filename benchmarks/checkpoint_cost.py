"""What one resumable checkpoint costs: size, save time (incl. fsync), verify + read time,
for an SFT checkpoint (whole model + AdamW moments) and an RL one (LatentRATT + AdamW).

    python benchmarks/checkpoint_cost.py [--model smollm2-135m] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

from fastlatent import checkpoint as ck
from fastlatent.model.loading import load_llm
from fastlatent.model.reasoner import LatentReasoner, ReasonerConfig
from fastlatent.optim import make_scheduler


def stepped_adamw(params: list[torch.nn.Parameter]) -> torch.optim.AdamW:
    """AdamW after one (zero-gradient) step, so its moments exist as in training."""
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return optimizer


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dir", default=None, help="where to write (default: a temp folder)")
    args = p.parse_args(argv)
    texts = ["a b c"] * 8 if args.model == "tiny-random" else None
    llm, tokenizer = load_llm(args.model, tokenizer_texts=texts)
    reasoner = LatentReasoner.build(llm, tokenizer, ReasonerConfig())
    out = Path(tempfile.mkdtemp(dir=args.dir))
    try:
        for stage, params in (("sft", list(reasoner.parameters())),
                              ("rl", list(reasoner.ratt.parameters()))):
            optimizer = stepped_adamw(params)
            scheduler = make_scheduler(optimizer, stage, 1, 10)
            state = ck.TrainingState(stage, step=1, epoch=0, batch=1, extra={})
            t0 = time.perf_counter()
            path = ck.save_training_state(out, state, reasoner, optimizer, scheduler,
                                          torch.Generator())
            saved = time.perf_counter() - t0
            size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
            t0 = time.perf_counter()
            ck.load_training_state(path)
            loaded = time.perf_counter() - t0
            t0 = time.perf_counter()  # the checksums' share of both (files in page cache)
            for f in sorted(f for f in path.rglob("*") if f.is_file()):
                ck.file_digest(f)
            hashed = time.perf_counter() - t0
            print(f"{stage}: {size / 2**20:.0f} MiB, save {saved:.2f} s, "
                  f"verify + read trainer state {loaded:.2f} s, of which sha256 of every "
                  f"file {hashed:.2f} s each way ({size / 2**30 / max(hashed, 1e-9):.2f} GiB/s)")
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
