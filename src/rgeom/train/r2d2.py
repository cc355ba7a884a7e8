"""R2D2: HarmBench's Robust Refusal Dynamic Defense (Mazeika et al. 2024), our implementation.

A pool of persistent adversarial test cases (behaviour, affirmative target, GCG suffix) is
kept alongside training. Every training micro-step:

1. ``updates_per_step`` pool entries are refreshed by a few GCG steps against the current
   model, warm-started from each entry's suffix, so the attacks track the model as it moves.
2. One padded forward pass over the utility batch and the refreshed adversarial prompts gives
   three losses: *away* (push probability off the affirmative target), *toward* (CE on a
   refusal + EOS for the same prompts) and *utility* (SFT CE on chat examples).
3. total = utility + away_coef * away + toward_coef * toward.

Every ``reset_every`` optimizer steps a fraction of the pool restarts from fresh behaviours,
targets and ``"! " * n`` suffixes, so the pool does not collapse onto a few hard cases.

One pool, whatever the number of processes. Every rank builds it from the same seed and
draws the same refresh order; rank r refreshes and trains on the r-th contiguous slice of
that order, then the refreshed suffixes are all-gathered so every rank holds the same pool
again. Each entry's GCG has its own seed, so 1 and N processes refresh it identically. This
is the reference's split too (HarmBench runs every entry's GCG on all ranks, candidates
divided between them, and rank r trains on the r-th slice of the refreshed entries).

The pool is plain data (a dict of lists, its RNG state included) so a run can resume.

This module holds the pool and the trainer that keeps it; the behaviours and test cases are
:mod:`rgeom.train.r2d2_cases`, the hyper-parameters :mod:`rgeom.train.r2d2_config` and the
losses :mod:`rgeom.train.r2d2_losses`.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from trl import SFTTrainer

from rgeom.attacks.gcg import GCGSettings, _vocab_size, ascii_token_ids, gcg, suffix_ids_in_context
from rgeom.errors import RgeomError

# Also importable from here, where the R2D2 names have always been.
from rgeom.train.r2d2_cases import (
    PoolEntry,
    R2D2Behaviour,
    behaviours_from_pairs,
    load_behaviours,
    load_harmbench_behaviours,
    load_r2d2_targets,
    split_paths,
)
from rgeom.train.r2d2_config import R2D2Config, config_from_params
from rgeom.train.r2d2_losses import away_loss, away_loss_terms, compute_r2d2_losses

log = logging.getLogger(__name__)


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
        self.entries = [self._fresh_entry(b) for b in self._initial_behaviours()]

    def _initial_behaviours(self) -> list[R2D2Behaviour]:
        # Distinct behaviours, as the reference draws its pool (without replacement); a pool
        # larger than the behaviour list takes further shuffled passes over it.
        out: list[R2D2Behaviour] = []
        while len(out) < self.cfg.pool_size:
            n = min(len(self.behaviours), self.cfg.pool_size - len(out))
            out += [self.behaviours[i] for i in self.rng.sample(range(len(self.behaviours)), n)]
        return out

    def _fresh_suffix(self, behaviour: str) -> list[int]:
        n = self.rng.randint(self.cfg.suffix_min, self.cfg.suffix_max)
        # Encoded after the behaviour, as GCG's round-trip filter requires: encoded alone,
        # "! ! !" starts with a bare "!" that the separator space would join on replay.
        return suffix_ids_in_context(
            self.tokenizer, behaviour, self.cfg.suffix_unit * n, self.cfg.system
        )

    def _fresh_entry(self, b: R2D2Behaviour | None = None) -> PoolEntry:
        # Target and suffix length are drawn per entry from one running RNG; reseeding per
        # entry, as the reference's initial pool does, gives every entry the same length and
        # target index (its resets use one running RNG, as here).
        if b is None:
            b = self.rng.choice(self.behaviours)
        target = self.rng.choice(b.targets)
        return PoolEntry(b.behaviour_id, b.behaviour, target, self._fresh_suffix(b.behaviour))

    def choose_updates(self) -> list[int]:
        """Entries to refresh this micro-step: distinct, uniformly drawn, in random order.

        The order decides which process trains on which entry (contiguous slices), as the
        reference's shuffled test-case loader does.
        """
        return self.rng.sample(range(len(self.entries)), self.cfg.updates_per_step)

    def reset_due(self, grad_accum: int = 1) -> bool:
        """Whether this micro-step starts with a reset: the reference's ``step % p == p - 1``
        for the micro-step index ``step`` and ``p = reset_every * grad_accum``."""
        period = self.cfg.reset_every * grad_accum
        return self.step % period == period - 1

    def reset(self) -> list[int]:
        """Restart ``int(reset_fraction * pool_size)`` entries from scratch; their indices."""
        k = int(self.cfg.reset_fraction * len(self.entries))
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

    def _gcg(self, model, index: int, seed: int, collective: bool) -> tuple[list[int], float]:
        entry = self.entries[index]
        settings = GCGSettings(
            steps=self.cfg.gcg_steps,
            search_width=self.cfg.search_width,
            topk=self.cfg.topk,
            batch_size=self.cfg.gcg_batch_size,
            system=self.cfg.system,
            screen_dtype=self.cfg.gcg_screen_dtype,
            rescore_top=self.cfg.gcg_rescore_top,
            keep_best=self.cfg.gcg_keep_best,
            collective=collective,
        )
        (res,) = gcg(
            model,
            self.tokenizer,
            [entry.behaviour],
            [entry.target],
            settings,
            seed=seed,
            suffixes=[entry.suffix_ids],
            allowed_tokens=self._allowed_tokens(model),
        )
        return res.suffix_ids, res.loss

    def refresh(self, model, indices: Sequence[int], rank: int = 0, world: int = 1) -> list[float]:
        """GCG on the entries ``indices`` against ``model``, warm-started; their losses.

        Each entry gets its own seed from the pool's RNG, drawn on every rank, so an entry's
        refresh does not depend on which process runs it. With ``world`` > 1 (an initialised
        default process group), rank ``rank`` runs the ``rank``-th contiguous slice and the
        results are all-gathered: every rank ends with the same pool.
        """
        indices = list(indices)
        seeds = [self.next_seed() for _ in indices]
        if len(indices) % world:
            raise RgeomError(
                f"r2d2.updates_per_step ({len(indices)}) must be a multiple of the number of "
                f"training processes ({world}): each trains on an equal share of the refreshed "
                "entries, as in the reference"
            )
        per = len(indices) // world
        mine = slice(rank * per, (rank + 1) * per)
        done = [
            self._gcg(model, i, seed, world > 1)
            for i, seed in zip(indices[mine], seeds[mine], strict=True)
        ]
        if world > 1:
            import torch.distributed as dist

            gathered: list[Any] = [None] * world
            dist.all_gather_object(gathered, done)
            done = [item for part in gathered for item in part]
        for i, (suffix_ids, loss) in zip(indices, done, strict=True):
            entry = self.entries[i]
            entry.suffix_ids = list(suffix_ids)
            entry.loss = loss
            entry.refreshes += 1
        return [loss for _, loss in done]

    def advance(
        self, model, grad_accum: int = 1, rank: int | None = None, world: int | None = None
    ) -> tuple[list[PoolEntry], list[float], list[int]]:
        """One micro-step of pool upkeep: the scheduled reset, then a refresh.

        ``grad_accum``: micro-steps per optimizer step (resets are counted in optimizer
        steps). ``rank``/``world`` default to the default process group's, or 0/1.
        Returns the entries this rank trains on (its slice of the refresh), the GCG losses of
        every refreshed entry (in the order of ``last_refreshed``) and the indices reset.
        """
        if rank is None or world is None:
            rank, world = process_rank_and_world()
        reset = self.reset() if self.reset_due(grad_accum) else []
        indices = self.choose_updates()
        losses = self.refresh(model, indices, rank, world)
        self.last_refreshed = indices
        self.step += 1
        per = len(indices) // world
        return [self.entries[i] for i in indices[rank * per : (rank + 1) * per]], losses, reset

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


def process_rank_and_world() -> tuple[int, int]:
    """This process's rank and the process count of the default group (0, 1 without one)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


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
        entries, gcg_losses, reset = self.pool.advance(
            unwrapped, grad_accum=self.args.gradient_accumulation_steps
        )
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
                "refreshed": [self.pool.entries[i].behaviour_id for i in self.pool.last_refreshed],
                "reset": reset,
            }
        )
        if return_outputs:
            return losses["total"], losses
        return losses["total"]

    def _save_checkpoint(self, model, trial) -> None:
        # Written before the Trainer's own files: the runner treats trainer_state.json as the
        # mark of a complete checkpoint, so a checkpoint that has it also has the pool.
        # Every rank holds the same pool: the processes that write checkpoints write it.
        if self.args.should_save:
            folder = Path(self._get_output_dir(trial)) / f"checkpoint-{self.state.global_step}"
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / pool_file()
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
            path = Path(folder) / pool_file() if folder else None
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


