"""AutoDAN's genetic operators on jailbreak templates: synonym mutation, sentence crossover
and the momentum word scores of the word-level step (:mod:`rgeom.attacks.autodan`).

Every operator draws from the ``rng`` it is given, so one behaviour's evolution depends only
on its seed; word swaps never touch the ``{behavior}`` slot.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from rgeom.attacks.templates import SLOT
from rgeom.errors import RgeomError

# A mutator rewrites one template; it must use ``rng`` for every random choice (determinism)
# and should keep the {behavior} slot (offspring that lose it are replaced by their parent).
Mutator = Callable[[str, np.random.Generator], str]

# Interchangeable words for the prototypes' vocabulary (our own table). A word belongs to
# one group; a group's words are the choices of both the mutator and the word-level step.
DEFAULT_SYNONYMS: tuple[tuple[str, ...], ...] = (
    ("accurate", "exact", "correct", "faithful"),
    ("precise", "specific", "concrete", "explicit"),
    ("detailed", "thorough", "comprehensive", "exhaustive"),
    ("complete", "full", "entire", "whole"),
    ("explains", "describes", "outlines", "walks"),
    ("explanation", "description", "account", "walkthrough"),
    ("answer", "reply", "response"),
    ("answers", "replies", "responses"),
    ("expert", "specialist", "master", "authority"),
    ("professionals", "insiders", "practitioners"),
    ("specialists", "experts", "technicians"),
    ("goal", "aim", "purpose", "objective"),
    ("clear", "plain", "simple", "direct"),
    ("steps", "stages", "points", "actions"),
    ("step", "stage", "point", "action"),
    ("warnings", "caveats", "cautions", "notes"),
    ("disclaimers", "hedges", "qualifications"),
    ("begin", "start", "open", "lead"),
    ("write", "compose", "draft", "produce"),
    ("scene", "sequence", "moment", "episode"),
    ("directly", "immediately", "promptly", "plainly"),
    ("information", "knowledge", "facts", "material"),
    ("careful", "diligent", "serious", "meticulous"),
    ("depend", "rely", "count"),
    ("waste", "squander", "lose"),
    ("shorten", "truncate", "abbreviate", "trim"),
    ("mistake", "error", "slip", "inaccuracy"),
    ("notice", "spot", "catch", "see"),
    ("gritty", "dark", "realistic", "raw"),
    ("drama", "thriller", "series", "show"),
    ("asks", "inquires", "wonders"),
    ("unrestricted", "unfiltered", "uncensored", "unlimited"),
    ("assistant", "aide", "helper", "adviser"),
    ("request", "question", "query", "task"),
    ("thoroughly", "fully", "completely", "exhaustively"),
    ("organise", "arrange", "structure", "format"),
    ("policies", "rules", "guidelines", "restrictions"),
    ("refuse", "decline", "object", "hesitate"),
    ("numbered", "ordered", "itemised", "enumerated"),
    ("audience", "viewers", "public", "crowd"),
    ("private", "secret", "hidden", "closed"),
    ("records", "documents", "preserves", "logs"),
    ("trained", "qualified", "seasoned", "skilled"),
    ("rejected", "refused", "discarded", "removed"),
    ("short", "brief", "concise", "compact"),
    ("judge", "criticise", "assess", "weigh"),
    ("imagine", "picture", "suppose", "consider"),
    ("really", "actually", "truly", "genuinely"),
)

_WORD = re.compile(r"[A-Za-z]+")
_SENTENCE_END = re.compile(r"(?<=[.!?:])\s+")


def synonym_index(groups: Sequence[Sequence[str]]) -> dict[str, tuple[str, ...]]:
    """word -> its group, lower case; a word listed twice is an error (ambiguous choice)."""
    index: dict[str, tuple[str, ...]] = {}
    for group in groups:
        words = tuple(w.lower() for w in group)
        if len(words) < 2:
            raise RgeomError(f"synonym group {list(group)} needs at least two words")
        for w in words:
            if w in index:
                raise RgeomError(f"synonym table lists {w!r} in two groups")
            index[w] = words
    return index


def _match_case(word: str, like: str) -> str:
    if like.isupper() and len(like) > 1:
        return word.upper()
    if like[:1].isupper():
        return word[:1].upper() + word[1:]
    return word


def _map_words(text: str, fn: Callable[[str], str]) -> str:
    """Apply ``fn`` to every word of ``text`` outside the {behavior} slot."""
    pieces = text.split(SLOT)
    return SLOT.join(_WORD.sub(lambda m: fn(m.group(0)), p) for p in pieces)


def _words(text: str) -> set[str]:
    return {w.lower() for w in _WORD.findall(text.replace(SLOT, " "))}


@dataclass
class SynonymMutator:
    """Word-level mutation: each word with synonyms is swapped with probability ``word_rate``."""

    groups: Sequence[Sequence[str]] = DEFAULT_SYNONYMS
    word_rate: float = 0.2

    def __post_init__(self) -> None:
        self.index = synonym_index(self.groups)

    def __call__(self, text: str, rng: np.random.Generator) -> str:
        def swap(word: str) -> str:
            group = self.index.get(word.lower())
            # Draw for every word, even when it cannot change, so the stream of random
            # numbers (and hence the result) depends only on the text and the seed.
            u = rng.random()
            if group is None or u >= self.word_rate:
                return word
            others = [w for w in group if w != word.lower()]
            return _match_case(others[int(rng.integers(len(others)))], word)

        return _map_words(text, swap)


def _sentences(paragraph: str) -> list[str]:
    return [s for s in _SENTENCE_END.split(paragraph) if s]


def crossover(a: str, b: str, rng: np.random.Generator) -> tuple[str, str]:
    """Two children of ``a`` and ``b``: aligned paragraphs swap sentences uniformly.

    Paragraph ``i`` of each child takes each sentence position ``j`` present in both parents
    from either parent with probability 1/2 (the other child gets the other sentence);
    sentences and paragraphs only one parent has stay with that parent's child.
    """
    pa_, pb_ = a.split("\n\n"), b.split("\n\n")
    ca, cb = [], []
    for i in range(max(len(pa_), len(pb_))):
        if i >= len(pa_) or i >= len(pb_):
            (ca if i < len(pa_) else cb).append(pa_[i] if i < len(pa_) else pb_[i])
            continue
        sa, sb = _sentences(pa_[i]), _sentences(pb_[i])
        xa, xb = [], []
        for j in range(max(len(sa), len(sb))):
            if j < len(sa) and j < len(sb):
                first, second = (sa[j], sb[j]) if rng.random() < 0.5 else (sb[j], sa[j])
                xa.append(first)
                xb.append(second)
            elif j < len(sa):
                xa.append(sa[j])
            else:
                xb.append(sb[j])
        ca.append(" ".join(xa))
        cb.append(" ".join(xb))
    return "\n\n".join(ca), "\n\n".join(cb)


def update_word_scores(
    scores: dict[str, float], population: Sequence[str], losses: Sequence[float]
) -> dict[str, float]:
    """Momentum word scores: mean fitness (-loss) of the individuals with the word, averaged
    with the word's previous score when it has one (AutoDAN's momentum word scoring)."""
    sums: dict[str, list[float]] = {}
    for text, loss in zip(population, losses, strict=True):
        for w in _words(text):
            sums.setdefault(w, []).append(-float(loss))
    out = dict(scores)
    for w, values in sums.items():
        new = float(np.mean(values))
        out[w] = (out[w] + new) / 2 if w in out else new
    return out


def replace_with_best_synonyms(
    text: str,
    scores: Mapping[str, float],
    index: Mapping[str, Sequence[str]],
    rng: np.random.Generator,
    rate: float = 0.5,
) -> str:
    """Swap words for the best-scoring member of their group, each with probability ``rate``
    (below 1, so the population keeps some variety)."""

    def best(word: str) -> str:
        u = rng.random()
        group = index.get(word.lower())
        if group is None or u >= rate:
            return word
        known = [w for w in group if w in scores]
        if not known:
            return word
        return _match_case(max(known, key=lambda w: (scores[w], w)), word)

    return _map_words(text, best)
