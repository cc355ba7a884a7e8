"""R2D2's hyper-parameters (HarmBench's reference values by default) and their config section."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rgeom.attacks.gcg import screen_dtype_from_name
from rgeom.config import schema_default, setting
from rgeom.errors import RgeomError


@dataclass
class R2D2Config:
    """R2D2 hyper-parameters. Defaults are the config schema's (``r2d2`` section, ``seed``
    for the seed): HarmBench's reference values (``run_sft_adv_training.py`` and
    ``adv_training_utils.py`` in rangell/reinforce-attacks-llms).

    pool_size: persistent test cases, one global pool whatever the number of processes
        (ref ``NUM_SINGLE_BEHAVIOR_TEST_CASES`` = 8). The initial entries are distinct
        behaviours while the behaviours last.
    updates_per_step: entries refreshed by GCG per training micro-step, split between the
        processes (ref ``NUM_TEST_CASES_TO_UPDATE_PER_STEP`` = 8, the whole pool; it must be a
        multiple of the process count, as in the reference).
    gcg_steps / search_width / topk: GCG per refresh (ref 5 / 512 / 256).
    gcg_keep_best: GCG moves only to a candidate that beats the current suffix (our option);
        False, the reference, moves to each step's argmin candidate and keeps the last one.
    gcg_batch_size: candidates per GCG forward pass; None = all at once (memory knob only).
    gcg_screen_dtype / gcg_rescore_top: screen candidates in this precision, rescore the best
        few exactly (see :func:`rgeom.attacks.gcg.gcg`); None = exact scoring (ref).
    reset_every / reset_fraction: every 50 optimizer steps (``reset_every * grad_accum``
        micro-steps, before the last micro-step of that optimizer step), int(0.2 * pool_size)
        entries restart (ref: 1 of 8).
    suffix_unit / suffix_min / suffix_max: fresh suffixes are ``"! " * n``, n uniform in
        [15, 20] per entry (ref).
    refusal: the toward-loss string, followed by EOS (ref "Sorry, I can't do that.").
    away_coef / toward_coef: weights of the two adversarial terms (ref 0.5 each).
    away_logp_floor: target tokens with log p below this are already unlikely and count zero
        in the away loss, which still divides by all target tokens (ref -5).
    seed: the pool's RNG seed (entry draws, refresh choice, GCG seeds).
    system: optional system prompt for the adversarial prompts.
    exclude: behaviour ids left out of the pool (default: the one standard HarmBench val
        behaviour that ``adv_training_val_targets.json`` has no targets for).
    """

    pool_size: int = schema_default("r2d2.pool_size")
    updates_per_step: int = schema_default("r2d2.updates_per_step")
    gcg_steps: int = schema_default("r2d2.gcg_steps")
    search_width: int = schema_default("r2d2.search_width")
    topk: int = schema_default("r2d2.topk")
    gcg_keep_best: bool = schema_default("r2d2.gcg_keep_best")
    gcg_batch_size: int | None = schema_default("r2d2.gcg_batch_size")
    gcg_screen_dtype: str | None = schema_default("r2d2.gcg_screen_dtype")
    gcg_rescore_top: int = schema_default("r2d2.gcg_rescore_top")
    reset_every: int = schema_default("r2d2.reset_every")
    reset_fraction: float = schema_default("r2d2.reset_fraction")
    suffix_unit: str = schema_default("r2d2.suffix_unit")
    suffix_min: int = schema_default("r2d2.suffix_min")
    suffix_max: int = schema_default("r2d2.suffix_max")
    refusal: str = schema_default("r2d2.refusal")
    away_coef: float = schema_default("r2d2.away_coef")
    toward_coef: float = schema_default("r2d2.toward_coef")
    away_logp_floor: float = schema_default("r2d2.away_logp_floor")
    seed: int = schema_default("seed")
    system: str | None = schema_default("r2d2.system")
    exclude: tuple[str, ...] = tuple(schema_default("r2d2.exclude"))

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


def config_from_params(params: dict[str, Any]) -> R2D2Config:
    """``R2D2Config`` from the run's ``r2d2`` config section; the run seed is the default."""
    section = dict(params.get("r2d2") or {})
    known = set(R2D2Config.__dataclass_fields__)
    unknown = sorted(set(section) - known)
    if unknown:
        raise RgeomError(f"config key r2d2.{unknown[0]} is unknown (known: {sorted(known)})")
    section.setdefault("seed", setting(params, "seed"))
    return R2D2Config(**section)
