"""Round trips to centers: configured, then measured against real engines."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from gateway.distance import CenterDistances, parse_center_rtt
from gateway.fleet import READY, Worker
from workers.sim.engine import SimConfig, SimEngine
from workers.sim.server import EnginesInThread


def test_center_rtt_flag_is_parsed_and_bad_entries_are_named():
    assert parse_center_rtt("dc-b=30, dc-c=80.5") == {"dc-b": 30.0, "dc-c": 80.5}
    assert parse_center_rtt("") == {}
    for bad in ("dc-b", "dc-b=fast", "dc-b=-3", "=30"):
        with pytest.raises(ValueError, match="bad round trip"):
            parse_center_rtt(bad)


def test_measured_round_trips_replace_the_configured_guesses():
    engines = [
        SimEngine(SimConfig(time_scale=1.0)),
        SimEngine(SimConfig(time_scale=1.0, extra_latency_ms=120)),
    ]
    with EnginesInThread(engines) as fleet:
        workers = [
            Worker(id=f"w{i}", center=center, model="m", engine_url=url, state=READY)
            for i, (center, url) in enumerate(zip(["home", "far"], fleet.urls))
        ]
        # Configured: "far" is 10 ms away and "elsewhere" 50; home is 0.
        distances = CenterDistances("home", {"far": 10.0, "elsewhere": 50.0})
        assert distances.table(["home", "far", "elsewhere"]) == {"home": 0.0, "far": 10.0, "elsewhere": 50.0}

        async def ping_a_few_times() -> None:
            async with httpx.AsyncClient() as http:
                for _ in range(4):
                    await distances.measure(http, workers)

        asyncio.run(ping_a_few_times())
    assert 110 <= distances.rtt_ms("far") < 400, "the emulated 120 ms, not the configured 10"
    assert distances.rtt_ms("home") < 60
    assert distances.rtt_ms("elsewhere") == 50.0, "no worker there to measure: the configured value stands"
