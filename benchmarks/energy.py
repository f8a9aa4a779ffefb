"""Reading the workers' energy counters while a benchmark runs, and what they add up to.

Where `--energy-from` points:

* `http(s)://gateway` — an idlegrid gateway's `GET /admin/workers` (admin
  token from `IDLEGRID_ADMIN_TOKEN` or `--admin-token`): each worker's
  cumulative `energy_j`, its `energy_source` (`nvml` or `modeled`), center,
  GPU and model, as last heartbeated by its agent.
* `redis://…` — the fleet's Redis directly: the worker hashes
  `idlegrid:{fleet}:worker:<id>` listed in `idlegrid:{fleet}:workers`.
* `http(s)://host:port/metrics` — one Prometheus endpoint: the simulated
  engine's `idlegrid_sim_energy_joules_total` (modeled), or the NVIDIA DCGM
  exporter's `DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION` (NVML, millijoules).

The sampler reads the counters every `interval` seconds on the run's clock;
`energy_over_window` then takes the steady window and turns samples and
request timelines into joules, watts and tokens per joule per worker, per
center and for the fleet. Nothing is invented: workers that report no
counter are listed as such, and without any counter the result says
`energy_source: "unavailable"` with `tokens_per_joule: null`.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Protocol, Sequence
from urllib.parse import urlparse

import httpx
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.client import RequestRecord
from benchmarks.metrics import Window, energy_between, tokens_between

FLEET_WORKERS_KEY = "idlegrid:{fleet}:workers"
# Fewer counter changes than this inside the steady window make the energy figure rough.
MIN_COUNTER_UPDATES = 5
WORKER_KEY = "idlegrid:{fleet}:worker:%s"

# Prometheus counters we know, and what the joules are measured by.
PROMETHEUS_COUNTERS = {
    "idlegrid_sim_energy_joules_total": ("modeled", 1.0),
    "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION": ("nvml", 1e-3),  # millijoules
}


class EnergyReadError(RuntimeError):
    pass


@dataclass
class WorkerReading:
    worker_id: str
    energy_j: float | None
    energy_source: str | None = None
    center: str = ""
    gpu: str = ""
    model: str = ""
    power_w: float | None = None
    state: str = ""
    # A simulated engine's clock runs `time_scale` times faster than the wall's, and its
    # modeled joules are joules of simulated time. None: real time, or not known.
    time_scale: float | None = None


class WorkerEnergyReader(Protocol):
    description: str

    async def read(self) -> list[WorkerReading]: ...

    async def close(self) -> None: ...


def _number(value) -> float | None:
    if value is None or value == "":
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def redact(url: str) -> str:
    """The URL without user name or password, fit for logs and results."""
    parsed = urlparse(url)
    if not (parsed.username or parsed.password):
        return url
    host = parsed.hostname or ""
    if parsed.port:
        host += f":{parsed.port}"
    return parsed._replace(netloc=host).geturl()


def reading_from_worker(record: dict) -> WorkerReading:
    """A reading from a worker record: the gateway's JSON or a Redis hash (all strings)."""
    return WorkerReading(
        worker_id=str(record.get("id", "")),
        energy_j=_number(record.get("energy_j")),
        energy_source=(record.get("energy_source") or None),
        center=str(record.get("center") or ""),
        gpu=str(record.get("gpu") or ""),
        model=str(record.get("model") or ""),
        power_w=_number(record.get("power_w")),
        state=str(record.get("state") or ""),
        time_scale=_number(record.get("time_scale")),
    )


class GatewayWorkers:
    def __init__(self, url: str, admin_token: str, timeout: float = 5.0):
        self.url = url.rstrip("/") + "/admin/workers"
        self.description = f"gateway {url}"
        self._client = httpx.AsyncClient(timeout=timeout, headers={"Authorization": f"Bearer {admin_token}"})

    async def read(self) -> list[WorkerReading]:
        try:
            response = await self._client.get(self.url)
        except httpx.HTTPError as exc:
            raise EnergyReadError(f"{self.url}: {exc!r}") from None
        if response.status_code != 200:
            raise EnergyReadError(f"{self.url}: HTTP {response.status_code}")
        try:
            workers = response.json()["workers"]
        except (ValueError, KeyError, TypeError):
            raise EnergyReadError(f"{self.url}: expected {{'workers': [...]}}") from None
        return [reading_from_worker(w) for w in workers]

    async def close(self) -> None:
        await self._client.aclose()


