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
be passed instead. The operators live in :mod:`rgeom.attacks.autodan_operators`.

Fitness is computed for a whole population in left-padded batches (explicit position ids,
so padding does not shift a row's positions; only the target positions go through the LM
head), never in a per-candidate loop of forward passes. Identical templates are scored once.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from rgeom import generation
from rgeom.attacks.autodan_operators import (  # noqa: F401 (re-exported: tests import them here)
    DEFAULT_SYNONYMS,
    Mutator,
    SynonymMutator,
    _sentences,
    _words,
    crossover,
    replace_with_best_synonyms,
    synonym_index,
    update_word_scores,
)
from rgeom.attacks.templates import SLOT
from rgeom.config import schema_default
from rgeom.errors import RgeomError
from rgeom.models import encode_chat, encode_response, left_pad

log = logging.getLogger(__name__)

PROTOTYPES_FILE = Path(__file__).resolve().with_name("autodan_prototypes.jsonl")


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
    """The genetic algorithm's settings: ``attacks.autodan``, with the schema's defaults."""

    population: int = schema_default("attacks.autodan.population")
    generations: int = schema_default("attacks.autodan.generations")
    elite_fraction: float = schema_default("attacks.autodan.elite_fraction")
    crossover_rate: float = schema_default("attacks.autodan.crossover_rate")
    mutation_rate: float = schema_default("attacks.autodan.mutation_rate")
    paragraph_every: int = schema_default("attacks.autodan.paragraph_every")
    batch_size: int | None = schema_default("attacks.autodan.batch_size")
    early_stop: bool = schema_default("attacks.autodan.early_stop")
    early_stop_tokens: int = schema_default("attacks.autodan.early_stop_tokens")

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


class _TemplateLosses:
    """Target losses of templates filled with one behaviour, each distinct template scored
    once: the elites and unchanged offspring recur every generation."""

    def __init__(self, model, tokenizer, message: str, target: str, batch_size: int | None):
        self.model, self.tokenizer = model, tokenizer
        self.message, self.target, self.batch_size = message, target, batch_size
        self.memo: dict[str, float] = {}

    def __call__(self, templates: Sequence[str]) -> list[float]:
        new = list(dict.fromkeys(t for t in templates if t not in self.memo))
        if new:
            fills = [t.replace(SLOT, self.message) for t in new]
            losses = target_losses(self.model, self.tokenizer, fills, self.target, self.batch_size)
            for t, v in zip(new, losses, strict=True):
                self.memo[t] = v
        return [self.memo[t] for t in templates]


class _EarlyStop:
    """Whether the best template already jailbreaks: its greedy completion (``tokens`` long)
    is not ``refused``. Each template is generated from once; never stops without ``refused``."""

    def __init__(
        self,
        model,
        tokenizer,
        message: str,
        tokens: int,
        refused: Callable[[str], bool] | None,
        enabled: bool,
    ):
        self.model, self.tokenizer, self.message, self.tokens = model, tokenizer, message, tokens
        self.refused = refused if enabled else None
        self.checked: dict[str, tuple[bool, str]] = {}

    def __call__(
        self, population: Sequence[str], losses: Sequence[float]
    ) -> tuple[bool, str | None]:
        if self.refused is None:
            return False, None
        best = population[int(np.argmin(losses))]
        if best not in self.checked:
            (text,), _, _ = generation.generate_completions(
                self.model,
                self.tokenizer,
                [best.replace(SLOT, self.message)],
                batch_size=1,
                max_new_tokens=self.tokens,
            )
            self.checked[best] = (not self.refused(text), text)
        return self.checked[best]


@dataclass(frozen=True)
class _Breeding:
    """What one behaviour's generations are bred with: the settings, its own random stream,
    the mutator and the synonym index of the word-level step."""

    settings: AutoDANSettings
    rng: np.random.Generator
    mutate: Mutator
    index: Mapping[str, Sequence[str]]


def _initial_population(prototypes: Sequence[str], breeding: _Breeding) -> list[str]:
    """The prototypes themselves, then mutated copies of them in turn (the reference
    diversifies its prototype with an LLM; any mutator can do it here)."""
    n = breeding.settings.population
    population = [prototypes[i % len(prototypes)] for i in range(n)]
    return [
        p if i < len(prototypes) else _keep_slot(breeding.mutate(p, breeding.rng), p)
        for i, p in enumerate(population)
    ]


