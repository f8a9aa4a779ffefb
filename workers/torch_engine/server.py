"""HTTP for the torch engine: the simulated engine's vLLM surface, reused.

Generation, streaming, usage, token ids, pause/resume/sleep/wake_up and the
vLLM metric names all come from `workers.sim.server` and `workers.sim.metrics`
unchanged. What differs is what the engine says about itself: its model card
is owned by `idlegrid-torch`, `/v1/torch/info` (in place of `/v1/sim/info`)
describes the model, device and memory, and `/metrics` carries none of the
simulator's modelled energy; a real GPU's joules come from NVML, read by the
worker agent.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from workers.sim.metrics import LABELS, EngineCollector
from workers.sim.profiles import BLOCK_SIZE
from workers.sim.server import VLLM_VERSION, EngineApi, EnginesInThread
from workers.sim.server import build_app as sim_build_app

from .engine import TorchEngine

SIMULATOR_ONLY = "idlegrid_sim_"  # the simulator's modelled energy, power and info


class TorchCollector(EngineCollector):
    """vLLM's metrics as the simulated engine reports them, without its modelled energy."""

    engine: TorchEngine

    def collect(self) -> Iterator[Metric]:
        for family in super().collect():
            if not family.name.startswith(SIMULATOR_ONLY):
                yield family
        engine, values = self.engine, [self.engine.model_name, "0"]
        steps = CounterMetricFamily("idlegrid_torch_steps", "Engine steps (forward passes of a batch) run.", labels=LABELS)
        steps.add_metric(values, engine.steps_total)
        yield steps
        busy = CounterMetricFamily("idlegrid_torch_busy_seconds", "Wall seconds spent in forward passes.", labels=LABELS)
        busy.add_metric(values, engine.busy_seconds)
        yield busy
        info = GaugeMetricFamily(
            "idlegrid_torch_info",
            "A random-weight Llama-shaped model computed by torch; energy is the GPU's, metered by the worker agent.",
            labels=[*LABELS, "config", "device", "device_name", "dtype", "params"],
        )
        shape = engine.model.shape
        info.add_metric([*values, shape.name, engine.gpu.id, engine.gpu.name, str(engine.dtype).removeprefix("torch."),
                         str(shape.params)], 1)
        yield info


class TorchEngineApi(EngineApi):
    def __init__(self, engine: TorchEngine) -> None:  # not EngineApi's: no simulator profiles here
        self.engine = engine
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(TorchCollector(engine))
        config = engine.config
        digest = hashlib.sha256(f"torch/{config.model}/{config.seed}/{config.max_num_seqs}".encode())
        self.fingerprint = f"idlegrid-torch-{digest.hexdigest()[:8]}"

    async def models(self, request: Request) -> Response:
        listing = json.loads((await super().models(request)).body)
        for card in listing["data"]:
            card["owned_by"] = "idlegrid-torch"
        return JSONResponse(listing)

    async def version(self, request: Request) -> Response:
        return JSONResponse({"version": f"{VLLM_VERSION}+idlegrid.torch"})

    async def info(self, request: Request) -> Response:
        engine, runner, shape = self.engine, self.engine.runner, self.engine.model.shape
        return JSONResponse({
            "simulated": False,
            "engine": "torch",
            "device": {"id": engine.gpu.id, "name": engine.gpu.name, "memory_allocated_bytes": runner.device_memory_bytes()},
            "model": {"config": shape.name, "served_name": engine.model_name, "params": shape.params,
                      "layers": shape.layers, "hidden_size": shape.hidden_size, "attention_heads": shape.attention_heads,
                      "kv_heads": shape.kv_heads, "intermediate_size": shape.intermediate_size,
                      "vocab_size": shape.vocab_size, "dtype": str(engine.dtype).removeprefix("torch."),
                      "seed": engine.config.seed, "weights": "random", "kv_bytes_per_token": engine.model.kv_bytes_per_token},
            "weights_on": runner.weights_on,
            "kv_cache_bytes": runner.kv_cache_bytes,
            "build_seconds": round(engine.build_seconds, 3),
            "max_num_seqs": engine.config.max_num_seqs,
            "max_model_len": engine.max_model_len,
            "max_num_batched_tokens": engine.config.max_num_batched_tokens,
            "kv_capacity_tokens": engine.num_gpu_blocks * BLOCK_SIZE,
            "sleep_level": engine.sleep_level,
            "steps": engine.steps_total,
            "busy_seconds": round(engine.busy_seconds, 3),
            "energy_source": None,  # not this process's to report: the worker agent reads NVML
            "held_requests": len(engine.held),
        })


def build_app(engine: TorchEngine) -> Starlette:
    return sim_build_app(engine, TorchEngineApi(engine), info_path="/v1/torch/info")


class EngineInThread(EnginesInThread):
    """A torch engine served from a private event loop in a daemon thread (tests, scripts)."""

    def __init__(self, engine: TorchEngine, *, log_level: str = "warning") -> None:
        super().__init__([engine], log_level=log_level, app_for=build_app)

    @property
    def url(self) -> str:
        return self.urls[0]