def pool_file() -> str:
    """The pool state's name in a checkpoint: one file, the pool being the same on every rank."""
    return "r2d2_pool.json"


def make_r2d2_trainer(params: dict[str, Any], extra: dict[str, str], tokenizer):
    """``(trainer_class, extra_trainer_kwargs)`` for the training runner's r2d2 arm.

    Every process builds the same pool from the run's seed (see the module docstring); the
    refresh is split between the processes, so ``updates_per_step`` must divide evenly.
    """
    cfg = config_from_params(params)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.updates_per_step % world:
        raise RgeomError(
            f"r2d2.updates_per_step ({cfg.updates_per_step}) must be a multiple of the number "
            f"of training processes ({world}, train.num_gpus): each trains on an equal share "
            "of the refreshed entries, as in the reference"
        )
    pool = R2D2Pool(load_behaviours(extra, cfg.exclude), tokenizer, cfg)
    return R2D2Trainer, {"pool": pool, "r2d2_config": cfg}


__all__ = [
    "PoolEntry",
    "R2D2Behaviour",
    "R2D2Config",
    "R2D2Pool",
    "R2D2Trainer",
    "away_loss",
    "away_loss_terms",
    "behaviours_from_pairs",
    "compute_r2d2_losses",
    "config_from_params",
    "load_behaviours",
    "load_harmbench_behaviours",
    "load_r2d2_targets",
    "make_r2d2_trainer",
    "pool_file",
    "process_rank_and_world",
    "split_paths",
]
