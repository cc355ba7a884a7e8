"""The warm fork server (rgeom.warm): a job run through it is the job run cold.

Same outputs byte for byte, same exit status and messages, the job's own stdout/stderr,
and no orphan when the client goes away. The servers here preload almost nothing, so the
tests take seconds; `rgeom warm` with the full preload is exercised once.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rgeom import warm

RGEOM = [sys.executable, "-m", "rgeom.cli"]


def _start_server(path: Path, preload: str = "()") -> subprocess.Popen:
    code = f"import sys, rgeom.warm as w; w.PRELOAD = {preload}; w.serve(sys.argv[1])"
    server = subprocess.Popen([sys.executable, "-c", code, str(path)])
    deadline = time.monotonic() + 60
    while not path.exists():
        assert server.poll() is None, "warm server exited at start"
        assert time.monotonic() < deadline, "warm server did not bind its socket"
        time.sleep(0.05)
    return server


@pytest.fixture
def server_socket(tmp_path):
    path = tmp_path / "warm.sock"
    server = _start_server(path)
    yield path
    server.terminate()
    server.wait(timeout=30)
    assert not path.exists(), "the server leaves no socket behind"


def _rgeom(args: list[str], cwd: Path, socket: Path | None, **env: str):
    full_env = {k: v for k, v in os.environ.items() if k != warm.SOCKET_ENV}
    full_env.update(env)
    if socket is not None:
        full_env[warm.SOCKET_ENV] = str(socket)
    return subprocess.run(
        [*RGEOM, *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=300
    )


def test_forward_without_a_server_runs_in_process(tmp_path, monkeypatch):
    monkeypatch.delenv(warm.SOCKET_ENV, raising=False)
    assert warm.forward(["check-config"]) is None
    monkeypatch.setenv(warm.SOCKET_ENV, str(tmp_path / "absent.sock"))
    assert warm.forward(["check-config"]) is None


def test_a_stage_through_the_server_writes_the_same_bytes(tmp_path, server_socket):
    params = '{"spec": {"format": "builtin", "path": "harmful", "split": "val"}, "seed": 3}'
    outs = {}
    for label, sock in (("cold", None), ("warm", server_socket)):
        work = tmp_path / label
        work.mkdir()
        # A relative --out: the child must run in the client's working directory.
        done = _rgeom(
            ["prepare-data", "--name", "val_harmful", "--out", "val.parquet", "--params", params],
            work,
            sock,
        )
        assert done.returncode == 0, done.stderr
        outs[label] = (work / "val.parquet").read_bytes()
    assert outs["warm"] == outs["cold"]


def test_errors_and_usage_keep_their_status_and_message(tmp_path, server_socket):
    for args, status, message in (
        (["status", "--config", "missing.yaml"], 1, "config file not found: missing.yaml"),
        (["prepare-data", "--bogus"], 2, "the following arguments are required"),
        (["prepare-data", "--name", "x", "--out", "x.parquet"], 1, "key 'spec'"),
    ):
        cold = _rgeom(args, tmp_path, None)
        hot = _rgeom(args, tmp_path, server_socket)
        assert (cold.returncode, hot.returncode) == (status, status), hot.stderr
        assert message in hot.stderr and message in cold.stderr
        assert hot.stderr == cold.stderr


def test_the_job_sees_the_clients_environment(tmp_path, server_socket):
    # RGEOM_SHARED_DATA is read by config validation: pointing it at a missing folder must
    # fail the warm job exactly as it fails a cold one, so the env reached the child.
    args = ["check-config", str(Path(__file__).parents[1] / "config" / "paper.yaml")]
    missing = str(tmp_path / "no-such-data")
    cold = _rgeom(args, tmp_path, None, RGEOM_SHARED_DATA=missing)
    hot = _rgeom(args, tmp_path, server_socket, RGEOM_SHARED_DATA=missing)
    assert hot.returncode == cold.returncode
    assert hot.stdout == cold.stdout and hot.stderr == cold.stderr


def test_a_killed_job_is_reported_not_hidden(tmp_path, server_socket):
    params = '{"spec": {"format": "builtin", "path": "harmful", "split": "val"}}'
    args = ["prepare-data", "--name", "v", "--out", "v.parquet", "--params", params]
    # SIGKILL of the child at the atomic rename, as a preemption would.
    done = _rgeom(args, tmp_path, server_socket, RGEOM_FAULT="replace")
    assert done.returncode == warm.LOST
    assert "lost this job" in done.stderr
    assert not (tmp_path / "v.parquet").exists()


def test_cancelling_the_client_ends_the_job(tmp_path):
    # A server whose "stage" records its pid and sleeps: cancelling the client must end it.
    path = tmp_path / "warm.sock"
    pid_file = tmp_path / "child.pid"
    preload = (
        "(); import rgeom.cli, time, os; "
        f"rgeom.cli.main = lambda argv: (open({str(pid_file)!r}, 'w').write(str(os.getpid())),"
        " time.sleep(120))"
    )
    server = _start_server(path, preload)
    try:
        env = dict(os.environ, **{warm.SOCKET_ENV: str(path)})
        client = subprocess.Popen(
            [sys.executable, "-c", "import rgeom.warm as w; w.forward(['status'])"], env=env
        )
        deadline = time.monotonic() + 60
        while not pid_file.exists() or not pid_file.read_text():
            assert time.monotonic() < deadline, "the job never started"
            time.sleep(0.05)
        child = int(pid_file.read_text())
        client.send_signal(signal.SIGTERM)
        client.wait(timeout=30)
        deadline = time.monotonic() + 30
        while _alive(child):
            assert time.monotonic() < deadline, "the job outlived its cancelled client"
            time.sleep(0.05)
    finally:
        server.terminate()
        server.wait(timeout=30)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for this purpose: the server reaps it on its next signal.
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split(") ", 1)[1][:1] != "Z"


def test_rgeom_warm_runs_the_command_and_stops_its_server(tmp_path):
    probe = (
        "import os, subprocess, sys; s = os.environ['RGEOM_WARM_SOCKET']; print(s); "
        "sys.exit(subprocess.call([sys.executable, '-m', 'rgeom.cli', 'status', "
        "'--config', 'missing.yaml']))"
    )
    done = subprocess.run(
        [*RGEOM, "warm", "--", sys.executable, "-c", probe],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    # The command's exit status is rgeom warm's, and its job ran (through the server).
    assert done.returncode == 1, done.stderr
    assert "config file not found: missing.yaml" in done.stderr
    socket_path = Path(done.stdout.strip())
    assert not socket_path.exists() and not socket_path.parent.exists()


def test_the_server_stops_on_sigterm_although_imports_started_threads(tmp_path):
    # pyarrow (jemalloc) and polars start threads at import; a SIGTERM delivered to one of
    # them once left the server asleep in accept() for good.
    path = tmp_path / "warm.sock"
    server = _start_server(path, '("pyarrow.parquet", "polars")')
    tasks = Path(f"/proc/{server.pid}/task")
    deadline = time.monotonic() + 60
    while len(list(tasks.iterdir())) < 3:
        assert time.monotonic() < deadline, "the imports started no threads: nothing tested"
        time.sleep(0.05)
    # One job served: the server is past its imports, back in accept().
    assert _rgeom(["status", "--config", "missing.yaml"], tmp_path, path).returncode == 1
    server.terminate()
    assert server.wait(timeout=20) == 0
    assert not path.exists()


def test_a_job_runs_the_threads_its_environment_asks_for(tmp_path):
    # Snakemake sets OMP_NUM_THREADS to a rule's threads; torch read it at import in the
    # server, whose environment has none, so the child must apply it itself.
    torch = pytest.importorskip("torch")
    path = tmp_path / "warm.sock"
    out = tmp_path / "threads.txt"
    preload = (
        '("torch",); import rgeom.cli, torch; '
        f"rgeom.cli.main = lambda argv: open({str(out)!r}, 'w').write("
        "str(torch.get_num_threads())) and 0"
    )
    server = _start_server(path, preload)
    try:
        for wanted in ("1", str(max(2, torch.get_num_threads()))):
            done = _rgeom(["status"], tmp_path, path, OMP_NUM_THREADS=wanted)
            assert done.returncode == 0, done.stderr
            assert out.read_text() == wanted
    finally:
        server.terminate()
        server.wait(timeout=30)
