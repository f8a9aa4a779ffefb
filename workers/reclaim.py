"""Signals that training wants this worker's GPU back.

The GPU belongs to training; idlegrid only borrows it. Besides an operator's
`idlegrid admin drain` (a heartbeat command) and SIGTERM (both handled by the
agent itself), three local sources can say "give the GPU back":

- an operator's reclaim command, run every few seconds: exit status 0 means
  training wants the GPU (a Slurm prolog can create a state the command checks,
  a Kubernetes probe can ask the scheduler);
- a reclaim file: while it exists, the GPU is reclaimed (a prolog touches it,
  an epilog removes it);
- NVML: a compute process on the GPU that is not the engine or one of its
  children means a training job has started on it.

`ReclaimWatch` asks them all and says why, and how long they have all been
quiet, so the agent can wait a while before waking the engine. Everything
here blocks (runs a command, asks NVML): the agent calls it in a thread.
"""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pynvml

from workers import nvml

log = logging.getLogger(__name__)

# A hook that hangs must not stall the agent's reclaim checks for long.
DEFAULT_HOOK_TIMEOUT_S = 10.0


def file_says_reclaim(path: Path) -> bool:
    return path.exists()


def hook_says_reclaim(command: str, timeout: float = DEFAULT_HOOK_TIMEOUT_S) -> bool | None:
    """Run the operator's reclaim command in a shell: exit 0 = reclaim, other = free.
    None when it could not run or timed out: then we do not know."""
    try:
        done = subprocess.run(command, shell=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, timeout=timeout, start_new_session=True)
    except subprocess.TimeoutExpired:
        log.warning("reclaim command %r did not finish within %.0fs", command, timeout)
        return None
    except OSError as exc:
        log.warning("cannot run reclaim command %r: %s", command, exc)
        return None
    return done.returncode == 0


def _parent_pid(pid: int) -> int | None:
    """The parent of `pid` from /proc (None if it is gone or unreadable)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name in parentheses may contain spaces; the fields after it do not.
    fields = stat.rsplit(")", 1)[1].split()
    return int(fields[1])


def belongs_to_engine(pid: int, engine_pid: int) -> bool | None:
    """Whether `pid` is the engine or one of its descendants; None when `pid` is
    not visible here (another pid namespace, or already gone).

    The agent starts the engine as the leader of a session of its own, so its
    children share that session id; a child that made a session of its own is
    still found by walking up its parents."""
    if pid == engine_pid:
        return True
    try:
        if os.getsid(pid) == engine_pid:
            return True
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    ancestor = _parent_pid(pid)
    for _ in range(64):  # parent chains are short; a bound guards against a pid reused mid-walk
        if ancestor is None or ancestor <= 1:
            return False
        if ancestor == engine_pid:
            return True
        ancestor = _parent_pid(ancestor)
    return False


def gpu_memory_used(gpus: Sequence[int | str]) -> int | None:
    """Bytes of memory in use now on the GPUs `gpus`, or None without NVML."""
    try:
        return sum(int(pynvml.nvmlDeviceGetMemoryInfo(nvml._device_handle(index)).used) for index in gpus)
    except pynvml.NVMLError:
        return None


def _names(gpus: Sequence[int | str]) -> str:
    return ",".join(map(str, gpus))


class ReclaimWatch:
    """Combines the local reclaim sources. `poll()` asks them all once."""

    def __init__(
        self,
        *,
        command: str | None = None,
        file: Path | None = None,
        gpus: Sequence[int | str] | None = None,
        engine_pid: Callable[[], int | None] = lambda: None,
        hook_timeout: float = DEFAULT_HOOK_TIMEOUT_S,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.command = command
        self.file = file
        self.gpus = list(gpus) if gpus is not None else None  # None: NVML is not watched
        self.engine_pid = engine_pid
        self.hook_timeout = hook_timeout
        self.clock = clock
        self.reason: str | None = None
        self.quiet_since: float | None = clock()
        self._hook_verdict = False  # kept when the hook cannot say (timeout)
        self._unseen_pids: set[int] = set()

    @property
    def sources(self) -> list[str]:
        """What is watched, in words, for the agent's start-up log line."""
        out = []
        if self.file is not None:
            out.append(f"file {self.file}")
        if self.command:
            out.append(f"command {shlex.quote(self.command)}")
        if self.gpus is not None:
            out.append(f"NVML processes on GPU {_names(self.gpus)}")
        return out

    def foreign_processes(self) -> list[int]:
        """Compute processes on the engine's GPUs that are not the engine's."""
        if self.gpus is None:
            return []
        engine_pid = self.engine_pid()
        foreign = []
        for pid in nvml.compute_processes(self.gpus):
            if pid == os.getpid():
                continue
            ours = belongs_to_engine(pid, engine_pid) if engine_pid else False
            if ours is None:
                # NVML names processes by the host's pids; inside a container without
                # the host's pid namespace they are not ours to inspect. Counting them
                # as training would keep the worker asleep for good, so they are left
                # out and the operator is told once.
                if pid not in self._unseen_pids:
                    log.warning("GPU %s runs pid %d, which is not visible here (another pid namespace?); "
                                "NVML cannot tell it from the engine: share the host pid namespace or use "
                                "--reclaim-command/--reclaim-file", _names(self.gpus), pid)
                    self._unseen_pids.add(pid)
                continue
            if not ours:
                foreign.append(pid)
        return foreign

    def check(self) -> str | None:
        """Why training wants the GPU now, or None if no source says so."""
        if self.file is not None and file_says_reclaim(self.file):
            return f"reclaim file {self.file} exists"
        if self.command:
            verdict = hook_says_reclaim(self.command, self.hook_timeout)
            if verdict is not None:
                self._hook_verdict = verdict
            if self._hook_verdict:
                return f"reclaim command {shlex.quote(self.command)} exited 0"
        foreign = self.foreign_processes()
        if foreign:
            pids = ", ".join(map(str, foreign))
            return f"NVML shows compute process {pids} on GPU {_names(self.gpus)}, not the engine's"
        return None

    def poll(self) -> str | None:
        """Ask every source once; remembers the answer and since when all are quiet."""
        reason = self.check()
        if reason is not None:
            self.quiet_since = None
        elif self.quiet_since is None:
            self.quiet_since = self.clock()
        self.reason = reason
        return reason

    def quiet_for(self) -> float:
        """Seconds every source has said "free" (0 while one says reclaim)."""
        return 0.0 if self.quiet_since is None else self.clock() - self.quiet_since

