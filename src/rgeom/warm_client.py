"""The client side of ``rgeom warm``: hand a job to the warm server, if one answers.

Every ``rgeom`` process started under ``rgeom warm`` runs :func:`forward` before anything
else, so this module imports the standard library only; the server (:mod:`rgeom.warm`)
speaks the same wire format: a length header, the JSON request with the client's
stdin/stdout/stderr passed alongside, and the job's exit status back.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import sys

SOCKET_ENV = "RGEOM_WARM_SOCKET"
HEADER = struct.Struct("!I")
STATUS = struct.Struct("!i")
# Exit status a client reports when the server dropped the job without a status.
LOST = 70


def recv_exact(conn: socket.socket, n: int) -> bytes:
    chunks, left = [], n
    while left:
        chunk = conn.recv(left)
        if not chunk:
            raise ConnectionError("client closed the connection mid-request")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def forward(argv: list[str]) -> int | None:
    """Run ``rgeom argv`` in the warm server, if one answers; None means run it here."""
    path = os.environ.get(SOCKET_ENV)
    if not path:
        return None
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(path)
    except OSError:
        conn.close()
        return None
    payload = json.dumps({"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ)}).encode()
    try:
        socket.send_fds(conn, [HEADER.pack(len(payload))], [0, 1, 2])
        conn.sendall(payload)
    except OSError:
        conn.close()
        return None
    # From here the job runs in the server's child: a signal to this process (Snakemake
    # cancelling the job) closes the connection, which ends the child.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda *_: os._exit(143))
    try:
        (status,) = STATUS.unpack(recv_exact(conn, STATUS.size))
    except ConnectionError:
        print(f"rgeom: the warm server ({path}) lost this job without a status", file=sys.stderr)
        return LOST
    except KeyboardInterrupt:
        return 130
    finally:
        conn.close()
    return status
