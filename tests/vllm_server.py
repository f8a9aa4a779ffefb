"""A real vLLM server (CPU build) serving the tiny model, for tests.

    from tests.vllm_server import vllm_engine   # in conftest.py: a session fixture

    def test_something(vllm_engine):
        base_url, api_key, model = vllm_engine

Starting takes about a minute on two cores (three Python processes import
torch and vLLM), so one server is shared by the whole session. Tests that need
it are skipped, with the reason, where vLLM is not installed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from pathlib import Path
from typing import Iterator, NamedTuple

import httpx
import pytest

from gateway.embedded_redis import free_port
from workers.vllm_launch import vllm_command, vllm_missing_reason

TINY_MODEL_NAME = "tiny-r1"
START_TIMEOUT_S = float(os.environ.get("IDLEGRID_VLLM_START_TIMEOUT", "240"))

# Small and quick on a 2-core machine: 1 GiB of KV cache (half a million
# tokens for this model), no torch.compile (saves ~35 s at start), float32
# (the CPU kernels' safest dtype).
TEST_ENGINE_ARGS = [
    "--max-model-len",
    "2048",
    "--dtype",
    "float32",
    "--enforce-eager",
    "--max-num-seqs",
    "32",
]
TEST_ENGINE_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
}


class VLLMEngine(NamedTuple):
    base_url: str
    api_key: str
    model: str


class VLLMServer:
    """One vLLM server process group, started on a free loopback port."""

    def __init__(
        self,
        model_path: Path,
        log_path: Path,
        served_model_name: str = TINY_MODEL_NAME,
        api_key: str | None = None,
        extra_args: list[str] | None = None,
    ):
        self.port = free_port()
        self.api_key = api_key or f"sk-test-{uuid.uuid4().hex[:12]}"
        self.model = served_model_name
        self.log_path = Path(log_path)
        self.argv, env = vllm_command(
            str(model_path),
            "127.0.0.1",
            self.port,
            self.api_key,
            TEST_ENGINE_ARGS + list(extra_args or []),
            served_model_name=served_model_name,
        )
        self.env = {**os.environ, **TEST_ENGINE_ENV, **env}
        self.process: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def engine(self) -> VLLMEngine:
        return VLLMEngine(self.base_url, self.api_key, self.model)

    def start(self, timeout: float = START_TIMEOUT_S) -> "VLLMServer":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            # Own session: vLLM forks an engine-core and a worker process, and
            # stop() must be able to reach all of them at once.
            self.process = subprocess.Popen(
                self.argv, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        try:
            self._wait_healthy(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"vLLM exited with code {self.process.returncode} while starting:\n{self.log_tail()}"
                )
            try:
                if httpx.get(self.base_url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"vLLM not healthy after {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self, grace: float = 20.0) -> None:
        """SIGTERM the whole process group, then SIGKILL what is left."""
        if self.process is None:
            return
        pgid = self.process.pid  # leader of its own session, so also the group id
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
            if _group_gone(pgid, self.process, wait):
                break
        self.process = None

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> "VLLMServer":
        return self.start() if self.process is None else self

    def __exit__(self, *exc) -> None:
        self.stop()


def _group_gone(pgid: int, leader: subprocess.Popen, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        leader.poll()  # reap the leader so it does not linger as a zombie
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    return False


def start_tiny_vllm(log_dir: Path, **kwargs) -> VLLMServer:
    """Build (or reuse) the tiny model and start a vLLM server for it."""
    from tests.tiny_model import tiny_model_path

    reason = vllm_missing_reason()
    if reason:
        pytest.skip(reason)
    return VLLMServer(tiny_model_path(), Path(log_dir) / "vllm.log", **kwargs).start()


# One server per test session, even if both conftest.py and a test module
# import the fixtures below (pytest then holds two definitions of them).
_shared: VLLMServer | None = None


@pytest.fixture(scope="session")
def vllm_server(tmp_path_factory) -> Iterator[VLLMServer]:
    """The shared real vLLM server (skips the test where vLLM is missing)."""
    global _shared
    if _shared is None or _shared.process is None:
        _shared = start_tiny_vllm(tmp_path_factory.mktemp("vllm"))
    try:
        yield _shared
    finally:
        _shared.stop()


@pytest.fixture(scope="session")
def vllm_engine(vllm_server) -> VLLMEngine:
    """(base_url, api_key, model) of the shared real vLLM server."""
    return vllm_server.engine
