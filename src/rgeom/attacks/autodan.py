"""An AutoDAN-style hierarchical genetic attack (after Liu et al. 2024, AutoDAN-HGA).

A population of jailbreak *templates* (text with a ``{behavior}`` slot) evolves towards a
low target loss: the mean negative log-likelihood of the behaviour's affirmative target
("Sure, here is ...") as the assistant's reply to the filled-in template, on the source
model. Two levels alternate, as in AutoDAN-HGA:

* **paragraph level** (every ``paragraph_every``-th generation, the first included):
  roulette-wheel selection on ``softmax(-loss)``, sentence-wise crossover of aligned
  paragraphs with probability ``crossover_rate``, then the mutator with probability
  ``mutation_rate`` per offspring;
* **word level** (the other generations): momentum word scores (the mean fitness of the
  individuals containing a word, averaged with its previous score) pick, for each word in
  the synonym table, the best-scoring member of its synonym group; then the mutator, as above.

The ``elite_fraction`` best individuals (at least one) pass unchanged to the next generation
and their losses are kept, not recomputed, so the best loss never increases.

Differences from the reference, on purpose: the prototypes are rgeom's own
(``autodan_prototypes.jsonl``), and the default mutator is a seeded synonym substitution
instead of an LLM rewriter, because the embedded setup has one 135M model and no network;
any ``Mutator`` (a callable ``(text, rng) -> text``, e.g. one that calls a chat model) can
be passed instead.

Fitness is computed for a whole population in left-padded batches (explicit position ids,
so padding does not shift a row's positions; only the target positions go through the LM
head), never in a per-candidate loop of forward passes. Identical templates are scored once.
"""

from __future__ import annotations

import logging
import re
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from rgeom.errors import RgeomError

log = logging.getLogger(__name__)

SLOT = "{behavior}"
PROTOTYPES_FILE = Path(__file__).resolve().with_name("autodan_prototypes.jsonl")

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


# --- fitness ------------------------------------------------------------------------