class RedisWorkers:
    def __init__(self, url: str):
        import redis.asyncio as aioredis

        self.description = f"redis {redact(url)}"
        self._redis = aioredis.from_url(url, decode_responses=True, socket_timeout=5.0)

    async def read(self) -> list[WorkerReading]:
        try:
            ids = sorted(await self._redis.smembers(FLEET_WORKERS_KEY))
            async with self._redis.pipeline(transaction=False) as pipe:
                for worker_id in ids:
                    pipe.hgetall(WORKER_KEY % worker_id)
                hashes = await pipe.execute()
        except Exception as exc:  # redis-py raises many kinds; all mean "no reading now"
            raise EnergyReadError(f"{self.description}: {exc!r}") from None
        readings = []
        for worker_id, fields in zip(ids, hashes):
            if fields:
                readings.append(reading_from_worker({"id": worker_id, **fields}))
        return readings

    async def close(self) -> None:
        await self._redis.aclose()


class PrometheusEnergy:
    """Energy counters on one Prometheus /metrics page; one worker per label set."""

    def __init__(self, url: str, timeout: float = 5.0):
        self.url = url
        self.description = f"prometheus {url}"
        self._client = httpx.AsyncClient(timeout=timeout)

    async def read(self) -> list[WorkerReading]:
        try:
            response = await self._client.get(self.url)
        except httpx.HTTPError as exc:
            raise EnergyReadError(f"{self.url}: {exc!r}") from None
        if response.status_code != 200:
            raise EnergyReadError(f"{self.url}: HTTP {response.status_code}")
        return parse_prometheus_energy(response.text, default_id=urlparse(self.url).netloc)

    async def close(self) -> None:
        await self._client.aclose()


