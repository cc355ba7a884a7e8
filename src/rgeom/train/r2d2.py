"""R2D2: HarmBench's Robust Refusal Dynamic Defense (Mazeika et al. 2024), our implementation.

A pool of persistent adversarial test cases (behaviour, affirmative target, GCG suffix) is
kept alongside training. Every training micro-step:

1. ``updates_per_step`` pool entries are refreshed by a few GCG steps against the current
   model, warm-started from each entry's suffix, so the attacks track the model as it moves.
2. One padded forward pass over the utility batch and the refreshed adversarial prompts gives
   three losses: *away* (push probability off the affirmative target), *toward* (CE on a
   refusal + EOS for the same prompts) and *utility* (SFT CE on chat examples).
3. total = utility + away_coef * away + toward_coef * toward.

Every ``reset_every`` micro-steps a fraction of the pool restarts from fresh behaviours,
targets and ``"! " * n`` suffixes, so the pool does not collapse onto a few hard cases.

The pool is plain data (a dict of lists, its RNG state included) so a run can resume.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import random
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from trl import SFTTrainer

from rgeom.attacks.gcg import (
    _vocab_size,
    ascii_token_ids,
    build_prompt_ids,
    gcg,
    screen_dtype_from_name,
    suffix_ids_in_context,
)
from rgeom.errors import RgeomError
from rgeom.models import encode_response

log = logging.getLogger(__name__)


@dataclass
class R2D2Config:
    """R2D2 hyper-parameters. Defaults are HarmBench's reference values unless noted.

    pool_size: persistent test cases. HarmBench ties its pool to the GPU count; here it is
        one number whatever the hardware, so runs on different machines match.
        (default 180: our choice, not a verified reference value.)
    updates_per_step: entries refreshed by GCG per training micro-step (ref 8).
    gcg_steps / search_width / topk: GCG per refresh (ref 5 / 512 / 256).
    gcg_batch_size: candidates per GCG forward pass; None = all at once (memory knob only).
    gcg_screen_dtype / gcg_rescore_top: screen candidates in this precision, rescore the best
        few exactly (see :func:`rgeom.attacks.gcg.gcg`); None = exact scoring (ref).
    reset_every / reset_fraction: every 50 micro-steps, 20% of the pool restarts (ref).
    suffix_unit / suffix_min / suffix_max: fresh suffixes are ``"! " * n``, n uniform in
        [15, 20] per entry (ref).
    refusal: the toward-loss string, followed by EOS (ref "Sorry, I can't do that.").
    away_coef / toward_coef: weights of the two adversarial terms (ref 0.5 each).
    away_logp_floor: target tokens with log p below this are already unlikely and are left
        out of the away loss (ref -5).
    seed: the pool's RNG seed (entry draws, refresh choice, GCG seeds).
    system: optional system prompt for the adversarial prompts.
    exclude: behaviour ids left out of the pool (default: the one standard HarmBench val
        behaviour that ``adv_training_val_targets.json`` has no targets for).
    """

    pool_size: int = 180
    updates_per_step: int = 8
    gcg_steps: int = 5
    search_width: int = 512
    topk: int = 256
    gcg_batch_size: int | None = None
    gcg_screen_dtype: str | None = None
    gcg_rescore_top: int = 8
    reset_every: int = 50
    reset_fraction: float = 0.2
    suffix_unit: str = "! "
    suffix_min: int = 15
    suffix_max: int = 20
    refusal: str = "Sorry, I can't do that."
    away_coef: float = 0.5
    toward_coef: float = 0.5
    away_logp_floor: float = -5.0
    seed: int = 0
    system: str | None = None
    exclude: tuple[str, ...] = ("dimethylmercury_instructions_home",)

    def __post_init__(self) -> None:
        # Config and JSON give lists; a tuple keeps the dataclass hashable-ish and comparable.
        self.exclude = tuple(self.exclude or ())

    def validate(self) -> None:
        if self.pool_size < self.updates_per_step:
            raise RgeomError(
                f"r2d2.pool_size ({self.pool_size}) must be at least "
                f"r2d2.updates_per_step ({self.updates_per_step})"
            )
        if self.updates_per_step < 1:
            raise RgeomError("r2d2.updates_per_step must be at least 1")
        if not 1 <= self.suffix_min <= self.suffix_max:
            raise RgeomError(
                f"r2d2 suffix lengths need 1 <= suffix_min ({self.suffix_min}) "
                f"<= suffix_max ({self.suffix_max})"
            )
        if not 0.0 <= self.reset_fraction <= 1.0:
            raise RgeomError(f"r2d2.reset_fraction must be in [0, 1], got {self.reset_fraction}")
        if self.reset_every < 1:
            raise RgeomError("r2d2.reset_every must be at least 1")
        if self.gcg_steps < 0 or self.search_width < 1 or self.topk < 1:
            raise RgeomError("r2d2 needs gcg_steps >= 0, search_width >= 1 and topk >= 1")
        if self.gcg_rescore_top < 1:
            raise RgeomError("r2d2.gcg_rescore_top must be at least 1")
        try:
            screen_dtype_from_name(self.gcg_screen_dtype)
        except RgeomError as exc:
            raise RgeomError(f"r2d2.gcg_screen_dtype: {exc}") from None


@dataclass(frozen=True)
class R2D2Behaviour:
    """A training behaviour and its affirmative targets (HarmBench gives 12 per behaviour)."""

    behaviour_id: str
    behaviour: str
    targets: tuple[str, ...]
    context: str = ""
    tags: tuple[str, ...] = ()

    @property
    def contextual(self) -> bool:
        return bool(self.context.strip()) or "context" in self.tags


#: Separates several files in one ``--extra`` value (the stage's extras are NAME=PATH).
PATH_LIST_SEP = ","


def split_paths(value: str | Sequence[str] | None) -> list[str]:
    """``a.csv,b.csv`` (or a list) as a list of paths; empty for None or ``""``."""
    if not value:
        return []
    parts = value.split(PATH_LIST_SEP) if isinstance(value, str) else list(value)
    return [str(p) for p in parts if str(p).strip()]


def load_targets(targets_json: str | Path | Sequence[str | Path]) -> dict[str, list[str]]:
    """``{BehaviorID: [targets]}`` merged from one or more targets JSON files.

    A file maps BehaviorID to a list of targets (``adv_training_targets.json``) or to one
    target string (``harmbench_targets_text.json``). An id in several files keeps the first
    file's targets, the order the config lists them in.
    """
    paths = [targets_json] if isinstance(targets_json, str | Path) else list(targets_json)
    merged: dict[str, list[str]] = {}
    for path in paths:
        try:
            found = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise RgeomError(f"cannot read the R2D2 targets {path}: {exc}") from exc
        for bid, targets in found.items():
            merged.setdefault(bid, [targets] if isinstance(targets, str) else list(targets))
    return merged


def load_harmbench_behaviours(
    behaviours_csv: str | Path,
    targets_json: str | Path | Sequence[str | Path] | dict[str, list[str]],
    exclude: Iterable[str] = (),
) -> list[R2D2Behaviour]:
    """HarmBench's R2D2 behaviours (``adv_training_behaviors.csv``) with their targets.

    ``targets_json``: one or more targets files (see :func:`load_targets`) or their merged
    dict. Contextual rows are kept here and dropped by :class:`R2D2Pool`, so the two filters
    can never disagree; a contextual row without targets is kept with none (the pool never
    draws it). A non-contextual row without targets is an error naming every such id, unless
    it is in ``exclude``.
    """
    targets = targets_json if isinstance(targets_json, dict) else load_targets(targets_json)
    skip = set(exclude)
    out, missing = [], []
    with open(behaviours_csv, newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            bid = row["BehaviorID"]
            if bid in skip:
                continue
            tags = tuple(t.strip() for t in (row.get("Tags") or "").split(",") if t.strip())
            context = (row.get("ContextString") or "").replace("\r\n", "\n")
            found = tuple(targets.get(bid) or ())
            b = R2D2Behaviour(bid, row["Behavior"], found, context, tags)
            if not found and not b.contextual:
                missing.append(bid)
            out.append(b)
    if missing:
        raise RgeomError(
            f"{behaviours_csv}: no targets for behaviour(s) {', '.join(map(repr, missing))} "
            "in the R2D2 targets files (add them, or list them in r2d2.exclude)"
        )
    return out


def behaviours_from_pairs(rows: Iterable[tuple[str, str, str]]) -> list[R2D2Behaviour]:
    """Behaviours with one target each, from (id, behaviour, target) rows.

    For datasets with a single ``target`` column (AdvBench, JBB, the builtin harmful set).
    """
    return [R2D2Behaviour(bid, text, (target,) if target else ()) for bid, text, target in rows]


@dataclass
class PoolEntry:
    behaviour_id: str
    behaviour: str
    target: str
    suffix_ids: list[int]
    loss: float | None = None  # GCG target loss after the last refresh
    refreshes: int = 0


class R2D2Pool:
    """The persistent test-case pool, with its own seeded RNG."""

    def __init__(self, behaviours: Sequence[R2D2Behaviour], tokenizer, cfg: R2D2Config):
        cfg.validate()
        # Contextual behaviours need their context in the prompt; HarmBench's R2D2 leaves them
        # out. Filtering once here is what keeps init and reset drawing from the same set.
        excluded = set(cfg.exclude)
        self.behaviours = [
            b for b in behaviours if not b.contextual and b.behaviour_id not in excluded
        ]
        if not self.behaviours:
            raise RgeomError("R2D2 has no non-contextual behaviours to train on")
        # Upstream target lists hold some empty strings (8 of HarmBench's 100 R2D2 behaviours);
        # those are dropped, and only a behaviour left with no target at all is an error.
        cleaned, empty = [], []
        for b in self.behaviours:
            targets = tuple(t for t in b.targets if t.strip())
            if not targets:
                empty.append(b.behaviour_id)
            cleaned.append(replace(b, targets=targets))
        if empty:
            raise RgeomError(
                f"R2D2 behaviour(s) {', '.join(map(repr, empty))} have no non-empty target"
            )
        self.behaviours = cleaned
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.rng = random.Random(cfg.seed)
        self.step = 0
        self.last_refreshed: list[int] = []  # pool indices of the last advance's refresh
        self._allowed: torch.Tensor | None = None  # GCG's ASCII tokens, decoded on first use
        self.entries = [self._fresh_entry() for _ in range(cfg.pool_size)]

    def _fresh_suffix(self, behaviour: str) -> list[int]:
        n = self.rng.randint(self.cfg.suffix_min, self.cfg.suffix_max)
        # Encoded after the behaviour, as GCG's round-trip filter requires: encoded alone,
        # "! ! !" starts with a bare "!" that the separator space would join on replay.
        return suffix_ids_in_context(self.tokenizer, behaviour, self.cfg.suffix_unit * n)

    def _fresh_entry(self) -> PoolEntry:
        # Behaviour and target are drawn per entry from one running RNG; reseeding per entry
        # (as the reference code does) would give every entry the same target index.
        b = self.rng.choice(self.behaviours)
        target = self.rng.choice(b.targets)
        return PoolEntry(b.behaviour_id, b.behaviour, target, self._fresh_suffix(b.behaviour))

    def choose_updates(self) -> list[int]:
        """Indices of the entries to refresh this micro-step (distinct, uniformly drawn)."""
        return sorted(self.rng.sample(range(len(self.entries)), self.cfg.updates_per_step))

    def reset(self) -> list[int]:
        """Restart ``reset_fraction`` of the entries from scratch; returns their indices."""
        k = round(self.cfg.reset_fraction * len(self.entries))
        chosen = sorted(self.rng.sample(range(len(self.entries)), k))
        for i in chosen:
            self.entries[i] = self._fresh_entry()
        return chosen

    def next_seed(self) -> int:
        return self.rng.randrange(2**31)

    def _allowed_tokens(self, model) -> torch.Tensor:
        # Decoding the whole vocabulary costs ~0.4 s on SmolLM2's 49k tokens, as much as a
        # demo-sized GCG step: once per pool, not once per micro-step.
        if self._allowed is None:
            self._allowed = ascii_token_ids(self.tokenizer, _vocab_size(model))
        return self._allowed

    def refresh(self, model, indices: Sequence[int]) -> list[float]:
        """Run GCG on the chosen entries against ``model``, warm-started; returns their losses."""
        chosen = [self.entries[i] for i in indices]
        results = gcg(
            model,
            self.tokenizer,
            [e.behaviour for e in chosen],
            [e.target for e in chosen],
            suffixes=[e.suffix_ids for e in chosen],
            steps=self.cfg.gcg_steps,
            search_width=self.cfg.search_width,
            topk=self.cfg.topk,
            batch_size=self.cfg.gcg_batch_size,
            seed=self.next_seed(),
            allowed_tokens=self._allowed_tokens(model),
            system=self.cfg.system,
            screen_dtype=self.cfg.gcg_screen_dtype,
            rescore_top=self.cfg.gcg_rescore_top,
        )
        for entry, res in zip(chosen, results, strict=True):
            entry.suffix_ids = res.suffix_ids
            entry.loss = res.loss
            entry.refreshes += 1
        return [r.loss for r in results]

    def advance(self, model) -> tuple[list[PoolEntry], list[float], list[int]]:
        """One micro-step of pool upkeep: the scheduled reset, then a refresh.

        Returns the refreshed entries, their GCG losses and the indices reset (if any).
        """
        reset = []
        if self.step > 0 and self.step % self.cfg.reset_every == 0:
            reset = self.reset()
        indices = self.choose_updates()
        losses = self.refresh(model, indices)
        self.last_refreshed = indices
        self.step += 1
        return [self.entries[i] for i in indices], losses, reset

    def state_dict(self) -> dict[str, Any]:
        version, internal, gauss = self.rng.getstate()
        return {
            "config": asdict(self.cfg),
            "step": self.step,
            "rng": {"version": version, "state": list(internal), "gauss": gauss},
            "entries": {
                key: [getattr(e, key) for e in self.entries]
                for key in PoolEntry.__dataclass_fields__
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        entries = state["entries"]
        n = len(entries["behaviour"])
        if n != self.cfg.pool_size:
            raise RgeomError(
                f"saved R2D2 pool has {n} entries but r2d2.pool_size is {self.cfg.pool_size}"
            )
        self.entries = [
            PoolEntry(**{key: entries[key][i] for key in PoolEntry.__dataclass_fields__})
            for i in range(n)
        ]
        self.step = int(state["step"])
        rng = state["rng"]
        self.rng.setstate((rng["version"], tuple(rng["state"]), rng["gauss"]))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.state_dict()))

    def load(self, path: str | Path) -> None:
        try:
            state = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise RgeomError(f"cannot read the R2D2 pool state {path}: {exc}") from exc
        self.load_state_dict(state)


def _right_pad(rows: list[list[int]], labels: list[list[int]], pad_id: int, device):
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    lab = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (r, lb) in enumerate(zip(rows, labels, strict=True)):
        ids[i, : len(r)] = torch.tensor(r)
        lab[i, : len(lb)] = torch.tensor(lb)
        mask[i, : len(r)] = 1
    return ids.to(device), mask.to(device), lab.to(device)


def _unpad_utility(batch: dict[str, torch.Tensor]) -> tuple[list[list[int]], list[list[int]]]:
    """Rows of a collated utility batch without their padding (left or right)."""
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    rows, labs = [], []
    for i in range(ids.shape[0]):
        keep = mask[i].bool()
        rows.append(ids[i][keep].tolist())
        labs.append(labels[i][keep].tolist())
    return rows, labs


def away_loss_terms(logp: torch.Tensor, floor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token ``-log(1 - p)`` and the mask of tokens that count (``log p >= floor``).

    ``-expm1(log p)`` is ``1 - p`` computed without cancellation when p is near 0; log p is
    capped just below 0 so a target the model is certain of gives a large finite loss.
    """
    keep = logp >= floor
    capped = logp.clamp(max=-1e-6)
    return -torch.log(-torch.expm1(capped)), keep


