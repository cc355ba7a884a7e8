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
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch

from rgeom.errors import RgeomError
from rgeom.io import atomic_dir, file_sha256, write_table
from rgeom.layout import step_dir
from rgeom.schemas import TRAIN_LOG_SCHEMA
from rgeom.stage_params import training_settings

log = logging.getLogger(__name__)

KNOWN_LOG_KEYS = {"loss", "learning_rate", "grad_norm"}
#: Trainer log keys that become the list columns above instead of ``extra`` JSON.
LIST_LOG_KEYS = {"r2d2_gcg_entries": "gcg_entries", "r2d2_gcg_losses": "gcg_losses"}

# Repository-relative: the workflow runs from the repository root and passes the path on.
DEEPSPEED_DIR = "workflow/deepspeed"


def deepspeed_config_path(zero_stage: int, offload: bool = False) -> str | None:
    """The DeepSpeed config for ``train.zero_stage`` / ``train.offload``; None without ZeRO."""
    if zero_stage == 0:
        return None
    if zero_stage not in (2, 3):
        raise RgeomError(f"train.zero_stage must be 0, 2 or 3, got {zero_stage}")
    return f"{DEEPSPEED_DIR}/zero{zero_stage}{'_offload' if offload else ''}.json"


def anchor_name(step: int) -> str:
    return step_dir(step)


#: The exit status of a run that stopped itself before its time limit: 128 + SIGUSR1, as if
#: the early-warning signal had come.
DEADLINE_STOP = int(signal.SIGUSR1)


def training_fingerprint(params: dict[str, Any]) -> dict[str, Any]:
    """The parameters a checkpoint at any step depends on: everything but the anchors.

    ``train.max_steps`` only matters under a decaying schedule; dropping it otherwise is
    what lets a later anchor (and a larger ``max_steps``) reuse the earlier segments.
    """
    fp = {k: v for k, v in params.items() if k not in ("anchors",)}
    fp["train"] = training_settings(fp.get("train", {}))
    return fp


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ensure_launcher_env() -> None:
    # Without launcher variables DeepSpeed falls back to MPI discovery and fails on a
    # missing mpi4py; a single process is a world of one.
    if "RANK" not in os.environ:
        os.environ.update(
            RANK="0",
            LOCAL_RANK="0",
            WORLD_SIZE="1",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(_free_port()),
        )


class _StopOnSignal:
    """Turns SIGTERM or SIGUSR1 into a request to save resume state and stop after the current step.

    The handler only sets a flag: saving from inside a signal handler could interrupt a
    collective or a half-written checkpoint. A second SIGTERM gets the previous handler, so
    a stuck save can still be terminated.
    """

    signals = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        self.signum = signum
        signal.signal(signum, self._previous[signum])

    def __enter__(self) -> _StopOnSignal:
        # Python only lets the main thread install handlers (a runner embedded in a worker
        # thread keeps the default behaviour).
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                previous = signal.signal(sig, self._handle)
                # None: a handler installed outside Python, which cannot be put back.
                self._previous[sig] = signal.SIG_DFL if previous is None else previous
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}


def _latest_resume(resume_dir: Path, limit: int) -> Path | None:
    if not resume_dir.exists():
        return None
    found = []
    for child in resume_dir.glob("checkpoint-*"):
        try:
            step = int(child.name.split("-")[1])
        except ValueError:
            continue
        # A checkpoint is complete once the trainer state is written last.
        if step <= limit and (child / "trainer_state.json").exists():
            found.append((step, child))
    return max(found)[1] if found else None


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


