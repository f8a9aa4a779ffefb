"""`idlegrid up`: one command gives a working endpoint over a simulated fleet,
and Ctrl-C/SIGTERM leaves nothing behind."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
import redis
import redis.asyncio

from gateway import keys
from gateway.embedded_redis import EmbeddedRedis, free_port
from gateway.fleet import Worker
from gateway.registry import Registry
from gateway.fleet_file import FleetFileError, parse_fleet
from tests.bench_files import check_bench_outputs


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for our purposes.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


async def _register(redis_url: str, worker: Worker) -> None:
    client = redis.asyncio.Redis.from_url(redis_url)
    await Registry(client).register(worker)
    await client.aclose()


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_up_serves_openai_sdk_and_stops_cleanly(tmp_path, stop_signal):
    port = free_port()
    # A previous run on this state dir was killed hard: its worker never deregistered.
    previous = EmbeddedRedis(tmp_path / "state" / "redis").start()
    asyncio.run(_register(previous.url, Worker(id="killed-1", center="dc-a", model="deepseek-r1-distill-qwen-1.5b",
                                               engine_url="http://127.0.0.1:9", state="ready")))
    previous.stop()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "up", "--port", str(port), "--state-dir", str(tmp_path / "state"), "--time-scale", "20"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    out: list[str] = []
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            out.append(line)
            if line.startswith("fleet ready"):
                break
        text = "".join(out)
        assert "fleet ready: 3/3" in text, text
        base_url = re.search(r"OpenAI base URL: (\S+)", text).group(1)
        api_key = re.search(r"API key:\s+(\S+)", text).group(1)
        admin_token = re.search(r"Admin token:\s+(\S+)", text).group(1)
        assert "SIMULATED" in text, "a simulated fleet says so"
        assert "HTTP Request" not in text, "no line per request the gateway makes (qualifying workers makes dozens)"

        client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0)
        reply = client.chat.completions.create(model="deepseek-r1-distill-qwen-1.5b", messages=[{"role": "user", "content": "hello"}], max_tokens=20)
        assert reply.usage.completion_tokens > 0
        workers = httpx.get(base_url.removesuffix("/v1") + "/admin/workers", headers={"Authorization": f"Bearer {admin_token}"}).json()["workers"]
        assert len(workers) == 3 and {w["center"] for w in workers} == {"dc-a", "dc-b"}, "this run's workers only"
        engine_pids = [w["engine_pid"] for w in workers]
        redis_url = re.search(r"Redis:\s+(\S+)", text).group(1)
    finally:
        proc.send_signal(stop_signal)
        rc = proc.wait(60)
    assert rc == 0
    # The gateway outlived its workers' drain: each deregistered, so the private
    # Redis, reopened by the next `up` on this state dir, holds no stale workers.
    reopened = EmbeddedRedis(tmp_path / "state" / "redis").start()
    try:
        assert redis.Redis.from_url(reopened.url).smembers(keys.WORKERS) == set()
    finally:
        reopened.stop()
    # Nothing left behind: engines, agents (children of up) and the private Redis.
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in engine_pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(p) for p in engine_pids)
    redis_port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{redis_port}", timeout=1)
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)


@contextlib.contextmanager
def up_with_one_worker(tmp_path):
    """`idlegrid up` over one simulated worker, ready to serve, and what it printed;
    killed at the end if it still runs."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "up", "--port", str(free_port()), "--state-dir", str(tmp_path / "state"), "--workers", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    out: list[str] = []
    try:
        while not out or not out[-1].startswith("fleet ready"):
            line = proc.stdout.readline()
            assert line, "".join(out)
            out.append(line)
        text = "".join(out)
        printed = {name: re.search(rf"{label}:\s+(\S+)", text).group(1) for name, label in (
            ("base_url", "OpenAI base URL"), ("api_key", "API key"), ("admin_token", "Admin token"), ("redis_url", "Redis"))}
        yield proc, printed
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_second_ctrl_c_stops_at_once_though_an_answer_is_in_flight(tmp_path):
    with up_with_one_worker(tmp_path) as (proc, printed):
        client = openai.OpenAI(base_url=printed["base_url"], api_key=printed["api_key"], max_retries=0)
        stream = client.chat.completions.create(model="deepseek-r1-distill-qwen-1.5b", messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=30000, stream=True, extra_body={"ignore_eos": True})
        next(iter(stream))  # a long answer is under way

        proc.send_signal(signal.SIGINT)
        stopping = next(line for line in iter(proc.stdout.readline, "") if line.startswith("idlegrid: stopping"))
        assert "Ctrl-C again to stop at once" in stopping
        time.sleep(1)
        assert proc.poll() is None, "the first Ctrl-C lets the worker finish the answer"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(5) == 0, "the second one does not wait for it"


