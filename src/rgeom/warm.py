"""A warm fork server for local runs: every ``rgeom`` job starts with torch imported.

Why: on the embedded default most of the ~100 jobs are short (a few seconds to half a
minute), and each one used to spend about 5 s, on 2 shared cores, importing torch,
transformers' Llama code, TRL and polars before doing any work. ``rgeom warm -- CMD`` starts
one server that imports all of that once, runs ``CMD`` (Snakemake) with
``RGEOM_WARM_SOCKET`` set, and stops the server when ``CMD`` ends. Every ``rgeom`` process
started under it (the rules' shell commands) hands its argv, working directory, environment
and stdin/stdout/stderr to the server, which forks a child that runs the stage exactly as
the process would have, writing to the job's own log, and returns the child's exit status.

What stays the same: each job is still one process with its own outputs, logs, benchmark
file and exit status, Snakemake's caching and scheduling are untouched, and results are
byte-identical (tests/test_warm.py runs a stage both ways). Only the import is shared.

Where it is not used: without ``RGEOM_WARM_SOCKET``, or when the socket does not answer (a
SLURM job on another node sees the variable but not the socket), ``rgeom`` runs in its own
process as before. The server never runs model code itself, so no thread pool (OpenMP,
Rayon, Arrow) exists before a fork; each child starts its own.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

from rgeom.stages import STAGES
from rgeom.warm_client import HEADER, LOST, SOCKET_ENV, STATUS, forward, recv_exact  # noqa: F401 - re-exported for importers

# What the stages import: preloading them is the whole point. A module that fails to
# import here is skipped; the child then imports (and fails on) it exactly as a cold run.
PRELOAD = (
    "numpy",
    "pyarrow.parquet",
    "polars",
    "yaml",
    "tqdm",
    "torch",
    "safetensors.torch",
    "tokenizers",
    "transformers",
    "transformers.models.llama.modeling_llama",
    "transformers.generation.utils",
    "trl:SFTTrainer",
    "trl:SFTConfig",
    "datasets",
    "matplotlib.pyplot",
    *(f"rgeom.stages.{stage}" for stage in STAGES),
    "rgeom.judges",
    "rgeom.train.runner",
    "rgeom.train.r2d2",
    "rgeom.geometry",
    "rgeom.interventions",
    "rgeom.figures",
    "rgeom.report",
)

log = logging.getLogger("rgeom.warm")


def preload(names: tuple[str, ...] | None = None) -> list[str]:
    """Import ``names`` (default PRELOAD; ``module`` or ``module:attribute``); return those
    that failed."""
    import importlib

    failed = []
    for name in PRELOAD if names is None else names:
        module, _, attribute = name.partition(":")
        try:
            loaded = importlib.import_module(module)
            if attribute:
                getattr(loaded, attribute)
        except Exception:  # noqa: BLE001 - a cold run reports the same failure in the job
            failed.append(name)
    return failed


def _reap_children(*_: object) -> None:
    while True:
        try:
            pid, _status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _reopen_std_streams() -> None:
    """Fresh text streams on fds 0-2: the server's own were made for its terminal."""
    sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False))
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), line_buffering=True)
    sys.stderr = io.TextIOWrapper(
        io.FileIO(2, "w", closefd=False), line_buffering=True, write_through=True
    )


def _apply_thread_limits() -> None:
    """The job's thread count, as a cold start would have read it from its environment.

    OpenMP and MKL read OMP_NUM_THREADS / MKL_NUM_THREADS once, when torch is imported,
    i.e. in the server, whose environment has none: without this, a job of a ``threads: 1``
    rule (Snakemake sets OMP_NUM_THREADS=1 for it) ran 2 threads beside another job's 2 on
    2 cores, and the spinning thread pools ran both 3-4x slower than cold.
    """
    torch = sys.modules.get("torch")
    if torch is None:
        return
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        value = os.environ.get(name, "")
        if value.isdigit() and int(value) > 0:
            torch.set_num_threads(int(value))
            return
    # Neither set: the server's default is the one a cold start would get.


def _watch_client(conn: socket.socket) -> None:
    """End the job when its client goes away (Snakemake cancelled it, or the user hit ^C)."""
    with contextlib.suppress(OSError):
        conn.recv(1)
    os.kill(os.getpid(), signal.SIGTERM)