def compute_r2d2_losses(
    model,
    tokenizer,
    utility_batch: dict[str, torch.Tensor] | None,
    pool_entries: Sequence[PoolEntry],
    cfg: R2D2Config,
) -> dict[str, torch.Tensor]:
    """The three R2D2 losses and their total, from ONE padded forward pass.

    Rows: the utility examples (their own labels), then each entry's adversarial prompt
    followed by its affirmative target (away), then the same prompt followed by the refusal
    and EOS (toward). Each term is a token-level mean over its own tokens; the away mean
    counts only tokens with ``log p >= cfg.away_logp_floor`` (zero when none do).
    """
    rows: list[list[int]] = []
    labels: list[list[int]] = []
    kinds: list[str] = []
    if utility_batch is not None:
        u_rows, u_labels = _unpad_utility(utility_batch)
        rows += u_rows
        labels += u_labels
        kinds += ["utility"] * len(u_rows)
    refusal = encode_response(tokenizer, cfg.refusal)
    for kind in ("away", "toward"):
        for e in pool_entries:
            prompt = build_prompt_ids(tokenizer, e.behaviour, e.suffix_ids, cfg.system)
            if kind == "away":
                reply = tokenizer(e.target, add_special_tokens=False, split_special_tokens=True)
                reply = reply["input_ids"]
            else:
                reply = refusal
            rows.append(prompt + reply)
            labels.append([-100] * len(prompt) + reply)
            kinds.append(kind)
    if not rows:
        raise RgeomError("compute_r2d2_losses got neither a utility batch nor pool entries")

    device = model.get_input_embeddings().weight.device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    # Right padding keeps every row's positions 0..len-1, as in unpadded training.
    ids, mask, lab = _right_pad(rows, labels, pad, device)
    logits = model(input_ids=ids, attention_mask=mask).logits

    shift_lab = lab[:, 1:]
    sel = shift_lab != -100
    row_of = torch.arange(ids.shape[0], device=device).unsqueeze(1).expand_as(shift_lab)[sel]
    # Log-softmax only at labelled positions: the full [rows, len, vocab] tensor in float32
    # would be most of the step's memory.
    picked = logits[:, :-1, :][sel].float()
    logp = F.log_softmax(picked, dim=-1).gather(1, shift_lab[sel].unsqueeze(1)).squeeze(1)

    kind_ids = torch.tensor([("utility", "away", "toward").index(k) for k in kinds], device=device)
    token_kind = kind_ids[row_of]
    zero = logits.sum() * 0.0  # keeps the graph when a term has no tokens

    def mean_nll(k: int) -> torch.Tensor:
        m = token_kind == k
        return -logp[m].mean() if m.any() else zero

    utility = mean_nll(0)
    toward = mean_nll(2)
    away_tok, keep = away_loss_terms(logp, cfg.away_logp_floor)
    away_mask = (token_kind == 1) & keep
    away = away_tok[away_mask].mean() if away_mask.any() else zero
    total = utility + cfg.away_coef * away + cfg.toward_coef * toward
    return {"total": total, "away": away, "toward": toward, "utility": utility}


