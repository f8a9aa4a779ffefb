"""Starting, watching and stopping an engine server in a process group of its own.

An engine (vLLM or the simulated one) may start helper processes of its own:
vLLM runs its engine core in a child. Giving the engine a fresh session makes
it the leader of a process group, so one signal to the group reaches all of
them and stopping the worker leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import subprocess
import sys
import time

import httpx

log = logging.getLogger(__name__)


class EngineFailed(RuntimeError):
    """The engine exited or never became healthy."""


def _die_with_parent() -> None:
    """Runs in the child before exec: if the agent is killed outright (SIGKILL,
    OOM), the kernel sends the engine SIGTERM, so no GPU is held by an orphan."""
    PR_SET_PDEATHSIG = 1
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _redacted(argv: list[str]) -> list[str]:
    """argv fit for a log: the engine's API key is a secret."""
    out = []
    for i, arg in enumerate(argv):
        if i > 0 and argv[i - 1] == "--api-key":
            arg = "***"
        elif arg.startswith("--api-key="):
            arg = "--api-key=***"
        out.append(arg)
    return out


class EngineProcess:
    """One engine server process (the leader of its own process group)."""

    def __init__(self, argv: list[str], env: dict[str, str] | None = None, name: str = "engine"):
        self.argv = argv
        self.env = env
        self.name = name
        self.process: subprocess.Popen | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def start(self) -> "EngineProcess":
        # Must be called from the thread that lives as long as the agent: the
        # parent-death signal fires when the *thread* that forked exits.
        self.process = subprocess.Popen(
            self.argv,
            env=self.env,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )
        log.info("%s started: pid %d: %s", self.name, self.process.pid, " ".join(_redacted(self.argv)))
        return self

    def exit_code(self) -> int | None:
        """None while running, else its exit status (negative: killed by that signal)."""
        return self.process.poll() if self.process else None

    def _group_alive(self) -> bool:
        try:
            os.killpg(self.process.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def _signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.process.pid, sig)
        except ProcessLookupError:
            pass

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM the whole group; SIGKILL whatever is left after `timeout` seconds."""
        if self.process is None:
            return
        self._signal_group(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.process.poll()  # reap the leader so it does not linger as a zombie
            if not self._group_alive():
                break
            time.sleep(0.05)
        else:
            log.warning("%s (pid %d) did not stop within %.0fs of SIGTERM; sending SIGKILL",
                        self.name, self.process.pid, timeout)
            self._signal_group(signal.SIGKILL)
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            log.error("%s (pid %d) survived SIGKILL", self.name, self.process.pid)
            return
        log.info("%s stopped (pid %d, exit %s)", self.name, self.process.pid, self.process.returncode)


async def wait_until_healthy(
    client: httpx.AsyncClient,
    engine_url: str,
    timeout: float,
    process: EngineProcess | None = None,
    stop: asyncio.Event | None = None,
) -> bool:
    """Poll `GET {engine_url}/health` until it answers 200.

    Returns False if `stop` is set first (the operator gave up). Raises
    EngineFailed if the engine process exits or `timeout` seconds pass.
    """
    deadline = time.monotonic() + timeout
    last_problem = "no answer yet"
    while True:
        if process is not None and process.exit_code() is not None:
            raise EngineFailed(f"{process.name} exited with code {process.exit_code()} before it became healthy")
        try:
            response = await client.get(f"{engine_url}/health", timeout=2.0)
            if response.status_code == 200:
                return True
            last_problem = f"/health answered {response.status_code}"
        except httpx.HTTPError as exc:
            last_problem = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if time.monotonic() > deadline:
            raise EngineFailed(f"engine at {engine_url} not healthy after {timeout:.0f}s ({last_problem})")
        if stop is not None:
            try:
                await asyncio.wait_for(stop.wait(), timeout=0.5)
                return False
            except asyncio.TimeoutError:
                pass
        else:
            await asyncio.sleep(0.5)
