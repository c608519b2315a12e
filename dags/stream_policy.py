"""The streaming ingest's supervision policy: a small object that looks at one observation of the query and
returns what to do, as Ray Train's failure and scaling policies do. Standard library only.

Observation (``IngestProbe.observe``): is the ingest process alive (its PID file), the newest micro-batch id
in the checkpoint's ``offsets/`` (planned) and ``commits/`` (done) folders, and the age in seconds of the newest
offsets file. Spark writes ``offsets/<n>`` when a micro-batch starts and ``commits/<n>`` when it finished, so an
uncommitted batch older than ``stuck_after_s`` means the query is stuck; a query with every batch committed is
healthy however idle the topic is.

>>> policy = SupervisorPolicy(stuck_after_s=600)
>>> policy.decide(Observation(alive=True, last_offset=7, last_commit=7, offset_age_s=5000.0))
<Action.HEALTHY: 'healthy'>
>>> policy.decide(Observation(alive=False, last_offset=7, last_commit=7, offset_age_s=1.0))
<Action.RESTART: 'restart'>
>>> policy.decide(Observation(alive=True, last_offset=8, last_commit=7, offset_age_s=900.0))
<Action.RESTART: 'restart'>
"""

from __future__ import annotations

import enum
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


class Action(enum.Enum):
    HEALTHY = "healthy"  # alive and committing (or idle with everything committed)
    WAIT = "wait"  # alive, a batch in flight, not yet older than the limit
    RESTART = "restart"  # dead or stuck: (kill and) start again from the checkpoint
    GIVE_UP = "give_up"  # restarted max_restarts times in a row without progress: a person must look


@dataclass(frozen=True)
class Observation:
    """One look at the ingest query.

    Args:
        alive: its process is running.
        last_offset: newest micro-batch id in ``<checkpoint>/offsets`` (None: no batch yet).
        last_commit: newest micro-batch id in ``<checkpoint>/commits`` (None: none committed).
        offset_age_s: seconds since the newest offsets file was written (None: no batch yet).
    """

    alive: bool
    last_offset: int | None
    last_commit: int | None
    offset_age_s: float | None


@dataclass(frozen=True)
class SupervisorPolicy:
    """Decides on one observation.

    Args:
        stuck_after_s: an uncommitted micro-batch older than this (seconds) means the query is stuck.
        max_restarts: consecutive restarts without a new commit before GIVE_UP.
    """

    stuck_after_s: float = 600.0
    max_restarts: int = 3

    def __post_init__(self):
        if self.stuck_after_s <= 0 or self.max_restarts < 1:
            raise ValueError(f"invalid supervisor policy {self}: stuck_after_s > 0, max_restarts >= 1")

    def decide(self, obs: Observation, restarts_without_progress: int = 0) -> Action:
        if not obs.alive or self._stuck(obs):
            return Action.GIVE_UP if restarts_without_progress >= self.max_restarts else Action.RESTART
        if obs.last_offset is not None and obs.last_offset != obs.last_commit:
            return Action.WAIT
        return Action.HEALTHY

    def _stuck(self, obs: Observation) -> bool:
        in_flight = obs.last_offset is not None and obs.last_offset != obs.last_commit
        return in_flight and (obs.offset_age_s or 0.0) > self.stuck_after_s


def _newest_batch(folder: Path) -> tuple[int | None, float | None]:
    ids = [(int(p.name), p) for p in folder.glob("*") if p.name.isdigit()] if folder.is_dir() else []
    if not ids:
        return None, None
    n, path = max(ids)
    return n, path.stat().st_mtime


@dataclass(frozen=True)
class IngestProbe:
    """Reads the real observation: the PID file the supervisor writes when it starts the ingest, and the
    query's checkpoint folder (``<data_dir>/checkpoints/ingest``)."""

    checkpoint: Path
    pid_file: Path
    clock: Callable[[], float] = time.time

    def observe(self) -> Observation:
        offset, mtime = _newest_batch(self.checkpoint / "offsets")
        commit, _ = _newest_batch(self.checkpoint / "commits")
        return Observation(alive=pid_alive(self.pid_file), last_offset=offset, last_commit=commit,
                           offset_age_s=None if mtime is None else max(0.0, self.clock() - mtime))


def pid_alive(pid_file: Path) -> bool:
    try:
        pid = int(Path(pid_file).read_text().strip())
        os.kill(pid, 0)
        return True
    except (FileNotFoundError, ValueError, ProcessLookupError):
        return False
    except PermissionError:  # exists, owned by someone else
        return True


def supervise(probe, policy: SupervisorPolicy, restart: Callable[[], None], restarts_without_progress: int = 0
              ) -> Action:
    """One supervision step: observe, decide, and restart when told to. Returns the action taken.

    Raises:
        RuntimeError: GIVE_UP (the task fails, its failure callback names the table).
    """
    action = policy.decide(probe.observe(), restarts_without_progress)
    if action is Action.RESTART:
        restart()
    elif action is Action.GIVE_UP:
        raise RuntimeError(f"ingest restarted {restarts_without_progress} times without a new commit; "
                           f"look at its log and checkpoint {getattr(probe, 'checkpoint', '?')}")
    return action