def _run_child(conn: socket.socket, request: dict, fds: list[int]) -> None:
    """In the forked child: become the job, run it, send the status, never return."""
    status = 1
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        _reopen_std_streams()
        _apply_thread_limits()
        logging.root.handlers.clear()
        sys.argv = ["rgeom", *request["argv"]]
        threading.Thread(target=_watch_client, args=(conn,), daemon=True).start()
        from rgeom.cli import main

        try:
            status = main(request["argv"])
        except SystemExit as exc:  # argparse's --help and usage errors
            status = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
        atexit._run_exitfuncs()  # os._exit below skips what a normal exit would run
    except BaseException:  # noqa: BLE001 - the traceback goes to the job's own stderr
        traceback.print_exc()
        status = 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            # The fd may be gone; the status must still reach the client.
            with contextlib.suppress(Exception):
                stream.flush()
        with contextlib.suppress(OSError):
            conn.sendall(STATUS.pack(int(status)))
        os._exit(int(status) & 0xFF)


def serve(socket_path: str | Path) -> None:
    """Bind ``socket_path``, preload, then fork one child per request until SIGTERM."""
    socket_path = str(socket_path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(socket_path)
    # Listening before the imports: early clients queue instead of falling back to cold.
    listener.listen(64)
    # Imports start threads (jemalloc's, polars'). A process-directed signal goes to any
    # thread that does not block it, and one landing on those would leave the main thread
    # asleep in accept(): they inherit this mask, so only the main thread ever gets them.
    handled = {signal.SIGTERM, signal.SIGCHLD, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, handled)
    failed = preload()
    if failed:
        log.info("not preloaded (jobs import them themselves): %s", ", ".join(failed))
    signal.signal(signal.SIGCHLD, _reap_children)

    def stop(*_: object) -> None:
        # No interpreter teardown: it has nothing to flush, and tearing down torch and
        # friends only delays the end of the run.
        Path(socket_path).unlink(missing_ok=True)
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, handled)
    try:
        while True:
            conn, _ = listener.accept()
            fds: list[int] = []
            try:
                head, fds, _flags, _addr = socket.recv_fds(conn, HEADER.size, 3)
                if len(head) < HEADER.size:
                    head += recv_exact(conn, HEADER.size - len(head))
                (length,) = HEADER.unpack(head)
                request = json.loads(recv_exact(conn, length))
                if len(fds) != 3:
                    raise ConnectionError(f"expected 3 file descriptors, got {len(fds)}")
            except (OSError, ValueError, ConnectionError) as exc:
                log.warning("dropped a malformed request: %s", exc)
                for fd in fds:
                    os.close(fd)
                conn.close()
                continue
            pid = os.fork()
            if pid == 0:
                listener.close()
                _run_child(conn, request, fds)
            for fd in fds:
                os.close(fd)
            conn.close()
    finally:
        listener.close()
        Path(socket_path).unlink(missing_ok=True)


def warm_cmd(run_argv: list[str], socket_path: str | None = None, timeout_s: float = 120) -> None:
    """Run ``command`` (e.g. Snakemake) with a warm server behind every ``rgeom`` in it."""
    from rgeom.errors import RgeomError

    command = run_argv[1:] if run_argv[:1] == ["--"] else run_argv
    if not command:
        raise RgeomError("rgeom warm: no command to run (rgeom warm -- snakemake ...)")
    workdir = Path(tempfile.mkdtemp(prefix="rgeom-warm-"))
    path = Path(socket_path) if socket_path else workdir / "socket"
    server = subprocess.Popen(
        [sys.executable, "-c", "import sys, rgeom.warm as w; w.serve(sys.argv[1])", str(path)]
    )
    try:
        deadline = time.monotonic() + timeout_s
        while not path.exists():
            if server.poll() is not None or time.monotonic() > deadline:
                raise RgeomError(f"rgeom warm: the server did not start (exit {server.poll()})")
            time.sleep(0.05)
        env = dict(os.environ, **{SOCKET_ENV: str(path)})
        status = subprocess.call(command, env=env)
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        path.unlink(missing_ok=True)
        workdir.rmdir()
    if status:
        raise SystemExit(status)
