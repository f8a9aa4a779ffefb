"""How far each center is from this gateway, in round-trip milliseconds.

The table starts from configuration (`--center-rtt dc-b=30,dc-c=80`, or the
fleet file's `[centers]` in `idlegrid up`) and is refined by measurement: every
few seconds the gateway times a `GET /health` to one ready worker per center and
keeps a moving average. Once a center has been measured, the measurement wins:
configured numbers are guesses about fibre paths, a ping is what the requests
will actually pay. The gateway's own center is 0 unless measured otherwise.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping

import httpx

from gateway.fleet import READY, Worker

# Weight of a new ping in the moving average: a few pings settle it, one slow
# ping (a busy engine answering /health late) does not swing it far.
EWMA_ALPHA = 0.3


def parse_center_rtt(text: str) -> dict[str, float]:
    """`dc-b=30,dc-c=80` -> {"dc-b": 30.0, "dc-c": 80.0}; ValueError naming the bad part."""
    table: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        center, sep, ms = part.partition("=")
        try:
            value = float(ms)
        except ValueError:
            value = -1.0
        if not sep or not center.strip() or value < 0:
            raise ValueError(f"bad round trip {part!r}: expected CENTER=MS with MS a non-negative number")
        table[center.strip()] = value
    return table


class CenterDistances:
    def __init__(self, own_center: str, configured_ms: Mapping[str, float] | None = None) -> None:
        self.own_center = own_center
        self.configured_ms = dict(configured_ms or {})
        self.measured_ms: dict[str, float] = {}

    def rtt_ms(self, center: str) -> float:
        if center in self.measured_ms:
            return self.measured_ms[center]
        if center == self.own_center:
            return 0.0
        return self.configured_ms.get(center, 0.0)

    def table(self, centers: Iterable[str]) -> dict[str, float]:
        """Round trips to `centers`, for a RouteRequest."""
        return {center: self.rtt_ms(center) for center in centers}

    def record(self, center: str, sample_ms: float) -> None:
        old = self.measured_ms.get(center)
        self.measured_ms[center] = sample_ms if old is None else old + EWMA_ALPHA * (sample_ms - old)

    async def measure(self, http: httpx.AsyncClient, workers: Iterable[Worker], timeout_s: float = 2.0) -> None:
        """One ping to one ready worker per center (the least loaded: its answer
        is least delayed by the engine's own work)."""
        by_center: dict[str, Worker] = {}
        for worker in workers:
            if worker.state != READY or not worker.engine_url:
                continue
            best = by_center.get(worker.center)
            if best is None or worker.reserved_requests < best.reserved_requests:
                by_center[worker.center] = worker
        for center, worker in by_center.items():
            headers = {"Authorization": f"Bearer {worker.engine_api_key}"} if worker.engine_api_key else {}
            started = time.perf_counter()
            try:
                response = await http.get(worker.engine_url.rstrip("/") + "/health", headers=headers, timeout=timeout_s)
            except httpx.HTTPError:
                continue  # the heartbeat and watchdog deal with dead workers; no sample
            if response.status_code < 500:
                # On a time-scaled simulated engine, in the simulated ms its speed model uses.
                self.record(center, (time.perf_counter() - started) * 1000 * worker.time_scale)
