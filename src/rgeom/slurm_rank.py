"""One training rank per SLURM task: ``srun python -m rgeom.slurm_rank train ...``.

The multi-node route of docs/cluster.md, following snakemake-executor-plugin-slurm's
convention for multi-task jobs: a rule whose resources carry ``mpi`` runs its shell
command directly in the allocation (no ``srun -n1`` wrapper), and that command starts the
tasks with ``{resources.mpi}`` (``srun``). Each task is one rank; this module turns SLURM's
task variables into the ones ``torch.distributed``/DeepSpeed read (what torchrun would
set), then runs ``rgeom.cli`` with the remaining arguments.
"""

from __future__ import annotations

import os
import re
import socket
import sys
import zlib
from collections.abc import Mapping

from rgeom.errors import RgeomError


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``gpu[003-004,007],cpu1`` -> ``gpu003``."""
    head = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not head or not head.group(1):
        raise RgeomError(f"SLURM_JOB_NODELIST {nodelist!r} names no host")
    prefix, ranges = head.group(1), head.group(2)
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def rank_env(environ: Mapping[str, str]) -> dict[str, str]:
    """RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT of this
    SLURM task.

    Rank 0 runs on the first node of the allocation, so it hosts the rendezvous; the port is
    derived from the job id, so two jobs sharing a node do not collide (an explicit
    MASTER_PORT wins). A task bound to a single GPU (``--ntasks-per-gpu=1`` binds one per
    task) sees it as device 0, whatever its local id.
    """
    needed = ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_JOB_NODELIST")
    missing = [k for k in needed if k not in environ]
    if missing:
        raise RgeomError(
            f"not inside a SLURM task (missing {', '.join(missing)}): start this with srun"
        )
    local = int(environ.get("SLURM_LOCALID", "0"))
    visible = [d for d in environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    if len(visible) == 1:
        local = 0
    per_node = environ.get("SLURM_NTASKS_PER_NODE") or environ.get("SLURM_TASKS_PER_NODE", "1")
    job = environ.get("SLURM_JOB_ID", "0")
    return {
        "RANK": str(int(environ["SLURM_PROCID"])),
        "WORLD_SIZE": str(int(environ["SLURM_NTASKS"])),
        "LOCAL_RANK": str(local),
        "LOCAL_WORLD_SIZE": re.match(r"\d+", per_node).group(0),
        "MASTER_ADDR": environ.get("MASTER_ADDR") or first_host(environ["SLURM_JOB_NODELIST"]),
        "MASTER_PORT": environ.get("MASTER_PORT") or str(20000 + zlib.crc32(job.encode()) % 20000),
    }


def launcher(resources: Mapping, num_gpus: int) -> str:
    """The train rule's launcher for a job's resources: ``{mpi} -n {tasks}`` + this module
    under the plugin's multi-task convention; torchrun on one node with several GPUs;
    ``rgeom`` otherwise."""
    mpi = resources.get("mpi")
    if mpi:
        tasks = resources.get("tasks")
        if not tasks:
            raise RgeomError("train: resources.mpi needs tasks (one rank per GPU)")
        return f"{mpi} -n {int(tasks)} --kill-on-bad-exit=1 python -m rgeom.slurm_rank"
    if num_gpus > 1:
        return f"torchrun --standalone --nproc_per_node {num_gpus} -m rgeom.cli"
    return "rgeom"


def _process_group() -> tuple[int, int, str] | None:
    """(rank, world size, backend) of the process group this process trained in, if any."""
    # Only a run that imported torch can have joined a group; importing it here would cost
    # seconds for a command that never trains.
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), str(dist.get_backend())
    # Training leaves its group once the anchors are out (rgeom.train.runner) and records it.
    runner = sys.modules.get("rgeom.train.runner")
    return getattr(runner, "LEFT_GROUP", None)


def main(argv: list[str] | None = None) -> int:
    try:
        mapped = rank_env(os.environ)
    except RgeomError as exc:
        print(f"rgeom.slurm_rank: error: {exc}", file=sys.stderr)
        return 1
    os.environ.update(mapped)
    # One line per task in the job's log: a rendezvous that hangs shows which ranks started,
    # on which host, and where they wait for the others.
    print(
        f"rgeom.slurm_rank: task {os.environ['SLURM_PROCID']} on {socket.gethostname()}: "
        f"rank {mapped['RANK']} of {mapped['WORLD_SIZE']}, "
        f"rendezvous {mapped['MASTER_ADDR']}:{mapped['MASTER_PORT']}",
        file=sys.stderr,
        flush=True,
    )
    from rgeom.cli import main as cli_main

    code = cli_main(sys.argv[1:] if argv is None else argv)
    group = _process_group()
    if group is not None:
        # From torch's process group, not the environment: the world this rank really ran in.
        rank, world, backend = group
        print(
            f"rgeom.slurm_rank: rank {rank} of {world} ({backend}) joined; exit {code}",
            file=sys.stderr,
            flush=True,
        )
    return code


if __name__ == "__main__":
    sys.exit(main())