class _Runner:
    def __init__(
        self,
        arm,
        model_dir,
        data,
        out_dir,
        state_dir,
        log_table,
        params,
        extra,
        meta,
        time_limit_s: float | None = None,
    ):
        self.arm = arm
        self.model_dir = Path(model_dir)
        self.data = data
        self.out_dir = Path(out_dir)
        self.state_dir = Path(state_dir)
        self.log_table = Path(log_table) if log_table else None
        self.params = params
        self.extra = extra
        self.meta = meta
        self.train_cfg = params.get("train", {})
        self.anchors = sorted(a for a in params.get("anchors", []) if a > 0)
        self.save_every = self.train_cfg.get("save_every", 0)
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
        self.stop = _StopOnSignal()
        self.started = time.monotonic()
        self.time_limit_s = time_limit_s
        self.save_margin_s = float(self.train_cfg.get("save_margin_s", 600))

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
        row = {
            "step": step,
            "loss": float(logs.get("loss", float("nan"))),
            "learning_rate": float(logs.get("learning_rate", float("nan"))),
            "grad_norm": float(logs.get("grad_norm", float("nan"))),
            "tokens_per_s": tokens / self.step_seconds if self.step_seconds > 0 else float("nan"),
            "seconds": self.step_seconds,
            "extra": json.dumps(
                {
                    k: v
                    for k, v in logs.items()
                    if k not in KNOWN_LOG_KEYS and k not in LIST_LOG_KEYS
                },
                sort_keys=True,
            ),
            **{col: logs.get(key) for key, col in LIST_LOG_KEYS.items()},
        }
        with open(self.log_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")

    def _truncate_log(self, resume_step: int, end_step: int) -> None:
        # Rank 0 is the log's only writer. Steps this run will log again are dropped; those
        # of later segments (an anchor inserted before existing ones) are kept.
        if _rank() != 0 or not self.log_path.exists():
            return
        rows = [json.loads(line) for line in self.log_path.read_text().splitlines() if line]
        kept = [r for r in rows if r["step"] <= resume_step or r["step"] > end_step]
        self.log_path.write_text("".join(json.dumps(r) + "\n" for r in kept))

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
    def input_fingerprint(self) -> dict[str, Any]:
        """What the state was trained on: the data and extra files by content, the base
        model by path and its files' sizes and times (hashing 7B weights would cost
        minutes; a re-prepared model only costs a retrain)."""
        model = []
        if self.model_dir.is_dir():
            for f in sorted(self.model_dir.iterdir()):
                if f.is_file():
                    st = f.stat()
                    model.append([f.name, st.st_size, st.st_mtime_ns])
        files = {"data": self.data, **{k: v for k, v in self.extra.items() if v}}

        def digest(value: str):
            # An extra may list several files ("a.csv,b.csv": the R2D2 pool's sources).
            paths = value.split(",")
            sums = [file_sha256(p) if Path(p).is_file() else None for p in paths]
            return sums[0] if len(sums) == 1 else sums

        return {
            "model": {"path": str(self.model_dir), "files": model},
            "files": {k: digest(str(v)) for k, v in sorted(files.items())},
        }

    def check_fingerprint(self) -> None:
        """Discard resume state and stored anchors trained with other parameters or inputs."""
        path = self.state_dir / "fingerprint.json"
        want = {"params": training_fingerprint(self.params), "inputs": self.input_fingerprint()}
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
        seed = self.params.get("seed", 0)
        dtype = self.params.get("model", {}).get("dtype", "float32")
        cuda = torch.cuda.is_available() and self.params.get("model", {}).get("device") != "cpu"
        # Explicit: SFTConfig defaults to checkpointing on, which would slow every small run
        # (activation_checkpointing is the transformers 5 name of gradient_checkpointing).
        kwargs: dict[str, Any] = {
            "activation_checkpointing": bool(cfg.get("gradient_checkpointing"))
        }
        stage = cfg.get("zero_stage", 0)
        expected = deepspeed_config_path(stage, cfg.get("offload", False))
        if expected is not None:
            kwargs["deepspeed"] = _check_deepspeed_config(
                self.extra.get("deepspeed"), stage, expected
            )
            _ensure_launcher_env()
        return SFTConfig(
            output_dir=str(self.resume_dir),
            # The rows are pre-tokenized (input_ids + completion_mask): TRL builds the labels,
            # truncates to max_length or packs into max_length blocks.
            max_length=cfg.get("max_length", 256),
            completion_only_loss=True,
            packing=cfg.get("packing", False),
            # The reference's packer concatenates documents and cuts fixed-length blocks,
            # attention crossing document boundaries: TRL's "wrapped" strategy.
            packing_strategy="wrapped",
            dataset_num_proc=None,
            # Under a decaying schedule the total sets the learning rate at every step;
            # otherwise it is the last anchor, where training stops.
            max_steps=cfg.get("max_steps", max(self.anchors, default=0)),
            per_device_train_batch_size=cfg.get("batch_size", 8),
            gradient_accumulation_steps=cfg.get("grad_accum", 1),
            learning_rate=cfg.get("learning_rate", 5e-5),
            lr_scheduler_type=cfg.get("lr_scheduler", "constant"),
            warmup_steps=cfg.get("warmup_steps", 0),
            weight_decay=cfg.get("weight_decay", 0.0),
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
            trust = self.params.get("model", {}).get("trust_remote_code", False)
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
            resume = _latest_resume(self.resume_dir, last_anchor)
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


def _check_deepspeed_config(path: str | None, stage: int, expected: str) -> str:
    if not path:
        raise RgeomError(
            f"train.zero_stage is {stage} but no DeepSpeed config was given "
            f"(pass --extra deepspeed={expected})"
        )
    try:
        ds = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise RgeomError(f"cannot read the DeepSpeed config {path}: {exc}") from exc
    zero = ds.get("zero_optimization", {})
    if zero.get("stage") != stage:
        raise RgeomError(
            f"{path} sets ZeRO stage {zero.get('stage')} but train.zero_stage is {stage}"
        )
    if stage == 3 and not zero.get("stage3_gather_16bit_weights_on_model_save"):
        # Without it save_model writes DeepSpeed shards, not a model folder: the anchors
        # would not load with from_pretrained.
        raise RgeomError(
            f"{path}: ZeRO-3 anchors need "
            '"stage3_gather_16bit_weights_on_model_save": true in zero_optimization'
        )
    return path


def train_arm(
    arm: str,
    model_dir: str,
    data: str,
    out_dir: str,
    params: dict[str, Any],
    extra: dict[str, str],
    meta: dict[str, Any],
    state_dir: str | None = None,
    log_table: str | None = None,
    write_log: bool = True,
    time_limit_s: float | None = None,
) -> None:
    """Train ``arm`` from ``model_dir`` on ``data``; export every anchor under ``out_dir``.

    The per-step metrics go to ``log_table`` (default: beside ``out_dir``) unless
    ``write_log`` is false: the workflow writes them in a rule of their own.
    ``time_limit_s``: the job's wall-clock limit, counted from this call; the run saves and
    stops ``train.save_margin_s`` (plus two steps) before it.
    """
    out = Path(out_dir)
    runner = _Runner(
        arm,
        model_dir,
        data,
        out,
        state_dir or out.parent / "train_state",
        (log_table or out.parent / "train_log.parquet") if write_log else None,
        params,
        extra,
        meta,
        time_limit_s=time_limit_s,
    )
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


def write_train_log(state_dir: str | Path, out: str | Path, meta: dict[str, Any]) -> pa.Table:
    """The arm's per-step metrics (``state_dir/log.jsonl``) as a Parquet table at ``out``."""
    path = Path(state_dir) / "log.jsonl"
    rows = []
    if path.exists():
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise RgeomError(f"{path}: line {n} is not JSON ({exc})") from exc
    # A resumed run may have logged a step twice; the last record wins. Logs written before
    # the list columns existed lack them: null, like an arm without a pool.
    by_step = {r["step"]: {"gcg_entries": None, "gcg_losses": None, **r} for r in rows}
    table = pa.Table.from_pylist([by_step[s] for s in sorted(by_step)], schema=TRAIN_LOG_SCHEMA)
    write_table(out, table, TRAIN_LOG_SCHEMA, dict(meta))
    return table