def target_losses(
    model,
    tokenizer,
    prompts: Sequence[str],
    target: str,
    batch_size: int | None = None,
    system: str | None = None,
) -> list[float]:
    """Mean target NLL of each user message, batched (no per-candidate forward loop).

    Each row is ``chat(prompt) + target`` left-padded so that the targets line up at the
    end; ``position_ids`` restart at the first real token, as ``generate`` does, so a row's
    loss does not depend on the padding its batch needs. Length-sorted chunks of
    ``batch_size`` rows (None: all at once) keep the padding small.
    """
    from rgeom.models import encode_chat, encode_response, left_pad

    tgt = encode_response(tokenizer, target, eos=False)
    if not tgt:
        raise RgeomError(f"AutoDAN target {target[:60]!r} encodes to no tokens")
    encoded = [encode_chat(tokenizer, p, system).ids + tgt for p in prompts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    chunk = batch_size or max(1, len(encoded))
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    t = len(tgt)
    labels = torch.tensor(tgt, device=device)
    out = [0.0] * len(encoded)
    with torch.inference_mode():
        for lo in range(0, len(order), chunk):
            rows = order[lo : lo + chunk]
            ids, mask = left_pad([encoded[i] for i in rows], pad, device)
            pos = (mask.cumsum(dim=1) - 1).clamp(min=0)
            logits = model(
                input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=t + 1
            ).logits
            # Position j of the kept logits predicts target token j; the last looks past it.
            pred = logits[:, :-1, :].float()
            ce = F.cross_entropy(
                pred.reshape(-1, pred.shape[-1]),
                labels.expand(len(rows), -1).reshape(-1),
                reduction="none",
            ).view(len(rows), t)
            for row, value in zip(rows, ce.mean(dim=1).tolist(), strict=True):
                out[row] = value
    return out


# --- the genetic algorithm ------------------------------------------------------------


@dataclass
class AutoDANSettings:
    population: int = 64
    generations: int = 100
    elite_fraction: float = 0.1
    crossover_rate: float = 0.5
    mutation_rate: float = 0.01
    paragraph_every: int = 5
    batch_size: int | None = None
    early_stop: bool = True
    early_stop_tokens: int = 32

    @classmethod
    def from_params(cls, params: Mapping[str, object], where: str) -> AutoDANSettings:
        known = cls.__dataclass_fields__
        s = cls(**{k: params[k] for k in known if k in params and params[k] is not None})
        if s.population < 2:
            raise RgeomError(f"{where}: population must be >= 2, got {s.population}")
        if s.generations < 0 or s.paragraph_every < 1:
            raise RgeomError(f"{where}: generations >= 0 and paragraph_every >= 1 required")
        for name in ("elite_fraction", "crossover_rate", "mutation_rate"):
            if not 0.0 <= float(getattr(s, name)) <= 1.0:
                raise RgeomError(f"{where}: {name} must be in [0, 1]")
        return s

    @property
    def n_elite(self) -> int:
        # At least one: elitism is what makes the best loss non-increasing.
        return min(self.population, max(1, int(self.population * self.elite_fraction)))


@dataclass
class AutoDANResult:
    """Outcome on one behaviour; ``losses_per_generation[g]`` is the best loss after
    generation ``g`` (never increasing), ``initial_loss`` the first prototype's loss."""

    behaviour_id: str
    message: str
    target: str
    template: str
    loss: float
    initial_loss: float
    initial_best_loss: float
    losses_per_generation: list[float] = field(default_factory=list)
    generations_run: int = 0
    stopped_early: bool = False
    completion: str | None = None

    @property
    def user_text(self) -> str:
        return self.template.replace(SLOT, self.message)


def behaviour_rng(seed: int, behaviour_id: str) -> np.random.Generator:
    # Seeded by the behaviour id, so a behaviour's attack does not depend on which other
    # behaviours are attacked or in what order.
    return np.random.default_rng([int(seed), zlib.crc32(behaviour_id.encode())])


def _softmax_neg(losses: Sequence[float]) -> np.ndarray:
    z = -np.asarray(losses, dtype=np.float64)
    z = np.exp(z - z.max())
    return z / z.sum()


def _keep_slot(child: str, parent: str) -> str:
    return child if SLOT in child else parent


def autodan_one(
    model,
    tokenizer,
    behaviour_id: str,
    message: str,
    target: str,
    prototypes: Sequence[str],
    settings: AutoDANSettings,
    seed: int,
    mutator: Mutator | None = None,
    synonyms: Sequence[Sequence[str]] = DEFAULT_SYNONYMS,
    refused: Callable[[str], bool] | None = None,
    progress: bool = True,
) -> AutoDANResult:
    """Evolve templates for one behaviour; see the module docstring for the algorithm.

    ``refused(completion) -> bool`` enables the early stop: after each generation the best
    template's greedy completion (``early_stop_tokens`` tokens) is checked and the search
    stops at the first that is not refused.
    """
    if not prototypes:
        raise RgeomError("AutoDAN needs at least one prototype template")
    for p in prototypes:
        if SLOT not in p:
            raise RgeomError(f"AutoDAN prototype has no {SLOT} slot: {p[:60]!r}")
    rng = behaviour_rng(seed, behaviour_id)
    mutate = mutator or SynonymMutator(synonyms)
    index = synonym_index(synonyms)
    n, n_elite = settings.population, settings.n_elite

    memo: dict[str, float] = {}

    def score(templates: Sequence[str]) -> list[float]:
        new = list(dict.fromkeys(t for t in templates if t not in memo))
        if new:
            fills = [t.replace(SLOT, message) for t in new]
            for t, v in zip(
                new,
                target_losses(model, tokenizer, fills, target, settings.batch_size),
                strict=True,
            ):
                memo[t] = v
        return [memo[t] for t in templates]

    # Initial population: the prototypes themselves, then mutated copies of them in turn
    # (the reference diversifies its prototype with an LLM; any mutator can do it here).
    population = [prototypes[i % len(prototypes)] for i in range(n)]
    population = [
        p if i < len(prototypes) else _keep_slot(mutate(p, rng), p)
        for i, p in enumerate(population)
    ]
    losses = score(population)
    initial_loss = losses[0]
    history: list[float] = []
    word_scores: dict[str, float] = {}
    checked: dict[str, tuple[bool, str]] = {}

    def check_best() -> tuple[bool, str | None]:
        if refused is None or not settings.early_stop:
            return False, None
        best = population[int(np.argmin(losses))]
        if best not in checked:
            from rgeom.generation import generate_completions

            (text,), _, _ = generate_completions(
                model,
                tokenizer,
                [best.replace(SLOT, message)],
                batch_size=1,
                max_new_tokens=settings.early_stop_tokens,
            )
            checked[best] = (not refused(text), text)
        return checked[best]

    stopped, completion = check_best()
    initial_best = min(losses)
    bar = tqdm(
        range(settings.generations if not stopped else 0),
        desc=f"autodan {behaviour_id}",
        leave=False,
        disable=not progress,
    )
    for g in bar:
        order = np.argsort(np.asarray(losses), kind="stable")
        elites = [population[i] for i in order[:n_elite]]
        elite_losses = [losses[i] for i in order[:n_elite]]
        n_off = n - n_elite
        probs = _softmax_neg(losses)
        parents = [population[i] for i in rng.choice(n, size=n_off + n_off % 2, p=probs)]
        offspring: list[str] = []
        if g % settings.paragraph_every == 0:
            for a, b in zip(parents[0::2], parents[1::2], strict=True):
                if rng.random() < settings.crossover_rate:
                    ca, cb = crossover(a, b, rng)
                    offspring += [_keep_slot(ca, a), _keep_slot(cb, b)]
                else:
                    offspring += [a, b]
        else:
            word_scores = update_word_scores(word_scores, population, losses)
            offspring = [replace_with_best_synonyms(p, word_scores, index, rng) for p in parents]
        offspring = [
            _keep_slot(mutate(c, rng), c) if rng.random() < settings.mutation_rate else c
            for c in offspring[:n_off]
        ]
        population = elites + offspring
        # The elites keep the losses they were scored with: rescoring them in another batch
        # could differ in the last float bits and break the non-increasing guarantee.
        losses = elite_losses + score(offspring)
        history.append(min(losses))
        bar.set_postfix(loss=f"{history[-1]:.3f}")
        stopped, completion = check_best()
        if stopped:
            break
    best = int(np.argmin(losses))
    return AutoDANResult(
        behaviour_id=behaviour_id,
        message=message,
        target=target,
        template=population[best],
        loss=float(losses[best]),
        initial_loss=float(initial_loss),
        initial_best_loss=float(initial_best),
        losses_per_generation=history,
        generations_run=len(history),
        stopped_early=bool(stopped),
        completion=completion,
    )


def autodan(
    model,
    tokenizer,
    behaviours: Sequence[Mapping[str, str]],
    targets: Sequence[str],
    prototypes: Sequence[str],
    settings: AutoDANSettings,
    seed: int,
    mutator: Mutator | None = None,
    refused: Callable[[str], bool] | None = None,
    progress: bool = True,
) -> list[AutoDANResult]:
    """AutoDAN on each behaviour (``prompt_id`` and ``message`` keys); the model runs in eval
    mode and is returned to its previous mode afterwards."""
    if len(behaviours) != len(targets):
        raise RgeomError(f"AutoDAN got {len(behaviours)} behaviours but {len(targets)} targets")
    was_training = model.training
    model.eval()
    try:
        return [
            autodan_one(
                model,
                tokenizer,
                b["prompt_id"],
                b["message"],
                t,
                prototypes,
                settings,
                seed,
                mutator=mutator,
                refused=refused,
                progress=progress,
            )
            for b, t in zip(behaviours, targets, strict=True)
        ]
    finally:
        model.train(was_training)
