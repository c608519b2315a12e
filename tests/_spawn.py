"""Run a multi-process gloo test and tell a failed check from a crash at interpreter exit.

Each worker writes ``<done_dir>/rank<r>`` once all its assertions passed and its process group is destroyed. A
worker whose assertion fails raises, and ``mp.spawn`` re-raises that with its traceback. A worker that dies by a
signal *after* writing its marker (gloo's threads can abort at interpreter exit: "terminate called without an
active exception", seen once in CI) has already passed every check, so that exit is not a test failure; a signal
before the marker still fails the test.
"""

from __future__ import annotations

import socket
from pathlib import Path

import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port on the loopback that nothing listens on now (for a worker group's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mark_done(done_dir: str, rank: int) -> None:
    (Path(done_dir) / f"rank{rank}").touch()


def spawn_checked(worker, args: tuple, nprocs: int, done_dir: Path) -> None:
    """``mp.spawn(worker, args=(*args, str(done_dir)), nprocs)``; the worker calls :func:`mark_done` last.

    Raises:
        mp.ProcessRaisedException: a worker's check failed.
        mp.ProcessExitedException: a worker died before finishing its checks.
    """
    try:
        mp.spawn(worker, args=(*args, str(done_dir)), nprocs=nprocs, join=True)
    except mp.ProcessExitedException:
        if not all((done_dir / f"rank{r}").exists() for r in range(nprocs)):
            raise
