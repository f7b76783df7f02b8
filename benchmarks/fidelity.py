"""The paper's ablation on one dataset: `benchmarks/paper.py table2` under its old name.

    python benchmarks/fidelity.py --data csv:../shared/data/amazon-cds \
        --train-split valid --eval-split test --budget cpu

The same flags as paper.py (without the target) and the same variant folders (w/o
reasoning, w/o LatentRATT, SFT only, +RL batch, +RL group, and --sigma-variants), so a
fidelity output folder is a paper.py folder; the report is written as fidelity.json,
fidelity.md and fidelity.png (default --output-dir runs/fidelity).
"""

from __future__ import annotations

import sys

from paper import main as paper_main  # the script's own folder is on sys.path


def main(argv: list[str] | None = None) -> int:
    return paper_main(argv, report_stem="fidelity", prog="fidelity.py", target="table2",
                      default_output="runs/fidelity")


if __name__ == "__main__":
    sys.exit(main())
