"""`idlegrid bench`: metric math on timelines with known answers, arrival
processes, workloads, flag checking, and short live runs against real HTTP
servers on loopback."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from benchmarks import cli
from benchmarks.arrivals import arrival_offsets
from benchmarks.client import RequestRecord
from benchmarks.energy import RedisWorkers, Snapshot, WorkerReading, energy_over_window, parse_prometheus_energy
from benchmarks.metrics import (
    energy_between,
    in_flight_timeline,
    percentile,
    request_tpot,
    steady_window,
    summarize,
    tokens_between,
)
from benchmarks.workloads import R1_OUTPUT_CAP, WorkloadError, build_requests, jsonl_requests
from gateway.embedded_redis import EmbeddedRedis
from tests.bench_files import check_bench_outputs
from tests.conftest import start_gateway
from workers.sim import EnginesInThread, SimEngine
from workers.sim.profiles import get_gpu


def record(start: float, token_times: list[float], tokens: int | None = None, *, ok: bool = True,
           error_kind: str | None = None, worker: str | None = None, prompt_tokens: int = 10) -> RequestRecord:
    r = RequestRecord(index=0, input_len=prompt_tokens, max_tokens=tokens or len(token_times))
    r.start_s = start
    r.token_times_s = list(token_times)
    r.done_s = token_times[-1] if token_times else 0.0
    r.usage_output_tokens = tokens
    r.prompt_tokens = prompt_tokens
    r.success = ok
    r.error_kind = error_kind
    r.worker = worker
    return r


# --- metric math -------------------------------------------------------------


def test_percentiles_interpolate_between_ranks_like_numpy():
    values = [4.0, 1.0, 3.0, 2.0]
    assert percentile(values, 50) == pytest.approx(2.5)
    assert percentile(values, 90) == pytest.approx(3.7)
    assert percentile(values, 99) == pytest.approx(3.97)
    assert percentile(values, 0) == 1.0 and percentile(values, 100) == 4.0
    assert percentile([7.0], 99) == 7.0


def test_one_request_timeline_gives_ttft_itl_tpot_e2el():
    # Sent at t=1 s; text chunks 0.5, 0.6, 0.8 and 1.0 s later; 4 tokens by usage.
    r = record(1.0, [0.5, 0.6, 0.8, 1.0], tokens=4)
    assert r.ttft_s == 0.5
    assert r.e2el_s == 1.0
    assert r.itls_s == pytest.approx([0.1, 0.2, 0.2])
    assert request_tpot(r) == pytest.approx(0.5 / 3)

    summary = summarize([r], duration_s=2.0)
    assert summary["completed"] == 1 and summary["failed"] == 0
    assert summary["mean_ttft_ms"] == pytest.approx(500)
    assert summary["median_itl_ms"] == pytest.approx(200)
    assert summary["mean_itl_ms"] == pytest.approx(500 / 3)
    assert summary["p99_tpot_ms"] == pytest.approx(500 / 3)
    assert summary["mean_e2el_ms"] == pytest.approx(1000)
    assert summary["request_throughput"] == pytest.approx(0.5)
    assert summary["output_throughput"] == pytest.approx(2.0)
    assert summary["total_token_throughput"] == pytest.approx(7.0)  # 10 prompt + 4 output over 2 s
    assert summary["request_goodput"] is None  # no SLO given


def test_tpot_counts_tokens_from_usage_when_chunks_carry_several():
    r = record(0.0, [0.2, 0.5, 0.8], tokens=7)  # 3 chunks, 7 tokens
    assert request_tpot(r) == pytest.approx(0.6 / 6)
    assert request_tpot(record(0.0, [0.3], tokens=1)) is None


def test_goodput_counts_completed_requests_meeting_every_slo():
    fast = record(0.0, [0.1, 0.13, 0.16], tokens=3)  # TTFT 100 ms, TPOT 30 ms
    slow_start = record(0.0, [0.5, 0.52, 0.54], tokens=3)  # TTFT 500 ms
    slow_decode = record(0.0, [0.1, 0.2, 0.3], tokens=3)  # TPOT 100 ms
    one_token = record(0.0, [0.15], tokens=1)  # TPOT counts as 0
    failed = record(0.0, [0.1], tokens=1, ok=False, error_kind="stream_cut")
    records = [fast, slow_start, slow_decode, one_token, failed]
    summary = summarize(records, duration_s=4.0, slo={"ttft_ms": 200, "tpot_ms": 50})
    assert summary["good_requests"] == 2
    assert summary["request_goodput"] == pytest.approx(0.5)
    assert summary["completed"] == 4 and summary["failed"] == 1
    assert summary["failures"] == {"stream_cut": 1}


def test_interrupted_requests_are_neither_completed_nor_failed():
    records = [
        record(0.0, [0.1, 0.2], tokens=2),
        record(0.0, [], ok=False, error_kind="http_503"),
        record(0.0, [0.1], ok=False, error_kind="interrupted"),
    ]
    summary = summarize(records, duration_s=1.0)
    assert (summary["completed"], summary["failed"]) == (1, 1)
    assert summary["failures"] == {"http_503": 1}


def test_empty_latency_stats_are_null_not_zero():
    summary = summarize([record(0.0, [], ok=False, error_kind="connect_error")], duration_s=1.0)
    assert summary["mean_ttft_ms"] is None and summary["p99_e2el_ms"] is None


def test_in_flight_timeline_counts_overlaps():
    assert in_flight_timeline([(0, 2), (1, 3)]) == [(0, 1), (1, 2), (2, 1), (3, 0)]


def test_steady_window_of_a_closed_loop_runs_from_full_concurrency_to_last_send():
    # Concurrency 2, six requests of 1 s each: sends at 0, 0.1, then each time one ends.
    intervals = [(0.0, 1.0), (0.1, 1.1), (1.0, 2.0), (1.1, 2.1), (2.0, 3.0), (2.1, 3.1)]
    window = steady_window(intervals, concurrency=2)
    assert window.kind == "steady"
    assert (window.start_s, window.end_s) == (0.1, 2.1)
    assert window.steady_level == 2


def test_steady_window_of_an_open_loop_starts_at_the_median_level():
    # Arrivals every 0.5 s, each lasting 1.5 s: in flight climbs 1, 2, 3 and holds 3.
    intervals = [(0.5 * i, 0.5 * i + 1.5) for i in range(10)]
    window = steady_window(intervals)
    assert window.steady_level == 3
    assert window.start_s == pytest.approx(1.0)  # third arrival
    assert window.end_s == pytest.approx(4.5)  # last arrival; after it the load drains


def test_steady_window_falls_back_to_the_whole_run_without_a_steady_part():
    window = steady_window([(0.2, 1.2)])
    assert window.kind == "whole_run"
    assert (window.start_s, window.end_s) == (0.2, 1.2)
    assert steady_window([]) is None


def test_energy_between_interpolates_and_carries_over_a_counter_reset():
    points = [(0.0, 100.0), (1.0, 300.0), (2.0, 500.0)]
    assert energy_between(points, 0.5, 1.5) == pytest.approx(200.0)
    # The engine restarted between 1 s and 2 s: its counter began again from 0.
    reset = [(0.0, 100.0), (1.0, 300.0), (2.0, 150.0), (3.0, 350.0)]
    assert energy_between(reset, 0.0, 3.0) == pytest.approx(200 + 150 + 200)
    # Outside the samples the counter is held flat (a worker not yet seen).
    assert energy_between(points, -5.0, 0.0) == 0.0


def test_tokens_between_places_usage_tokens_on_chunks():
    r = record(10.0, [0.5, 1.5, 2.5, 3.5], tokens=8)  # 2 tokens per chunk, at 10.5 … 13.5
    assert tokens_between([r], 11.0, 13.0) == pytest.approx(4.0)
    assert tokens_between([r], 0.0, 100.0) == pytest.approx(8.0)


def _linear_counter(worker: str, watts: float, *, center: str, source: str | None = "modeled",
                    model: str = "m", times=None) -> list[tuple[float, WorkerReading]]:
    times = times if times is not None else [i * 0.5 for i in range(21)]  # 0 … 10 s
    return [(t, WorkerReading(worker, None if source is None else 1000.0 + watts * t, source, center, "h100", model))
            for t in times]


def _snapshots(*series) -> list[Snapshot]:
    by_time: dict[float, list[WorkerReading]] = {}
    for s in series:
        for t, reading in s:
            by_time.setdefault(t, []).append(reading)
    return [Snapshot(t, readings) for t, readings in sorted(by_time.items())]


def _steady_records() -> list[RequestRecord]:
    # Worker a streams one token every 0.1 s from t=1 to t=9; b one every 0.2 s.
    a = record(0.9, [0.1 + 0.1 * i for i in range(81)], tokens=81, worker="a")
    b = record(0.8, [0.2 + 0.2 * i for i in range(41)], tokens=41, worker="b")
    return [a, b]


def test_steady_window_energy_gives_tokens_per_joule_per_worker_center_and_fleet():
    snapshots = _snapshots(_linear_counter("a", 300, center="dc-a"), _linear_counter("b", 100, center="dc-b"))
    window = steady_window([(1.0, 9.0), (2.0, 8.0), (3.0, 9.5)], concurrency=None)
    window.start_s, window.end_s = 2.0, 7.0  # a window with easy numbers
    result = energy_over_window(snapshots, window, _steady_records(), model="m")

    assert result["energy_source"] == "modeled"
    assert result["energy_joules"] == pytest.approx(5 * 300 + 5 * 100)
    assert result["avg_power_w"] == pytest.approx(400)
    # In [2, 7): a sends 50 tokens, b 25.
    assert result["steady_output_tokens"] == pytest.approx(75)
    assert result["tokens_per_joule"] == pytest.approx(75 / 2000)
    by_worker = {w["worker"]: w for w in result["energy_by_worker"]}
    assert by_worker["a"]["tokens_per_joule"] == pytest.approx(50 / 1500)
    assert by_worker["b"]["avg_power_w"] == pytest.approx(100)
    by_center = {c["center"]: c for c in result["energy_by_center"]}
    assert by_center["dc-b"]["tokens_per_joule"] == pytest.approx(25 / 500)


def test_mixed_energy_sources_are_labelled_mixed():
    snapshots = _snapshots(_linear_counter("a", 300, center="dc-a", source="nvml"),
                           _linear_counter("b", 100, center="dc-b", source="modeled"))
    window = steady_window([(2.0, 9.0), (2.5, 9.0)], concurrency=2)
    result = energy_over_window(snapshots, window, _steady_records(), model="m")
    assert result["energy_source"] == "mixed"
    assert "mixed" in result["energy_note"]
    assert result["tokens_per_joule"] is not None


def test_no_energy_counters_means_unavailable_not_zero():
    snapshots = _snapshots(_linear_counter("a", 300, center="dc-a", source=None))
    result = energy_over_window(snapshots, steady_window([(1.0, 5.0), (2.0, 6.0)], 2), _steady_records(), model="m")
    assert result["energy_source"] == "unavailable"
    assert result["tokens_per_joule"] is None and result["energy_joules"] is None


def test_a_worker_without_a_counter_withholds_the_fleet_figure():
    snapshots = _snapshots(_linear_counter("a", 300, center="dc-a"), _linear_counter("b", 0, center="dc-b", source=None))
    result = energy_over_window(snapshots, steady_window([(1.0, 9.0), (2.0, 9.0)], 2), _steady_records(), model="m")
    assert result["tokens_per_joule"] is None
    assert result["energy_workers_without_counter"] == ["b"]
    assert [w["worker"] for w in result["energy_by_worker"]] == ["a"]


def test_a_window_with_few_counter_updates_is_flagged_rough():
    # Counters that step once a second (heartbeats) seen over a 2 s window.
    stepped = [(t / 10, WorkerReading("a", 1000.0 + 300 * math.floor(t / 10), "modeled", "dc-a", "h100", "m"))
               for t in range(0, 60)]
    result = energy_over_window(_snapshots(stepped), steady_window([(2.0, 4.0), (2.1, 4.1), (2.2, 4.2)], 3),
                                _steady_records(), model="m")
    assert "rough" in result["energy_note"]
    assert result["energy_by_worker"][0]["counter_updates_in_window"] < 5


def test_a_window_shorter_than_a_heartbeat_gives_no_energy_rather_than_zero():
    # Counters that step once a second, and a steady window between two steps.
    stepped = [(t / 10, WorkerReading(w, 1000.0 + 300 * math.floor(t / 10), "modeled", c, "h100", "m"))
               for t in range(0, 60) for w, c in (("a", "dc-a"), ("b", "dc-b"))]
    result = energy_over_window(_snapshots(stepped), steady_window([(2.1, 2.6), (2.2, 2.7), (2.3, 2.8)], 3),
                                _steady_records(), model="m")
    assert result["energy_joules"] is None and result["avg_power_w"] is None and result["tokens_per_joule"] is None
    assert all(w["energy_joules"] is None for w in result["energy_by_worker"])
    assert all(c["energy_joules"] is None for c in result["energy_by_center"])
    assert "did not change" in result["energy_note"] and result["energy_source"] == "modeled"


def test_workers_of_other_models_are_left_out():
    snapshots = _snapshots(_linear_counter("a", 300, center="dc-a"),
                           _linear_counter("z", 900, center="dc-a", model="other"))
    window = steady_window([(1.0, 9.0), (2.0, 9.0)], 2)
    result = energy_over_window(snapshots, window, _steady_records(), model="m")
    assert result["avg_power_w"] == pytest.approx(300)


def test_prometheus_energy_counters_are_read_with_their_source():
    text = (
        "# TYPE idlegrid_sim_energy_joules counter\n"
        'idlegrid_sim_energy_joules_total{gpu="h100",model="m"} 1234.5\n'
        "# TYPE DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION counter\n"
        'DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION{gpu="0",modelName="NVIDIA H100"} 5000\n'
    )
    readings = {r.energy_source: r for r in parse_prometheus_energy(text, default_id="host:1")}
    assert readings["modeled"].energy_j == 1234.5 and readings["modeled"].model == "m"
    assert readings["nvml"].energy_j == pytest.approx(5.0)  # millijoules


# --- arrivals ----------------------------------------------------------------


def _gaps(offsets: list[float]) -> list[float]:
    return [b - a for a, b in zip(offsets, offsets[1:])]


@pytest.mark.parametrize("burstiness", [0.25, 1.0, 4.0])
def test_arrivals_keep_the_mean_rate_and_burstiness(burstiness):
    offsets = arrival_offsets(20_000, rate=8.0, burstiness=burstiness, seed=3)
    gaps = _gaps(offsets)
    assert len(offsets) / offsets[-1] == pytest.approx(8.0, rel=0.05)
    cv = statistics.pstdev(gaps) / statistics.fmean(gaps)
    assert cv == pytest.approx(1 / math.sqrt(burstiness), rel=0.1)  # gamma shape k: CV = 1/sqrt(k)


def test_arrivals_are_repeatable_with_a_seed():
    assert arrival_offsets(50, 2.0, 1.0, seed=7) == arrival_offsets(50, 2.0, 1.0, seed=7)
    assert arrival_offsets(50, 2.0, 1.0, seed=7) != arrival_offsets(50, 2.0, 1.0, seed=8)


def test_infinite_rate_sends_everything_at_once_and_infinite_burstiness_is_even():
    assert arrival_offsets(5, math.inf) == [0.0] * 5
    assert _gaps(arrival_offsets(5, 4.0, burstiness=math.inf)) == [0.25] * 4


# --- workloads ---------------------------------------------------------------


def test_r1_workload_has_long_capped_reasoning_outputs():
    requests = build_requests("r1", 1500, seed=1)
    outputs = [r.output_len for r in requests]
    assert 4_000 <= statistics.fmean(outputs) <= 8_000  # thousands of tokens on average
    assert max(outputs) <= R1_OUTPUT_CAP and min(outputs) >= 256
    assert statistics.fmean(r.input_len for r in requests) < 400  # short problems
    assert "\\boxed{}" in requests[0].messages[0]["content"]


def test_chat_workload_matches_sharegpt_means():
    requests = build_requests("chat", 1500, seed=1)
    assert statistics.fmean(r.input_len for r in requests) == pytest.approx(161, rel=0.15)
    assert statistics.fmean(r.output_len for r in requests) == pytest.approx(338, rel=0.15)


def test_fixed_workload_has_exact_lengths_and_seeded_prompts():
    a = build_requests("fixed", 4, seed=5, input_len=64, output_len=32)
    assert {r.output_len for r in a} == {32}
    assert all(len(r.messages[0]["content"].split()) == 64 for r in a)
    assert len({r.messages[0]["content"] for r in a}) == 4  # no shared prompts, so no prefix-cache hits
    assert a[0].messages == build_requests("fixed", 4, seed=5, input_len=64, output_len=32)[0].messages
    assert a[0].messages != build_requests("fixed", 4, seed=6, input_len=64, output_len=32)[0].messages
    with pytest.raises(WorkloadError):
        build_requests("fixed", 4, seed=5)


def test_sweep_levels_get_the_same_lengths_with_fresh_text():
    first = build_requests("r1", 20, seed=3)
    later = build_requests("r1", 20, seed=3, text_seed="3/level1")
    assert [(r.input_len, r.output_len) for r in first] == [(r.input_len, r.output_len) for r in later]
    assert all(a.messages != b.messages for a, b in zip(first, later))  # no prefix-cache hits across levels


def test_jsonl_workload_reads_messages_prompts_and_extra_fields(tmp_path):
    path = tmp_path / "requests.jsonl"
    path.write_text(
        json.dumps({"messages": [{"role": "user", "content": "hello there"}], "max_tokens": 12, "temperature": 0.6}) + "\n"
        + "\n"
        + json.dumps({"prompt": "one two three", "output_len": 5}) + "\n"
    )
    requests = jsonl_requests(path, 3, default_output_len=99)
    assert [r.output_len for r in requests] == [12, 5, 12]  # cycled
    assert requests[0].extra_body == {"temperature": 0.6}
    assert requests[1].messages == [{"role": "user", "content": "one two three"}]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"nothing": 1}\n')
    with pytest.raises(WorkloadError, match="bad.jsonl:1"):
        jsonl_requests(bad, 1, 10)


# --- flags -------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="idlegrid bench")
    cli.add_arguments(parser)
    return parser


def _run(argv: list[str]) -> int:
    return cli.run(_parser().parse_args(argv))


BASE = ["--base-url", "http://127.0.0.1:9", "--model", "m", "--num-requests", "2"]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--workload", "fixed", "--rate", "1"], "--input-len and --output-len"),
        (["--workload", "chat", "--rate", "fast"], "not a number"),
        (["--workload", "chat", "--rate", "1", "--slo", "ttft=5"], "KEY=MS"),
        (["--workload", "chat", "--concurrency", "0"], "at least 1"),
        (["--workload", "jsonl", "--rate", "1"], "--jsonl FILE"),
        (["--workload", "chat", "--rate", "1", "--energy-from", "ftp://x"], "--energy-from"),
        (["--workload", "chat", "--rate", "1", "--energy-from", "http://gw:8000", "--admin-token", ""], "admin token"),
    ],
)
def test_bad_flags_give_one_clear_line_and_exit_2(extra, message, tmp_path, capsys):
    assert _run(BASE + extra + ["--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("idlegrid bench: error:") and message in err
    assert len(err.splitlines()) == 1


def test_rate_and_concurrency_are_exclusive(tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        _parser().parse_args(BASE + ["--workload", "chat", "--rate", "1", "--concurrency", "2", "--out", str(tmp_path)])
    assert exit_info.value.code == 2


def test_an_unreachable_endpoint_is_one_line_and_exit_1(tmp_path, capsys):
    assert _run(BASE + ["--workload", "chat", "--rate", "1", "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("idlegrid bench: error: cannot reach http://127.0.0.1:9")
    assert len(err.splitlines()) == 1


# --- live runs -----------------------------------------------------------------
#
# Real HTTP on loopback: a simulated engine served by uvicorn in a thread, and a
# real gateway with two real worker agents (subprocesses) in two centers.


SIM_MODEL = "deepseek-r1-distill-qwen-1.5b"
SIM_GPU = "l40s"  # ~6 ms per decode step at time scale 1: streams long enough to measure
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def sim_engine():
    with EnginesInThread([SimEngine(gpu=SIM_GPU, model=SIM_MODEL, time_scale=1, max_model_len=4096)]) as fleet:
        yield fleet.urls[0]


@pytest.fixture(scope="module")
def idlegrid_fleet(tmp_path_factory):
    """A gateway over a real Redis with two simulated workers in two centers, as `idlegrid up` runs them."""
    redis = EmbeddedRedis(tmp_path_factory.mktemp("redis")).start()
    server, handle = start_gateway(redis.url, queue_timeout_s=10.0)
    try:
        for center in ("dc-a", "dc-b"):
            handle.start_sim_worker(center, gpu=SIM_GPU, model=SIM_MODEL, time_scale=1.0,
                                    extra=["--heartbeat-interval", "0.2"])
        handle.wait_ready(2)
        yield handle
    finally:
        handle.stop_agents()
        server.stop()
        redis.stop()


def _results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def test_live_run_against_a_simulated_engine(sim_engine, tmp_path):
    out = tmp_path / "direct"
    status = _run([
        "--base-url", sim_engine + "/v1", "--model", SIM_MODEL, "--workload", "fixed",
        "--input-len", "32", "--output-len", "64", "--num-requests", "16", "--concurrency", "4",
        "--slo", "ttft_ms=5000,tpot_ms=500", "--energy-from", sim_engine + "/metrics",
        "--energy-interval", "0.1", "--out", str(out),
    ])
    assert status == 0
    results = _results(out)
    # Straight from the engine, text arrives in vLLM's `delta.reasoning`: it counts as tokens.
    assert (results["completed"], results["failed"]) == (16, 0)
    assert results["total_output_tokens"] == 16 * 64  # ignore_eos + max_tokens fixed the lengths
    assert results["request_goodput"] == pytest.approx(results["request_throughput"])
    assert 0 < results["median_ttft_ms"] <= results["p99_ttft_ms"]
    assert results["served_model"]["simulated"] is True

    # TPOT can be no faster than the engine's own step clock (about 6 ms per step on an L40S).
    info = httpx.get(sim_engine + "/v1/sim/info").json()
    assert results["mean_tpot_ms"] >= 0.8 * info["tpot_base_ms"]
    # One token per chunk, so the two agree (loosely: a busy 2-core machine jitters the gaps).
    assert results["mean_tpot_ms"] == pytest.approx(results["mean_itl_ms"], rel=0.25)

    # Energy: the engine's modeled counter over the steady window, at a power the GPU can draw.
    assert results["steady_window"]["kind"] == "steady" and results["steady_window"]["steady_level"] == 4
    assert results["energy_source"] == "modeled"
    gpu = get_gpu(SIM_GPU)
    assert gpu.idle_w * 0.9 <= results["avg_power_w"] <= gpu.max_w * 1.1
    assert results["tokens_per_joule"] == pytest.approx(results["steady_output_throughput"] / results["avg_power_w"], rel=1e-6)

    first = json.loads((out / "requests.jsonl").read_text().splitlines()[0])
    assert len(first["itl_ms"]) == 63 and first["ttft_ms"] > 0 and first["output_tokens_from"] == "usage"
    report = check_bench_outputs(out, results)
    assert "Simulated engine" in report and "modeled" in report


def test_live_sweep_gives_one_entry_and_point_per_rate(sim_engine, tmp_path):
    out = tmp_path / "sweep"
    status = _run([
        "--base-url", sim_engine, "--model", SIM_MODEL, "--workload", "fixed", "--input-len", "16",
        "--output-len", "32", "--num-requests", "8", "--rates", "20,80", "--burstiness", "0.5",
        "--energy-from", sim_engine + "/metrics", "--energy-interval", "0.05", "--out", str(out),
    ])
    assert status == 0
    results = _results(out)
    assert [(r["request_rate"], r["burstiness"]) for r in results["runs"]] == [(20, 0.5), (80, 0.5)]
    assert all((r["completed"], r["total_output_tokens"]) == (8, 8 * 32) for r in results["runs"])
    assert "completed" not in results  # a sweep has no single run to copy to the top level
    sent = [json.loads(line) for line in (out / "requests.jsonl").read_text().splitlines()]
    assert sorted({line["run"] for line in sent}) == [0, 1]
    check_bench_outputs(out, results)
    assert {"throughput_vs_load.png", "tokens_per_joule_vs_load.png"} <= {p.name for p in out.glob("*.png")}


def test_live_run_through_the_gateway_with_energy_per_center(idlegrid_fleet, tmp_path):
    fleet = idlegrid_fleet
    out = tmp_path / "gateway"
    status = _run([
        "--base-url", fleet.url + "/v1", "--api-key", fleet.api_key, "--model", SIM_MODEL,
        "--workload", "fixed", "--input-len", "32", "--output-len", "128", "--num-requests", "24",
        "--concurrency", "8", "--energy-from", fleet.url, "--admin-token", fleet.admin_token,
        "--energy-interval", "0.1", "--out", str(out),
    ])
    assert status == 0
    results = _results(out)
    # Through the gateway, reasoning arrives as `delta.reasoning_content`; it counts as tokens.
    assert (results["completed"], results["failed"]) == (24, 0)
    assert results["total_output_tokens"] == 24 * 128
    assert results["energy_source"] == "modeled"
    centers = {c["center"]: c for c in results["energy_by_center"]}
    assert set(centers) == {"dc-a", "dc-b"}
    assert sum(c["energy_joules"] for c in centers.values()) == pytest.approx(results["energy_joules"])
    assert results["tokens_per_joule"] > 0
    gpu = get_gpu(SIM_GPU)  # two GPUs; heartbeats make the edges of the window coarse, hence the slack
    assert 2 * gpu.idle_w * 0.5 <= results["avg_power_w"] <= 2 * gpu.max_w * 1.5
    report = check_bench_outputs(out, results)
    assert "energy_by_center.png" in report and "| dc-a |" in report and "| dc-b |" in report

    # The same counters, read straight from the fleet's Redis.
    async def read():
        reader = RedisWorkers(fleet.redis_url)
        try:
            return await reader.read()
        finally:
            await reader.close()

    readings = asyncio.run(read())
    assert {r.center for r in readings} == {"dc-a", "dc-b"}
    assert all(r.energy_j > 0 and r.energy_source == "modeled" for r in readings)


def test_a_wrong_key_or_admin_token_stops_before_sending(idlegrid_fleet, tmp_path, capsys):
    fleet = idlegrid_fleet
    common = ["--base-url", fleet.url + "/v1", "--model", SIM_MODEL, "--workload", "chat",
              "--num-requests", "2", "--rate", "1", "--out", str(tmp_path / "x")]
    assert _run(common + ["--api-key", "sk-wrong"]) == 1
    assert "refused the API key (HTTP 401)" in capsys.readouterr().err
    assert _run(common + ["--api-key", fleet.api_key, "--energy-from", fleet.url, "--admin-token", "wrong"]) == 1
    assert "cannot read energy counters" in capsys.readouterr().err
    assert not (tmp_path / "x" / "results.json").exists()


def test_requests_the_engine_rejects_are_failures_by_kind(sim_engine, tmp_path, capsys):
    out = tmp_path / "rejected"
    # A 6,000-token prompt does not fit the engine's 4,096-token context: vLLM answers 400.
    status = _run(["--base-url", sim_engine, "--model", SIM_MODEL, "--workload", "fixed", "--input-len", "6000",
                   "--output-len", "8", "--num-requests", "3", "--rate", "inf", "--out", str(out)])
    assert status == 1
    assert "every request failed (http_400: 3)" in capsys.readouterr().err
    results = _results(out)
    assert (results["completed"], results["failed"], results["failures"]) == (0, 3, {"http_400": 3})
    assert results["mean_ttft_ms"] is None
    first = json.loads((out / "requests.jsonl").read_text().splitlines()[0])
    assert first["error_kind"] == "http_400"
    assert first["error"].startswith("This model's maximum context length is 4096 tokens")  # the engine's message


def _requests_running(engine_url: str) -> float:
    for family in text_string_to_metric_families(httpx.get(engine_url + "/metrics").text):
        if family.name == "vllm:num_requests_running":
            return sum(sample.value for sample in family.samples)
    return 0.0


def test_ctrl_c_writes_what_was_measured(sim_engine, tmp_path):
    out = tmp_path / "interrupted"
    bench = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.cli", "--base-url", sim_engine, "--model", SIM_MODEL,
         "--workload", "fixed", "--input-len", "16", "--output-len", "3000", "--num-requests", "40",
         "--rate", "20", "--out", str(out)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 20
        while _requests_running(sim_engine) == 0:  # Ctrl-C once the engine is busy with the bench's requests
            assert bench.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        bench.send_signal(signal.SIGINT)
        _, err = bench.communicate(timeout=20)
    finally:
        if bench.poll() is None:
            os.kill(bench.pid, signal.SIGKILL)
    assert bench.returncode == 130, err
    results = _results(out)
    assert results["interrupted"] is True
    assert results["unfinished"] > 0 and results["failed"] == 0  # cut-off requests are not failures
    assert results["energy_source"] == "unavailable" and results["tokens_per_joule"] is None
    report = check_bench_outputs(out, results)
    assert "Interrupted" in report and "unavailable" in report
