"""The simulated engine's /metrics: vLLM's metric names, plus the modelled energy.

A collector reads the engine's state at scrape time, so stepping the batch
costs nothing extra and the energy counter includes idle time up to the scrape.
Every series carries vLLM's `model_name` and `engine` labels; the energy,
power and info series say plainly that they come from a model, not a meter.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .engine import FINISH_REASONS, SimEngine
from .profiles import BLOCK_SIZE

LABELS = ["model_name", "engine"]


class EngineCollector(Collector):
    def __init__(self, engine: SimEngine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        engine = self.engine
        values = [engine.model_name, "0"]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(name, doc, labels=LABELS)
            family.add_metric(values, value)
            return family

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            family = CounterMetricFamily(name, doc, labels=LABELS)
            family.add_metric(values, value)
            return family

        yield gauge("vllm:num_requests_running", "Number of requests in model execution batches.", len(engine.running))
        yield gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.", engine.num_waiting)
        by_reason = GaugeMetricFamily(
            "vllm:num_requests_waiting_by_reason",
            "Number of waiting requests by reason. Reason labels: 'capacity' = waiting for scheduling capacity; "
            "'deferred' = deferred by transient constraints (LoRA budget, KV transfer, blocked status). "
            "Sum of all reasons equals vllm:num_requests_waiting.",
            labels=[*LABELS, "reason"],
        )
        by_reason.add_metric([*values, "capacity"], engine.num_waiting)
        by_reason.add_metric([*values, "deferred"], 0)
        yield by_reason
        yield gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", engine.kv_cache_usage)
        sleep_state = GaugeMetricFamily(
            "vllm:engine_sleep_state",
            "Engine sleep state; awake = 0 means engine is sleeping; awake = 1 means engine is awake; "
            "weights_offloaded = 1 means sleep level 1; discard_all = 1 means sleep level 2.",
            labels=[*LABELS, "sleep_state"],
        )
        sleep_state.add_metric([*values, "awake"], 0 if engine.is_sleeping else 1)
        sleep_state.add_metric([*values, "weights_offloaded"], 1 if engine.sleep_level == 1 else 0)
        sleep_state.add_metric([*values, "discard_all"], 1 if engine.sleep_level == 2 else 0)
        yield sleep_state
        yield counter("vllm:num_preemptions", "Cumulative number of preemption from the engine.", engine.preemptions_total)
        yield counter("vllm:prompt_tokens", "Number of prefill tokens processed.", engine.prompt_tokens_total)
        yield counter("vllm:generation_tokens", "Number of generation tokens processed.", engine.generation_tokens_total)
        success = CounterMetricFamily(
            "vllm:request_success", "Count of successfully processed requests.", labels=[*LABELS, "finished_reason"]
        )
        for reason in FINISH_REASONS:
            success.add_metric([*values, reason], engine.finished_total[reason])
        yield success
        # Like vLLM's: an info gauge with the cache config as labels (and no model_name).
        kv_tokens = engine.num_gpu_blocks * BLOCK_SIZE
        cache = {
            "block_size": str(BLOCK_SIZE),
            "cache_dtype": "auto",
            "enable_prefix_caching": "False",
            "gpu_memory_utilization": str(engine.config.gpu_memory_utilization),
            "kv_cache_max_concurrency": str(round(kv_tokens / engine.max_model_len, 2)),
            "kv_cache_memory_bytes": str(kv_tokens * engine.model.kv_bytes_per_token),
            "kv_cache_size_tokens": str(kv_tokens),
            "num_cpu_blocks": "None",
            "num_gpu_blocks": str(engine.num_gpu_blocks),
            "engine": "0",
        }
        info = GaugeMetricFamily("vllm:cache_config_info", "Information of the LLMEngine CacheConfig", labels=list(cache))
        info.add_metric(list(cache.values()), 1)
        yield info

        yield counter(
            "idlegrid_sim_energy_joules",
            "Modeled (not measured) GPU energy of the simulated engine, in joules of simulated time.",
            engine.energy_now(),
        )
        yield gauge("idlegrid_sim_power_watts", "Modeled (not measured) GPU board power, in watts.", engine.power_w)
        yield counter(
            "idlegrid_sim_lag_seconds",
            "Wall seconds the simulation ran behind its time scale because the process was short of CPU.",
            engine.lag_seconds,
        )
        yield gauge("idlegrid_sim_max_num_seqs", "The simulated engine's max_num_seqs.", engine.config.max_num_seqs)
        sim_info = GaugeMetricFamily(
            "idlegrid_sim_info",
            "This engine is simulated by idlegrid; energy and power are modeled.",
            labels=[*LABELS, "gpu", "model", "time_scale", "energy_source"],
        )
        sim_info.add_metric([*values, engine.gpu.id, engine.model.id, str(engine.time_scale), "modeled"], 1)
        yield sim_info


def engine_registry(engine: SimEngine) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(EngineCollector(engine))
    return registry
