"""``python -m fastlatent.recommend``: the command line of :mod:`fastlatent.recommendation`.

This file is only run, never imported: ``fastlatent.recommend`` is the function
``fastlatent.recommend(reasoner, histories, top=10)``, and importing a submodule of that
name would replace it. Import :mod:`fastlatent.recommendation` for the rest
(``Recommender``, ``main``).
"""

import sys

if __name__ != "__main__":
    raise ImportError("fastlatent.recommend is the command line (python -m "
                      "fastlatent.recommend); import fastlatent.recommendation instead, or call "
                      "fastlatent.recommend(reasoner, histories)")

from fastlatent.recommendation import main  # noqa: E402

sys.exit(main())
