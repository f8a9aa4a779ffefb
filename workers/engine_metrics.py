"""What an engine's Prometheus `/metrics` page says about its load and capacity.

Real vLLM and the simulated engine expose the same names (DESIGN, "The engine
contract"), so one parser serves both. A vLLM server with data parallelism
reports one label set per engine core; counts are summed over them, fractions
averaged. We use prometheus_client's own text parser rather than regexes, so
label quoting, escapes and comments are handled the way Prometheus does.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

RUNNING = "vllm:num_requests_running"
WAITING = "vllm:num_requests_waiting"
KV_USAGE = "vllm:kv_cache_usage_perc"
KV_USAGE_DEPRECATED = "vllm:gpu_cache_usage_perc"  # vLLM before 0.10
CACHE_CONFIG = "vllm:cache_config_info"
SIM_ENERGY = "idlegrid_sim_energy_joules_total"
SIM_POWER = "idlegrid_sim_power_watts"


@dataclass
class EngineMetrics:
    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0  # 0..1
    # KV cache size in tokens (num_gpu_blocks × block_size); None where not reported.
    kv_capacity_tokens: int | None = None
    # Only the simulated engine reports these, from its power model.
    energy_j: float | None = None
    power_w: float | None = None

    @property
    def in_flight(self) -> int:
        return self.running + self.waiting


def _samples_by_name(text: str) -> dict[str, list]:
    by_name: dict[str, list] = defaultdict(list)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            by_name[sample.name].append(sample)
    return by_name


def _sum(samples: list) -> float | None:
    return sum(s.value for s in samples) if samples else None


def _kv_capacity_tokens(cache_config_samples: list) -> int | None:
    """num_gpu_blocks × block_size from the `vllm:cache_config_info` labels.

    With data parallelism vLLM repeats the same labels once per engine, and
    num_gpu_blocks is already the total over engines, so label sets are not summed.
    """
    best = None
    for sample in cache_config_samples:
        try:
            tokens = int(sample.labels["num_gpu_blocks"]) * int(sample.labels["block_size"])
        except (KeyError, ValueError):
            continue  # "None" before the KV cache is profiled
        best = tokens if best is None else max(best, tokens)
    return best or None


def parse_metrics(text: str) -> EngineMetrics:
    """Parse an engine's `/metrics` text. Raises ValueError on text that is not Prometheus format."""
    samples = _samples_by_name(text)
    kv_samples = samples.get(KV_USAGE) or samples.get(KV_USAGE_DEPRECATED) or []
    return EngineMetrics(
        running=int(_sum(samples.get(RUNNING, [])) or 0),
        waiting=int(_sum(samples.get(WAITING, [])) or 0),
        kv_usage=sum(s.value for s in kv_samples) / len(kv_samples) if kv_samples else 0.0,
        kv_capacity_tokens=_kv_capacity_tokens(samples.get(CACHE_CONFIG, [])),
        energy_j=_sum(samples.get(SIM_ENERGY, [])),
        power_w=_sum(samples.get(SIM_POWER, [])),
    )
