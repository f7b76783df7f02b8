"""Ask a trained model for a user's next items.

    python -m fastlatent.recommend --checkpoint runs/cds/rl --history "Abbey Road" "Kind of Blue"
    python -m fastlatent.recommend --checkpoint runs/cds/rl --input users.jsonl --json

and from Python::

    reasoner = LatentReasoner.load("runs/cds/rl")
    for rec in recommend(reasoner, [["Abbey Road", "Kind of Blue"]], top=10):
        print(rec.titles, rec.scores, rec.unknown_history)

Constrained beam search over the catalogue saved with the checkpoint (``catalogue.json``:
its titles and the prompt wording it was trained with), batched over users, exactly as
the evaluation decodes. History titles that are not in the catalogue are used as written
and reported (``unknown_history``), never replaced by a guess.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from fastlatent.data.example import Catalogue, Example
from fastlatent.data.prompt import PromptBuilder
from fastlatent.data.sampling import chunks
from fastlatent.data.trie import TitleTrie
from fastlatent.errors import CheckpointError, DataError, UserError
from fastlatent.evaluate import build_title_trie, rank_titles
from fastlatent.metrics import normalize_title
from fastlatent.model.reasoner import LatentReasoner


@dataclass
class Recommendation:
    titles: list[str]  # best first, each a catalogue title
    scores: list[float]  # the beam scores (sum log p / length^penalty)
    unknown_history: list[str] = field(default_factory=list)  # not in the catalogue


@dataclass
class Recommender:
    """A reasoner with its catalogue's prompt builder and title trie, built once."""

    reasoner: LatentReasoner
    builder: PromptBuilder
    trie: TitleTrie
    known: frozenset[str]

    @classmethod
    def of(cls, reasoner: LatentReasoner) -> Recommender:
        saved = reasoner.catalogue
        if not saved or not saved.get("titles"):
            raise CheckpointError(
                "this model holds no catalogue (catalogue.json beside its weights); it was "
                "saved by an older fastlatent or built in memory: set reasoner.catalogue = "
                "{'titles': [...], 'template': 'default', 'domain': 'items'}")
        builder = PromptBuilder(reasoner.tokenizer, template=saved.get("template", "default"),
                                domain=saved.get("domain", "items"),
                                release_domain=saved.get("release_domain", "musics"),
                                use_thought=reasoner.uses_latent)
        titles = [str(t) for t in saved["titles"]]
        trie = build_title_trie(builder, Catalogue(tuple(titles)))
        return cls(reasoner, builder, trie, frozenset(normalize_title(t) for t in titles))

    def __call__(self, histories: Sequence[Sequence[str]], top: int = 10, *,
                 num_beams: int | None = None, batch_size: int = 8,
                 length_penalty: float = 1.0, max_new_tokens: int = 128
                 ) -> list[Recommendation]:
        from fastlatent.engine.generic import beam_search_for

        if top < 1:
            raise ValueError(f"expected top >= 1, got {top}")
        beams = max(top, num_beams or 10)
        for i, history in enumerate(histories):
            if isinstance(history, str) or not all(isinstance(t, str) for t in history):
                raise DataError(f"history {i}: expected a list of titles, got {history!r}")
            if not history:
                raise DataError(f"history {i} is empty; give at least one title")
        reasoner = self.reasoner
        search = beam_search_for(reasoner)
        was_training = reasoner.training
        reasoner.eval()
        out: list[Recommendation] = []
        with torch.no_grad():
            for part in chunks(list(histories), batch_size):
                users = [Example(user="", history=tuple(h), target="") for h in part]
                ranked = rank_titles(reasoner, search, self.builder, self.trie, users,
                                     num_beams=beams, length_penalty=length_penalty,
                                     max_new_tokens=max_new_tokens)
                out.extend(Recommendation(titles[:top], scores[:top],
                                          [t for t in h if normalize_title(t) not in self.known])
                           for h, (titles, scores) in zip(part, ranked, strict=True))
        reasoner.train(was_training)
        return out


def recommend(reasoner: LatentReasoner, histories: Sequence[Sequence[str]], top: int = 10,
              **kwargs) -> list[Recommendation]:
    """The ``top`` next titles for each history (oldest title first); see
    :class:`Recommender` (keep one to reuse its trie across calls)."""
    return Recommender.of(reasoner)(histories, top, **kwargs)


def read_histories(path: str) -> list[list[str]]:
    """One JSON object per line with a "history" list of titles (or a bare list)."""
    histories = []
    try:
        lines = open(path, encoding="utf-8").read().splitlines()  # noqa: SIM115
    except OSError as err:
        raise DataError(f"--input {path}: cannot be read ({err.strerror or err})") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as err:
            raise DataError(f"{path}:{number}: not JSON ({err})") from None
        history = row.get("history") if isinstance(row, dict) else row
        if not isinstance(history, list):
            raise DataError(f'{path}:{number}: expected {{"history": ["title", ...]}}')
        histories.append(history)
    return histories


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastlatent.recommend",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True,
                        help="a saved model (OUTPUT_DIR/rl or OUTPUT_DIR/sft)")
    who = parser.add_mutually_exclusive_group(required=True)
    who.add_argument("--history", nargs="+", metavar="TITLE",
                     help="one user's titles, oldest first")
    who.add_argument("--input", help='JSONL, one user per line: {"history": [titles]}')
    parser.add_argument("--top", type=int, default=10, help="titles per user (default 10)")
    parser.add_argument("--num-beams", type=int, default=10,
                        help="beams (at least --top; default 10)")
    parser.add_argument("--batch-size", type=int, default=8, help="users per batch")
    parser.add_argument("--length-penalty", type=float, default=1.0,
                        help="beam score = sum log p / L^lp (1.0 BIGRec, 0.0 D3)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--json", action="store_true", help="one JSON object per user")
    args = parser.parse_args(argv)
    try:
        from fastlatent.train import resolve_device

        device = resolve_device(args.device)
        histories = [args.history] if args.history else read_histories(args.input)
        reasoner = LatentReasoner.load(args.checkpoint).to(device)
        recs = Recommender.of(reasoner)(histories, args.top, num_beams=args.num_beams,
                                        batch_size=args.batch_size,
                                        length_penalty=args.length_penalty)
    except (UserError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for history, rec in zip(histories, recs, strict=True):
        if args.json:
            print(json.dumps({"history": history, "titles": rec.titles, "scores": rec.scores,
                              "unknown_history": rec.unknown_history}, ensure_ascii=False))
            continue
        if rec.unknown_history:
            print(f"note: not in the catalogue (used as written): {rec.unknown_history}")
        for rank, (title, score) in enumerate(zip(rec.titles, rec.scores, strict=True), 1):
            print(f"{rank:>3}. {title}  ({score:.3f})")
    return 0