def test_bench_against_up_gives_results_plots_and_a_report(tmp_path):
    """What an operator runs: `idlegrid up`, then `idlegrid bench` at the URL, key
    and admin token it printed."""
    out = tmp_path / "bench"
    with up_with_one_worker(tmp_path) as (proc, printed):
        bench = subprocess.run(
            [sys.executable, "-m", "gateway.cli", "bench", "--base-url", printed["base_url"], "--api-key", printed["api_key"],
             "--model", "deepseek-r1-distill-qwen-1.5b", "--workload", "fixed", "--input-len", "32", "--output-len", "48",
             "--num-requests", "24", "--rate", "6", "--slo", "ttft_ms=5000,tpot_ms=500",
             "--energy-from", printed["base_url"].removesuffix("/v1"), "--admin-token", printed["admin_token"],
             "--energy-interval", "0.1", "--out", str(out)],
            capture_output=True, text=True, timeout=120,
        )
        proc.send_signal(signal.SIGINT)  # a clean stop takes the private Redis down with it
        assert proc.wait(60) == 0
    assert bench.returncode == 0, bench.stdout + bench.stderr
    results = json.loads((out / "results.json").read_text())
    assert (results["completed"], results["failed"], results["total_output_tokens"]) == (24, 0, 24 * 48)
    assert results["request_goodput"] == pytest.approx(results["request_throughput"])
    assert 0 < results["median_ttft_ms"] <= results["p99_ttft_ms"] and results["mean_tpot_ms"] > 0
    # Four seconds of sends span several heartbeats, each carrying the worker's energy counter.
    assert results["energy_source"] == "modeled" and results["energy_joules"] > 0 and results["tokens_per_joule"] > 0
    check_bench_outputs(out, results)


def test_workers_stop_with_up_even_when_it_is_killed_outright(tmp_path):
    with up_with_one_worker(tmp_path) as (proc, printed):
        try:
            gateway = printed["base_url"].removesuffix("/v1")
            (worker,) = httpx.get(gateway + "/admin/workers", headers={"Authorization": f"Bearer {printed['admin_token']}"}).json()["workers"]
            agents = [int(pid) for pid in os.listdir("/proc") if pid.isdigit() and _parent(int(pid)) == proc.pid
                      and b"worker" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")]
            assert len(agents) == 1 and _alive(worker["engine_pid"])
            proc.kill()  # no signal to pass on: SIGKILL, an OOM kill, a crash
            proc.wait()
            deadline = time.monotonic() + 15
            while (_alive(agents[0]) or _alive(worker["engine_pid"])) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert not _alive(agents[0]) and not _alive(worker["engine_pid"]), "the worker and its engine (its GPU) are let go"
        finally:
            with contextlib.suppress(redis.RedisError):
                redis.Redis.from_url(printed["redis_url"]).shutdown(nosave=True)  # left running; the next `up` here would stop it


def _parent(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def test_up_refuses_bad_flags_in_one_line(tmp_path):
    for args, needle in [
        (["--gpu", "h999"], "h999"),
        (["--workers", "0"], "--workers"),
        (["--fleet", str(tmp_path / "missing.toml")], "not found"),
    ]:
        r = subprocess.run([sys.executable, "-m", "gateway.cli", "up", "--state-dir", str(tmp_path / "s"), *args], capture_output=True, text=True, timeout=60)
        assert r.returncode == 2, r.stderr
        assert needle in r.stderr
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "fleet, needle",
    [
        ({"workers": [{"center": "a", "gpu": "h100", "model": "deepseek-r1-distill-qwen-7b", "count": 0}]}, "workers[0].count"),
        ({"workers": [{"center": "a", "gpu": "h100", "model": "deepseek-r1-distill-qwen-7b"}, {"center": "b", "gpu": "v100", "model": "deepseek-r1-distill-qwen-7b"}]}, "workers[1].gpu"),
        ({"workers": [{"gpu": "h100", "model": "deepseek-r1-distill-qwen-7b"}]}, "workers[0].center"),
        ({"workers": [{"center": "a", "gpu": "h100", "model": "llama-9000"}]}, "workers[0].model"),
        ({"workers": [{"center": "a", "gpu": "h100", "model": "deepseek-r1-distill-qwen-7b", "cuont": 2}]}, "'cuont'"),
        ({"workers": [{"center": "a", "gpu": "h100", "model": "deepseek-r1-distill-qwen-7b"}], "centers": {"a": {"b": -3}}}, "centers.a.b"),
        ({}, "[[workers]]"),
    ],
)
def test_fleet_file_errors_name_the_bad_entry(fleet, needle):
    with pytest.raises(FleetFileError) as err:
        parse_fleet(fleet, "fleet.toml")
    assert needle in str(err.value)


def test_fleet_file_with_centers(tmp_path):
    path = tmp_path / "fleet.toml"
    path.write_text(
        '[[workers]]\ncenter = "east"\ngpu = "h100"\nmodel = "deepseek-r1-distill-qwen-7b"\ncount = 4\n\n'
        '[[workers]]\ncenter = "west"\ngpu = "h20"\nmodel = "deepseek-r1-distill-qwen-7b"\ncount = 8\n\n'
        '[centers.east]\nwest = 35\n'
    )
    from gateway.fleet_file import load_fleet

    fleet = load_fleet(path)
    assert fleet.size == 12 and fleet.centers == ["east", "west"]
    assert fleet.rtt("west", "east") == 35 and fleet.rtt("east", "east") == 0


def test_the_port_of_a_gateway_stopped_a_moment_ago_counts_as_free():
    """`up` checks its port before starting anything. A gateway that just stopped
    leaves its connections in TIME_WAIT for a minute; uvicorn binds over them, so
    the check must too (it said 'already in use' to an immediate restart)."""
    from gateway.up import _port_free

    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as asyncio's servers do
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    assert not _port_free("127.0.0.1", port), "a port something listens on is busy"
    client = socket.create_connection(("127.0.0.1", port))
    served, _ = listener.accept()
    served.close()  # the server side closes first: its end of the connection stays in TIME_WAIT
    time.sleep(0.1)
    client.close()
    listener.close()
    time.sleep(0.1)
    assert _port_free("127.0.0.1", port)