def _offspring(
    generation_index: int,
    population: Sequence[str],
    losses: Sequence[float],
    word_scores: dict[str, float],
    breeding: _Breeding,
) -> tuple[list[str], dict[str, float]]:
    """The non-elite part of the next generation, unscored, and the updated word scores.

    Roulette-wheel parents on ``softmax(-loss)``; then sentence crossover (paragraph-level
    generations) or best-synonym replacement (word-level ones); then the mutator.
    """
    settings, rng, mutate = breeding.settings, breeding.rng, breeding.mutate
    n = settings.population
    n_off = n - settings.n_elite
    probs = _softmax_neg(losses)
    parents = [population[i] for i in rng.choice(n, size=n_off + n_off % 2, p=probs)]
    offspring: list[str] = []
    if generation_index % settings.paragraph_every == 0:
        for a, b in zip(parents[0::2], parents[1::2], strict=True):
            if rng.random() < settings.crossover_rate:
                ca, cb = crossover(a, b, rng)
                offspring += [_keep_slot(ca, a), _keep_slot(cb, b)]
            else:
                offspring += [a, b]
    else:
        word_scores = update_word_scores(word_scores, population, losses)
        offspring = [
            replace_with_best_synonyms(p, word_scores, breeding.index, rng) for p in parents
        ]
    offspring = [
        _keep_slot(mutate(c, rng), c) if rng.random() < settings.mutation_rate else c
        for c in offspring[:n_off]
    ]
    return offspring, word_scores


def _check_prototypes(prototypes: Sequence[str]) -> None:
    if not prototypes:
        raise RgeomError("AutoDAN needs at least one prototype template")
    for p in prototypes:
        if SLOT not in p:
            raise RgeomError(f"AutoDAN prototype has no {SLOT} slot: {p[:60]!r}")


@dataclass(frozen=True)
class AutoDANSearch:
    """What every behaviour of one AutoDAN run is searched with.

    The ``prototypes`` seed the first population; ``settings`` are the genetic algorithm's
    (:class:`AutoDANSettings`); ``seed`` with a behaviour's id seeds its own random stream
    (:func:`behaviour_rng`). ``mutator`` defaults to a :class:`SynonymMutator` over
    ``synonyms``, the table the word-level step also draws from. ``refused(completion) ->
    bool`` enables the early stop: after each generation the best template's greedy
    completion (``settings.early_stop_tokens`` tokens) is checked and the search stops at
    the first that is not refused.
    """

    prototypes: Sequence[str]
    settings: AutoDANSettings
    seed: int
    mutator: Mutator | None = None
    synonyms: Sequence[Sequence[str]] = DEFAULT_SYNONYMS
    refused: Callable[[str], bool] | None = None
    progress: bool = True


def autodan_one(
    model,
    tokenizer,
    behaviour_id: str,
    message: str,
    target: str,
    search: AutoDANSearch,
) -> AutoDANResult:
    """Evolve templates for one behaviour; see the module docstring for the algorithm and
    :class:`AutoDANSearch` for the early stop."""
    _check_prototypes(search.prototypes)
    settings = search.settings
    rng = behaviour_rng(search.seed, behaviour_id)
    mutate = search.mutator or SynonymMutator(search.synonyms)
    breeding = _Breeding(settings, rng, mutate, synonym_index(search.synonyms))
    n_elite = settings.n_elite
    score = _TemplateLosses(model, tokenizer, message, target, settings.batch_size)
    early_stop = _EarlyStop(
        model, tokenizer, message, settings.early_stop_tokens, search.refused, settings.early_stop
    )

    population = _initial_population(search.prototypes, breeding)
    losses = score(population)
    initial_loss = losses[0]
    history: list[float] = []
    word_scores: dict[str, float] = {}
    stopped, completion = early_stop(population, losses)
    initial_best = min(losses)
    bar = tqdm(
        range(settings.generations if not stopped else 0),
        desc=f"autodan {behaviour_id}",
        leave=False,
        disable=not search.progress,
    )
    for g in bar:
        order = np.argsort(np.asarray(losses), kind="stable")
        elites = [population[i] for i in order[:n_elite]]
        elite_losses = [losses[i] for i in order[:n_elite]]
        offspring, word_scores = _offspring(g, population, losses, word_scores, breeding)
        population = elites + offspring
        # The elites keep the losses they were scored with: rescoring them in another batch
        # could differ in the last float bits and break the non-increasing guarantee.
        losses = elite_losses + score(offspring)
        history.append(min(losses))
        bar.set_postfix(loss=f"{history[-1]:.3f}")
        stopped, completion = early_stop(population, losses)
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
    search: AutoDANSearch,
) -> list[AutoDANResult]:
    """AutoDAN on each behaviour (``prompt_id`` and ``message`` keys); the model runs in eval
    mode and is returned to its previous mode afterwards."""
    if len(behaviours) != len(targets):
        raise RgeomError(f"AutoDAN got {len(behaviours)} behaviours but {len(targets)} targets")
    was_training = model.training
    model.eval()
    try:
        return [
            autodan_one(model, tokenizer, b["prompt_id"], b["message"], t, search)
            for b, t in zip(behaviours, targets, strict=True)
        ]
    finally:
        model.train(was_training)