class R2D2Trainer(SFTTrainer):
    """TRL's :class:`~trl.SFTTrainer` whose loss is R2D2's.

    TRL prepares the utility data exactly as for the SFT arm (labels from completion masks,
    truncation or packing), so ``inputs`` is its collated batch (``input_ids``,
    ``attention_mask``, ``labels`` with -100 where no loss is taken). Each call first
    advances the pool (reset when due, GCG refresh with the unwrapped model in eval mode),
    then computes the combined loss.

    ``r2d2_history`` holds one dict per micro-step (loss terms, the refreshed entries' GCG
    losses, indices reset) for the runner to write out; the means of the loss terms and of
    the GCG losses since the last log are added to the Trainer's own logs. The pool is saved
    in every Trainer checkpoint and restored by ``train(resume_from_checkpoint=...)``.
    """

    # compute_loss returns per-micro-batch means, so the Trainer must divide by the
    # gradient-accumulation steps itself.
    loss_is_scaled_for_ga = False

    def __init__(self, *args, pool: R2D2Pool, r2d2_config: R2D2Config | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.pool = pool
        self.r2d2_config = r2d2_config or pool.cfg
        self.r2d2_history: list[dict[str, Any]] = []
        self._since_log: list[dict[str, float]] = []
        # Per-entry GCG results since the last log: (pool index, final GCG loss) pairs.
        self._refreshed_since_log: list[tuple[int, float]] = []

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        tokenizer = self.processing_class
        if tokenizer is None:
            raise RgeomError("R2D2Trainer needs the tokenizer as processing_class")
        unwrapped = self.accelerator.unwrap_model(model)
        # gcg() switches to eval mode (no dropout) and back; autograd.grad inside it leaves
        # the weights' .grad untouched.
        entries, gcg_losses, reset = self.pool.advance(unwrapped)
        batch = {k: inputs[k] for k in ("input_ids", "attention_mask", "labels")}
        losses = compute_r2d2_losses(model, tokenizer, batch, entries, self.r2d2_config)
        terms = {f"r2d2_{k}": float(v.detach()) for k, v in losses.items()}
        terms["r2d2_gcg_loss"] = sum(gcg_losses) / len(gcg_losses)
        self._since_log.append(terms)
        self._refreshed_since_log.extend(
            zip(self.pool.last_refreshed, map(float, gcg_losses), strict=True)
        )
        self.r2d2_history.append(
            {
                "global_step": self.state.global_step,
                "pool_step": self.pool.step,
                **{k: v for k, v in terms.items() if k != "r2d2_gcg_loss"},
                "gcg_entries": list(self.pool.last_refreshed),
                "gcg_losses": gcg_losses,
                "refreshed": [e.behaviour_id for e in entries],
                "reset": reset,
            }
        )
        if return_outputs:
            return losses["total"], losses
        return losses["total"]

    def _save_checkpoint(self, model, trial) -> None:
        # Written before the Trainer's own files: the runner treats trainer_state.json as the
        # mark of a complete checkpoint, so a checkpoint that has it also has the pool.
        folder = Path(self._get_output_dir(trial)) / f"checkpoint-{self.state.global_step}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / pool_file(self.args.process_index)
        tmp = path.with_suffix(".partial")
        self.pool.save(tmp)
        os.replace(tmp, path)
        super()._save_checkpoint(model, trial)

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        if resume_from_checkpoint:
            folder = resume_from_checkpoint
            if folder is True:
                from transformers.trainer_utils import get_last_checkpoint

                folder = get_last_checkpoint(self.args.output_dir)
            path = Path(folder) / pool_file(self.args.process_index) if folder else None
            if path is not None and path.exists():
                self.pool.load(path)
            else:
                log.warning("resuming from %s without an R2D2 pool state: fresh pool", folder)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self._since_log and "loss" in logs:
            for key in self._since_log[0]:
                values = [t[key] for t in self._since_log]
                logs[key] = sum(values) / len(values)
            self._since_log = []
            # Every refreshed entry's own GCG loss, not only the mean: the runner writes
            # these as the train log's list columns.
            logs["r2d2_gcg_entries"] = [i for i, _ in self._refreshed_since_log]
            logs["r2d2_gcg_losses"] = [loss for _, loss in self._refreshed_since_log]
            self._refreshed_since_log = []
        super().log(logs, start_time)


def pool_file(rank: int) -> str:
    return f"r2d2_pool-rank{rank}.json"


def config_from_params(params: dict[str, Any]) -> R2D2Config:
    """``R2D2Config`` from the run's ``r2d2`` config section; the run seed is the default."""
    section = dict(params.get("r2d2") or {})
    known = set(R2D2Config.__dataclass_fields__)
    unknown = sorted(set(section) - known)
    if unknown:
        raise RgeomError(f"config key r2d2.{unknown[0]} is unknown (known: {sorted(known)})")
    section.setdefault("seed", params.get("seed", 0))
    return R2D2Config(**section)


def behaviours_from_prompt_table(path: str | Path) -> list[R2D2Behaviour]:
    """Behaviours from a prompt table (``rgeom.data`` format) with its ``target`` column."""
    from rgeom.data import read_prompts

    table = read_prompts(path).to_pydict()
    return [
        R2D2Behaviour(pid, text, (target,) if target else (), context or "")
        for pid, text, target, context in zip(
            table["prompt_id"], table["text"], table["target"], table["context"], strict=True
        )
    ]


def load_behaviours(extra: dict[str, str], exclude: Iterable[str] = ()) -> list[R2D2Behaviour]:
    """R2D2 behaviours named by the train stage's extra inputs, in file order, ids deduped.

    ``r2d2_behaviours``: one or more files separated by ``,`` (the reference pool is
    ``adv_training_behaviors.csv`` plus HarmBench val), each a prompt table (.parquet,
    targets in its ``target`` column) or a HarmBench behaviours CSV; CSVs need
    ``r2d2_targets``, one or more targets JSON files merged. A behaviour id in several files
    is kept once (first file wins) and must name the same behaviour; ids in ``exclude`` are
    left out. Contextual behaviours are dropped by the pool, at init and reset alike.
    """
    paths = split_paths(extra.get("r2d2_behaviours"))
    if not paths:
        raise RgeomError("the r2d2 arm needs the extra input r2d2_behaviours=PATH[,PATH...]")
    skip = set(exclude)
    targets = None
    seen: dict[str, R2D2Behaviour] = {}
    for path in paths:
        if str(path).endswith(".csv"):
            if targets is None:
                target_files = split_paths(extra.get("r2d2_targets"))
                if not target_files:
                    raise RgeomError(
                        f"r2d2_behaviours={path} is a CSV: pass r2d2_targets=JSON[,JSON...] too"
                    )
                targets = load_targets(target_files)
            rows = load_harmbench_behaviours(path, targets, skip)
        else:
            rows = [b for b in behaviours_from_prompt_table(path) if b.behaviour_id not in skip]
        for b in rows:
            first = seen.setdefault(b.behaviour_id, b)
            if first.behaviour != b.behaviour:
                raise RgeomError(
                    f"R2D2 behaviour id {b.behaviour_id!r} names different behaviours in "
                    f"the files {', '.join(paths)}"
                )
    return list(seen.values())


def make_r2d2_trainer(params: dict[str, Any], extra: dict[str, str], tokenizer):
    """``(trainer_class, extra_trainer_kwargs)`` for the training runner's r2d2 arm.

    Each process keeps its own pool of ``pool_size`` entries, seeded ``seed + rank`` so that
    ranks attack different entries instead of repeating the same GCG.
    """
    cfg = config_from_params(params)
    rank = int(os.environ.get("RANK", "0"))
    pool_cfg = replace(cfg, seed=cfg.seed + rank)
    pool = R2D2Pool(load_behaviours(extra, cfg.exclude), tokenizer, pool_cfg)
    return R2D2Trainer, {"pool": pool, "r2d2_config": cfg}


__all__ = [
    "PoolEntry",
    "R2D2Behaviour",
    "R2D2Config",
    "R2D2Pool",
    "R2D2Trainer",
    "away_loss_terms",
    "behaviours_from_pairs",
    "compute_r2d2_losses",
    "config_from_params",
    "load_behaviours",
    "load_harmbench_behaviours",
    "load_targets",
    "make_r2d2_trainer",
    "split_paths",
]