def parse_prometheus_energy(text: str, default_id: str) -> list[WorkerReading]:
    """Energy counters on a /metrics page; the simulated engine's `idlegrid_sim_info`
    adds its GPU and time scale. One reading per counter series, named after the
    page (`host:port`), plus the series' labels when the page has several."""
    counters, sim_info = [], {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "idlegrid_sim_info":
                sim_info[(sample.labels.get("model_name"), sample.labels.get("engine"))] = sample.labels
                continue
            # prometheus_client's parser adds `_total` to counters that lack it (DCGM's do).
            known = PROMETHEUS_COUNTERS.get(sample.name) or PROMETHEUS_COUNTERS.get(sample.name.removesuffix("_total"))
            if known is not None:
                counters.append((sample, *known))
    readings = []
    for sample, source, to_joules in counters:
        labels = dict(sample.labels)
        info = sim_info.get((labels.get("model_name"), labels.get("engine")), {})
        label_text = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
        readings.append(
            WorkerReading(
                worker_id=f"{default_id}{{{label_text}}}" if len(counters) > 1 and label_text else default_id,
                energy_j=sample.value * to_joules,
                energy_source=info.get("energy_source", source),
                center=labels.get("center", ""),
                gpu=info.get("gpu") or labels.get("gpu") or labels.get("modelName", ""),
                model=labels.get("model_name") or labels.get("model", ""),
                time_scale=_number(info.get("time_scale")),
            )
        )
    return readings


def energy_source_kind(url: str, admin_token: str | None) -> str:
    """"gateway", "redis" or "prometheus" for an `--energy-from` value; ValueError (one clear line) if unusable."""
    parsed = urlparse(url)
    if parsed.scheme in ("redis", "rediss", "unix"):
        return "redis"
    if parsed.scheme in ("http", "https") and parsed.netloc:
        if parsed.path.rstrip("/").endswith("/metrics"):
            return "prometheus"
        if not admin_token:
            raise ValueError("--energy-from a gateway needs its admin token: set IDLEGRID_ADMIN_TOKEN or pass --admin-token")
        return "gateway"
    raise ValueError(f"--energy-from {url!r}: expected http(s)://gateway, http(s)://host/metrics or redis://host:port")


def reader_for(url: str, admin_token: str | None) -> WorkerEnergyReader:
    kind = energy_source_kind(url, admin_token)
    if kind == "redis":
        return RedisWorkers(url)
    if kind == "prometheus":
        return PrometheusEnergy(url)
    return GatewayWorkers(url, admin_token or "")


@dataclass
class Snapshot:
    t: float  # seconds on the run's clock
    readings: list[WorkerReading]


@dataclass
class EnergySampler:
    """Reads the counters every `interval_s` until stopped; keeps every snapshot."""

    reader: WorkerEnergyReader
    t0: float  # the run's clock origin (time.perf_counter())
    interval_s: float = 0.5
    snapshots: list[Snapshot] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    async def sample_once(self) -> None:
        try:
            readings = await self.reader.read()
        except EnergyReadError as exc:
            self.errors.append(str(exc))
            return
        self.snapshots.append(Snapshot(time.perf_counter() - self.t0, readings))

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.sample_once()
            try:
                await asyncio.wait_for(stop.wait(), timeout=self.interval_s)
            except asyncio.TimeoutError:
                pass


def _source_label(sources: set[str]) -> str:
    if not sources:
        return "unavailable"
    return sources.pop() if len(sources) == 1 else "mixed"


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or not b:
        return None
    return a / b


def _updates_between(series: Sequence[tuple[float, float]], t0: float, t1: float) -> int:
    """How many readings inside [t0, t1] showed a new counter value (heartbeats and
    NVML refresh counters in steps, so only changes carry information)."""
    updates = 0
    for (_, before), (t, value) in zip(series, series[1:]):
        if t0 <= t <= t1 and value != before:
            updates += 1
    return updates


def _sum_known(values: Sequence[float | None]) -> float | None:
    """The sum, or None when any part is unknown (a partial sum would read as the whole)."""
    return None if not values or None in values else sum(values)


def _sum_power(workers: Sequence[dict]) -> float | None:
    return _sum_known([w["avg_power_w"] for w in workers])


def unavailable(note: str) -> dict:
    return {
        "tokens_per_joule": None,
        "energy_joules": None,
        "energy_source": "unavailable",
        "avg_power_w": None,
        "energy_note": note,
        "energy_by_worker": [],
        "energy_by_center": [],
    }


def energy_over_window(
    snapshots: Sequence[Snapshot],
    window: Window | None,
    records: Sequence[RequestRecord],
    model: str | None = None,
) -> dict:
    """Energy, power and tokens per joule over the steady window.

    Tokens per worker and per center need to know which worker served each
    request; the gateway says so in the `x-idlegrid-worker` response header.
    Without it only fleet-wide tokens per joule can be given.
    """
    if window is None:
        return unavailable("no requests were sent, so there is no window to measure")
    if not snapshots:
        return unavailable("no energy readings could be taken")

    points: dict[str, list[tuple[float, float]]] = {}
    latest: dict[str, WorkerReading] = {}
    for snap in snapshots:
        for reading in snap.readings:
            latest[reading.worker_id] = reading
            if reading.energy_j is not None:
                points.setdefault(reading.worker_id, []).append((snap.t, reading.energy_j))

    workers = list(latest.values())
    notes = []
    if model and any(w.model == model for w in workers):
        others = [w.worker_id for w in workers if w.model != model]
        workers = [w for w in workers if w.model == model]
        if others:
            notes.append(f"{len(others)} worker(s) serving other models were left out")
    if not workers:
        return unavailable("the energy source lists no workers")

    without = sorted(w.worker_id for w in workers if w.worker_id not in points)
    metered = [w for w in workers if w.worker_id in points]
    if not metered:
        return unavailable("the workers report no energy counter (energy_j is empty), so tokens per joule cannot be measured")

    attributed = any(r.worker for r in records)
    length = window.length_s
    by_worker = []
    for w in sorted(metered, key=lambda w: w.worker_id):
        series = points[w.worker_id]
        updates = _updates_between(series, window.start_s, window.end_s)
        # A counter that never moved inside the window (one shorter than the
        # workers' heartbeat) says nothing about the energy spent there: unknown, not 0 J.
        joules = energy_between(series, window.start_s, window.end_s) if updates else None
        # Modeled joules of a time-scaled simulator span time_scale × the wall-clock window.
        seconds = length * (w.time_scale or 1.0)
        tokens = tokens_between([r for r in records if r.worker == w.worker_id], window.start_s, window.end_s) if attributed else None
        by_worker.append(
            {
                "worker": w.worker_id,
                "center": w.center,
                "gpu": w.gpu,
                "energy_source": w.energy_source or "unknown",
                "energy_joules": joules,
                "avg_power_w": _ratio(joules, seconds),
                "time_scale": w.time_scale,
                "output_tokens": tokens,
                "tokens_per_joule": _ratio(tokens, joules),
                "samples_in_window": sum(1 for t, _ in series if window.start_s <= t <= window.end_s),
                "counter_updates_in_window": updates,
                "covers_window": series[0][0] <= window.start_s and series[-1][0] >= window.end_s,
            }
        )

    by_center = []
    for center in sorted({w["center"] for w in by_worker}):
        members = [w for w in by_worker if w["center"] == center]
        joules = _sum_known([w["energy_joules"] for w in members])
        tokens = sum(w["output_tokens"] for w in members) if attributed else None
        by_center.append(
            {
                "center": center,
                "workers": len(members),
                "energy_source": _source_label({w["energy_source"] for w in members}),
                "energy_joules": joules,
                "avg_power_w": _sum_power(members),
                "output_tokens": tokens,
                "tokens_per_joule": _ratio(tokens, joules),
            }
        )

    fleet_joules = _sum_known([w["energy_joules"] for w in by_worker])
    fleet_tokens = tokens_between(records, window.start_s, window.end_s)
    source = _source_label({w["energy_source"] for w in by_worker})
    if source == "mixed":
        kinds = sorted({w["energy_source"] for w in by_worker})
        notes.append(f"energy sources are mixed ({', '.join(kinds)}): measured and modeled joules are added together")
    fewest_updates = min(w["counter_updates_in_window"] for w in by_worker)
    if fewest_updates == 0:
        notes.append(
            f"an energy counter did not change inside the {length:.2f} s steady window (workers report it with "
            "each heartbeat), so energy is not given; send more requests for a longer window"
        )
    elif fewest_updates < MIN_COUNTER_UPDATES:
        notes.append(
            f"an energy counter changed only {fewest_updates} time(s) inside the {length:.2f} s steady window, "
            "so these energy figures are rough; send more requests for a longer window"
        )
    partial = [w["worker"] for w in by_worker if not w["covers_window"]]
    if partial:
        notes.append(
            f"{len(partial)} worker(s) were not read over the whole window (they joined or left during it); "
            "their energy counts only while they were read"
        )
    tokens_per_joule = _ratio(fleet_tokens, fleet_joules)
    if without:
        tokens_per_joule = None
        notes.append(
            f"{len(without)} of {len(workers)} workers report no energy counter ({', '.join(without[:5])}"
            f"{', …' if len(without) > 5 else ''}); fleet-wide tokens per joule is not given"
        )
    scales = {w["time_scale"] for w in by_worker if w["energy_source"] == "modeled"}
    if scales - {None, 1.0}:
        notes.append(
            f"simulated engines run {', '.join(f'{x:g}' for x in sorted(scales - {None}))}× faster than real time: "
            "average power is in simulated watts, while latency and throughput are wall-clock"
        )
    elif None in scales:
        notes.append(
            "modeled energy is in joules of simulated time; if the simulated engines run with --time-scale X, "
            "average power reads X times too high (tokens per joule is unaffected)"
        )
    if not attributed:
        notes.append("responses do not name their worker, so tokens per joule is given fleet-wide only")
    return {
        "tokens_per_joule": tokens_per_joule,
        "energy_joules": fleet_joules,
        "energy_source": source,
        "avg_power_w": _sum_power(by_worker),
        "steady_output_tokens": fleet_tokens,
        "steady_output_throughput": _ratio(fleet_tokens, length),
        "energy_note": "; ".join(notes),
        "energy_workers_without_counter": without,
        "energy_by_worker": by_worker,
        "energy_by_center": by_center,
    }
