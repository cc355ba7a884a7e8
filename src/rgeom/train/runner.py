"""One training runner for every arm, on TRL's ``SFTTrainer`` (DeepSpeed ZeRO when configured).

TRL does the data side: the pre-tokenized rows of :func:`rgeom.train.data.sft_dataset`
become labels from their completion masks and, with ``train.packing``, are packed into
``train.max_length`` blocks across document boundaries, as the reference recipe's packer
did. The R2D2 arm's trainer is an ``SFTTrainer`` with R2D2's loss.

Layout under the arm's results folder::

    checkpoints/step-000010/   declared Snakemake outputs: plain HF dirs (safetensors)
    train_state/resume/        Trainer checkpoints (optimizer, scheduler, RNG, data position)
    train_state/anchors/       every exported anchor, kept across reruns
    train_state/log.jsonl      per-step metrics; a resumed segment replaces its own steps
    train_state/fingerprint.json  what the state was trained with (see below)
    train_log.parquet          the per-step metrics table (rule ``train_log``)

Resume state is saved at every anchor and every ``train.save_every`` steps. On SIGTERM (what
SLURM sends at the time limit) or SIGUSR1 (an early warning, ``sbatch --signal``) the runner
finishes the current step, saves resume state and exits with status 128 + the signal. Given
the job's time limit (``time_limit_s``), it also stops by itself once the time left would
not fit another step and a save (``train.save_margin_s``): SLURM's SIGTERM comes only 30 s
before the kill, too late to save a 7B state. SIGKILL loses the steps since the last save.

Snakemake deletes a job's declared outputs before rerunning it, so anchors are exported
into ``train_state/anchors`` first and hard-linked into ``checkpoints`` at the end: a
preempted or extended run resumes from its last state instead of retraining from zero.

The workflow runs one job per (arm, anchor): the job for anchor b resumes from the state
saved at the anchor before it and stops at b, so adding a later anchor adds one job and
leaves the earlier checkpoints (and everything measured on them) alone. The state is only
reused when its fingerprint (every training parameter except the anchors, and except
``max_steps`` under a schedule that does not depend on it) matches; otherwise it is
discarded, so a changed learning rate can never publish a stale checkpoint.

The DeepSpeed launcher setup is :mod:`rgeom.train.launch`, the resume state and stop signals
:mod:`rgeom.train.resume`, the per-step log :mod:`rgeom.train.train_log`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rgeom.config import section_with_defaults, setting
from rgeom.errors import RgeomError
from rgeom.io import atomic_dir
from rgeom.layout import step_dir
from rgeom.schemas import TRAIN_LOG_SCHEMA
from rgeom.train.launch import (
    DEEPSPEED_DIR,
    check_deepspeed_config,
    deepspeed_config_path,
    ensure_launcher_env,
)
from rgeom.train.resume import (
    DEADLINE_STOP,
    StopOnSignal,
    input_fingerprint,
    latest_resume,
    training_fingerprint,
)
from rgeom.train.train_log import (
    KNOWN_LOG_KEYS,
    LIST_LOG_KEYS,
    append_log_row,
    log_row,
    truncate_log,
    write_train_log,
)

log = logging.getLogger(__name__)

# The launcher, resume and log names stay importable from here, where they have always been.
__all__ = [
    "DEADLINE_STOP",
    "DEEPSPEED_DIR",
    "KNOWN_LOG_KEYS",
    "LEFT_GROUP",
    "LIST_LOG_KEYS",
    "TRAIN_LOG_SCHEMA",
    "ArmFiles",
    "anchor_name",
    "deepspeed_config_path",
    "train_arm",
    "training_fingerprint",
    "write_train_log",
]


def anchor_name(step: int) -> str:
    return step_dir(step)


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def _make_callback(runner: _Runner):
    from transformers import TrainerCallback

    class AnchorCallback(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            # After a resume the count starts from the restored state, not from zero.
            runner.tokens_at_step = state.num_input_tokens_seen

        def on_step_begin(self, args, state, control, **kwargs):
            runner.step_started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            step = state.global_step
            runner.step_seconds = time.perf_counter() - runner.step_started
            if step in runner.anchors:
                runner.export_anchor(step)
                control.should_save = True
            if step >= runner.stop_at:
                control.should_training_stop = True
            elif runner.save_every and step % runner.save_every == 0:
                control.should_save = True
            if runner.out_of_time():
                runner.stop.signum = runner.stop.signum or DEADLINE_STOP
            if runner.stop_requested(args.device):
                log.warning("stop requested: saving resume state at step %d", step)
                control.should_save = True
                control.should_training_stop = True
            return control

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                runner.record(state.global_step, logs, state.num_input_tokens_seen)

    return AnchorCallback()


@dataclass(frozen=True)
class ArmFiles:
    """Where one arm trains from and writes to (see the module docstring's layout).

    ``log_table`` None: the per-step metrics stay in ``state_dir`` (the workflow writes the
    table in a rule of its own).
    """

    model_dir: str | Path
    data: str
    out_dir: str | Path
    state_dir: str | Path
    log_table: str | Path | None

    @classmethod
    def beside(
        cls, model_dir: str | Path, data: str, out_dir: str | Path, write_log: bool = True
    ) -> ArmFiles:
        """The results layout's files: the resume state and the metrics table beside
        ``out_dir`` (``train_state/`` and ``train_log.parquet`` in its parent folder)."""
        out = Path(out_dir)
        log_table = out.parent / "train_log.parquet" if write_log else None
        return cls(model_dir, data, out, out.parent / "train_state", log_table)


class _Runner:
    def __init__(
        self,
        arm,
        files: ArmFiles,
        params,
        extra,
        meta,
        time_limit_s: float | None = None,
    ):
        self.arm = arm
        self.model_dir = Path(files.model_dir)
        self.data = files.data
        self.out_dir = Path(files.out_dir)
        self.state_dir = Path(files.state_dir)
        self.log_table = Path(files.log_table) if files.log_table else None
        self.params = params
        self.extra = extra
        self.meta = meta
        train = params.get("train") or {}
        # The train section with the schema's defaults, but for max_steps (self.max_steps).
        self.train_cfg = section_with_defaults("train", train)
        del self.train_cfg["max_steps"]
        self.model_cfg = section_with_defaults("model", params.get("model"))
        anchors = setting(params, "anchors")
        self.anchors = sorted(a for a in anchors if a > 0)
        # Not train.max_steps' schema default: the workflow leaves max_steps out under a
        # schedule that does not depend on it (stage_params.training_settings), and training
        # then stops at the last anchor.
        self.max_steps = train.get("max_steps", max(self.anchors, default=0))
        self.save_every = self.train_cfg["save_every"]
        self.store = self.state_dir / "anchors"
        self.resume_dir = self.state_dir / "resume"
        self.log_path = self.state_dir / "log.jsonl"
        self.step_started = time.perf_counter()
        self.step_seconds = 0.0
        self.tokens_at_step = 0
        self.stop_at = max(self.anchors, default=0)
        self.trainer = None
        self.collator = None
        self.tokenizer = None
        self.stop = StopOnSignal()
        self.started = time.monotonic()
        self.time_limit_s = time_limit_s
        self.save_margin_s = float(self.train_cfg["save_margin_s"])

    def out_of_time(self) -> bool:
        """True when another step and a save might not fit in the job's time limit."""
        if not self.time_limit_s:
            return False
        left = self.time_limit_s - (time.monotonic() - self.started)
        return left < self.save_margin_s + 2 * self.step_seconds

    def stop_requested(self, device) -> bool:
        flag = self.stop.signum is not None
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # Ranks see the signal at different steps; saving is collective, so they must
            # agree on the step at which to save and stop.
            t = torch.tensor([int(flag)], device=device)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
            flag = bool(t.item())
        return flag

    # -- logging -----------------------------------------------------------------------
    def record(self, step: int, logs: dict[str, Any], tokens_seen: int) -> None:
        if _rank() != 0:
            return
        # The Trainer counts tokens as they enter the step (the dataloader prefetches, so a
        # count taken in the collator would land in the wrong step).
        tokens = tokens_seen - self.tokens_at_step
        self.tokens_at_step = tokens_seen
        tokens_per_s = tokens / self.step_seconds if self.step_seconds > 0 else float("nan")
        append_log_row(self.log_path, log_row(step, logs, tokens_per_s, self.step_seconds))

    def _truncate_log(self, resume_step: int, end_step: int) -> None:
        # Rank 0 is the log's only writer.
        if _rank() == 0:
            truncate_log(self.log_path, resume_step, end_step)

    # -- anchors -----------------------------------------------------------------------
    def export_anchor(self, step: int) -> None:
        final = self.store / anchor_name(step)
        partial = self.store / f".{anchor_name(step)}.partial"
        if _rank() == 0:
            shutil.rmtree(partial, ignore_errors=True)
        _barrier()
        # save_model gathers ZeRO-3 shards, so every rank must call it.
        self.trainer.save_model(str(partial))
        if _rank() == 0:
            self.tokenizer.save_pretrained(partial)
            (partial / "rgeom_checkpoint.json").write_text(
                json.dumps({"arm": self.arm, "step": step, "base_model": str(self.model_dir)})
            )
            for leftover in ("training_args.bin",):
                (partial / leftover).unlink(missing_ok=True)
            if final.exists():
                shutil.rmtree(final)
            os.replace(partial, final)
        _barrier()
        log.info("anchor step %d exported", step)

    def publish(self) -> None:
        """Hard-link every stored anchor into the declared output folders."""
        for step in self.anchors:
            src = self.store / anchor_name(step)
            if not src.exists():
                raise RgeomError(f"anchor {step} was not produced (expected {src})")
            with atomic_dir(self.out_dir / anchor_name(step)) as tmp:
                for f in src.iterdir():
                    try:
                        os.link(f, tmp / f.name)
                    except OSError:
                        shutil.copy2(f, tmp / f.name)

    def write_log(self) -> None:
        write_train_log(self.state_dir, self.log_table, {**self.meta, "arm": self.arm})

    # -- state -------------------------------------------------------------------------
    def check_fingerprint(self) -> None:
        """Discard resume state and stored anchors trained with other parameters or inputs."""
        path = self.state_dir / "fingerprint.json"
        want = {
            "params": training_fingerprint(self.params),
            "inputs": input_fingerprint(self.model_dir, self.data, self.extra),
        }
        if path.exists():
            try:
                have = json.loads(path.read_text())
            except json.JSONDecodeError:
                have = None
            if have == want:
                return
            if _rank() == 0:
                log.warning(
                    "training parameters or inputs of arm %s changed since %s was written: "
                    "discarding its resume state and stored anchors",
                    self.arm,
                    self.state_dir,
                )
                for stale in (self.resume_dir, self.store):
                    shutil.rmtree(stale, ignore_errors=True)
                self.log_path.unlink(missing_ok=True)
        if _rank() == 0:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text(json.dumps(want, sort_keys=True))
            os.replace(tmp, path)
        _barrier()

    # -- training ----------------------------------------------------------------------
    def training_args(self):
        from trl import SFTConfig

        cfg = self.train_cfg
        seed = setting(self.params, "seed")
        dtype = self.model_cfg["dtype"]
        cuda = torch.cuda.is_available() and self.model_cfg["device"] != "cpu"
        # Explicit: SFTConfig defaults to checkpointing on, which would slow every small run
        # (activation_checkpointing is the transformers 5 name of gradient_checkpointing).
        kwargs: dict[str, Any] = {"activation_checkpointing": bool(cfg["gradient_checkpointing"])}
        stage = cfg["zero_stage"]
        expected = deepspeed_config_path(stage, cfg["offload"])
        if expected is not None:
            kwargs["deepspeed"] = check_deepspeed_config(
                self.extra.get("deepspeed"), stage, expected
            )
            ensure_launcher_env()
        return SFTConfig(
            output_dir=str(self.resume_dir),
            # The rows are pre-tokenized (input_ids + completion_mask): TRL builds the labels,
            # truncates to max_length or packs into max_length blocks.
            max_length=cfg["max_length"],
            completion_only_loss=True,
            packing=cfg["packing"],
            # The reference's packer concatenates documents and cuts fixed-length blocks,
            # attention crossing document boundaries: TRL's "wrapped" strategy.
            packing_strategy="wrapped",
            dataset_num_proc=None,
            # Under a decaying schedule the total sets the learning rate at every step;
            # otherwise it is the last anchor, where training stops.
            max_steps=self.max_steps,
            per_device_train_batch_size=cfg["batch_size"],
            gradient_accumulation_steps=cfg["grad_accum"],
            learning_rate=cfg["learning_rate"],
            lr_scheduler_type=cfg["lr_scheduler"],
            warmup_steps=cfg["warmup_steps"],
            weight_decay=cfg["weight_decay"],
            logging_steps=1,
            save_strategy="steps",
            # Saving is driven by the anchor callback; this only keeps the default saver quiet.
            save_steps=10**9,
            save_total_limit=1,
            seed=seed,
            data_seed=seed,
            report_to=[],
            use_cpu=not cuda,
            # Mixed precision, float32 master weights: autocast on CUDA and on the CPU alike
            # (on a CPU with native bfloat16, AVX512-BF16 or AMX, matmuls run about 4x faster).
            bf16=dtype == "bfloat16",
            fp16=cuda and dtype == "float16",
            dataloader_num_workers=0,
            include_num_input_tokens_seen="non_padding",
            remove_unused_columns=False,
            disable_tqdm=False,
            **kwargs,
        )

    def run(self) -> None:
        from trl import SFTTrainer

        from rgeom.models import load_model, load_tokenizer
        from rgeom.train.data import sft_dataset

        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.check_fingerprint()
        last_anchor = max(self.anchors, default=0)
        stored = [s for s in self.anchors if (self.store / anchor_name(s)).exists()]
        if last_anchor == 0 or stored == self.anchors:
            log.info("every anchor of arm %s is already trained; publishing", self.arm)
        else:
            trust = self.model_cfg["trust_remote_code"]
            self.tokenizer = load_tokenizer(self.model_dir, trust_remote_code=trust)
            model = load_model(self.model_dir, dtype="float32", trust_remote_code=trust)
            model.train()
            dataset = sft_dataset(self.data, self.tokenizer)
            args = self.training_args()
            # Stop at the last anchor: later steps would be computed and thrown away.
            self.stop_at = last_anchor
            trainer_cls, trainer_kwargs = self._arm_trainer(SFTTrainer)
            self.trainer = trainer_cls(
                model=model,
                args=args,
                train_dataset=dataset,
                processing_class=self.tokenizer,
                callbacks=[_make_callback(self)],
                **trainer_kwargs,
            )
            resume = latest_resume(self.resume_dir, last_anchor)
            if resume is not None:
                step = int(resume.name.split("-")[1])
                log.info("resuming arm %s from %s", self.arm, resume)
                self._truncate_log(step, last_anchor)
            else:
                self._truncate_log(0, last_anchor)
            with self.stop:
                self.trainer.train(resume_from_checkpoint=str(resume) if resume else None)
            done = self.trainer.state.global_step
            if self.stop.signum is not None and done < last_anchor:
                log.warning(
                    "arm %s stopped by signal %d at step %d of %d (resume state saved; "
                    "rerun to resume)",
                    self.arm,
                    self.stop.signum,
                    done,
                    last_anchor,
                )
                # The anchors are incomplete, so the job must fail; 128 + signal is how a
                # shell (and SLURM, Snakemake) reports a process ended by that signal.
                raise SystemExit(128 + self.stop.signum)
        if _rank() == 0:
            self.publish()
            if self.log_table is not None:
                self.write_log()

    def _arm_trainer(self, base):
        if self.arm == "sft":
            return base, {}
        if self.arm == "r2d2":
            from rgeom.train.r2d2 import make_r2d2_trainer

            return make_r2d2_trainer(self.params, self.extra, self.tokenizer)
        raise RgeomError(f"unknown arm {self.arm!r} (known: sft, r2d2)")


def train_arm(
    arm: str,
    files: ArmFiles,
    params: dict[str, Any],
    extra: dict[str, str],
    meta: dict[str, Any],
    time_limit_s: float | None = None,
) -> None:
    """Train ``arm`` from ``files.model_dir`` on ``files.data``; export every anchor under
    ``files.out_dir``.

    The per-step metrics go to ``files.log_table`` unless it is None.
    ``time_limit_s``: the job's wall-clock limit, counted from this call; the run saves and
    stops ``train.save_margin_s`` (plus two steps) before it.
    """
    runner = _Runner(arm, files, params, extra, meta, time_limit_s=time_limit_s)
    runner.run()
    _leave_process_group()


# (rank, world size, backend) of the process group the last train_arm left: rgeom.slurm_rank
# reports it after the command returns, when the group itself is gone.
LEFT_GROUP: tuple[int, int, str] | None = None


def _leave_process_group() -> None:
    """Tear the process group down once the anchors are out.

    Left to interpreter exit, a rank whose gloo (or DeepSpeed shared-memory) threads were
    still alive could abort ("terminate called without an active exception", SIGABRT) after
    a finished run, and the launcher then reported the whole training job failed.
    """
    global LEFT_GROUP
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        LEFT_GROUP = (dist.get_rank(), dist.get_world_size(), str(dist.get_backend()))
        dist.destroy_process_group()
