"""Resume state of a training arm: what it was trained with, where the latest checkpoint is,
and the signals and deadline that make a run save it and stop."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Any

from rgeom.io import file_sha256
from rgeom.stage_params import training_settings

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


def input_fingerprint(model_dir: Path, data: str, extra: dict[str, str]) -> dict[str, Any]:
    """What the state was trained on: the data and extra files by content, the base
    model by path and its files' sizes and times (hashing 7B weights would cost
    minutes; a re-prepared model only costs a retrain)."""
    model = []
    if model_dir.is_dir():
        for f in sorted(model_dir.iterdir()):
            if f.is_file():
                st = f.stat()
                model.append([f.name, st.st_size, st.st_mtime_ns])
    files = {"data": data, **{k: v for k, v in extra.items() if v}}

    def digest(value: str):
        # An extra may list several files ("a.csv,b.csv": the R2D2 pool's sources).
        paths = value.split(",")
        sums = [file_sha256(p) if Path(p).is_file() else None for p in paths]
        return sums[0] if len(sums) == 1 else sums

    return {
        "model": {"path": str(model_dir), "files": model},
        "files": {k: digest(str(v)) for k, v in sorted(files.items())},
    }


def latest_resume(resume_dir: Path, limit: int) -> Path | None:
    """The latest complete Trainer checkpoint in ``resume_dir`` at step ``limit`` or before."""
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


class StopOnSignal:
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

    def __enter__(self) -> StopOnSignal:
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
