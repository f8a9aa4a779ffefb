"""Reclaim benchmark (issue 4): how fast a borrowed GPU is given back and taken up again,
and what a reclaim storm costs the requests in flight.

    python -m benchmarks.reclaim [--quick] [--out DIR]

1. Reclaim timings: real `idlegrid gateway` + Redis + `idlegrid worker --engine sim`
   agents, each watching a `--reclaim-file`. Creating the file is the reclaim signal;
   the agent reports `reclaim_seconds` (signal seen -> GPU freed) and, once the file
   is removed, `wake_seconds` (wake begun -> serving) in `GET /admin/workers`. We also
   time from our own touch / unlink to the state change the admin API shows, which adds
   the agent's polling (`--reclaim-interval`) and `--wake-after` wait.
2. Reclaim storm: R1-style open-loop load through the gateway while ~30% of the fleet
   is reclaimed and returned every `--period` seconds; then the same load and the same
   pause/resume times against vllm-router pointed at separate sim engines (the router
   knows nothing about reclaim, so the script pauses engines with `/pause?mode=abort`
   and `/resume`s them directly).

Everything here is simulated engines (deterministic, time-scaled); no GPU memory is
really freed, so reclaim times are the control path's, not a GPU driver's.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks.metrics import summarize
from benchmarks.policy_compare import _first_line, _stop, _wait_http, r1_requests, vllm_router_binary
from benchmarks.runner import LoadLevel, Target, run_level
from benchmarks.workloads import LogNormal
from gateway.embedded_redis import EmbeddedRedis, free_port

ROOT = Path(__file__).resolve().parent
DEFAULT_OUT = ROOT / "results" / "reclaim"
MODEL = "deepseek-r1-distill-qwen-1.5b"
GPU = "h100"
SEED = 7
ADMIN = "adm-reclaim-bench"
FAST_RECLAIM = ["--reclaim-interval", "0.3", "--wake-after", "1"]


def _cli() -> list[str]:
    return [sys.executable, "-m", "gateway.cli", "--log-level", "INFO"]


class Fleet:
    """One gateway on one Redis, and `n` sim workers each with its own reclaim file."""

    def __init__(self, n: int, time_scale: float, work: Path):
        self.n, self.time_scale, self.work = n, time_scale, work
        self.redis = EmbeddedRedis(work / "redis")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.procs: list[subprocess.Popen] = []
        self.files = [work / f"reclaim-{i}" for i in range(n)]
        self.ids: list[str] = []  # worker id per reclaim file
        self.api_key = ""
        self.admin = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=10)

    def start(self) -> None:
        self.redis.start()
        log = open(self.work / "gateway.log", "ab")
        self.procs.append(subprocess.Popen(
            [*_cli(), "gateway", "--redis", self.redis.url, "--host", "127.0.0.1", "--port", str(self.port),
             "--center", "dc-a", "--admin-token", ADMIN], stdout=log, stderr=log, start_new_session=True))
        asyncio.run(_wait_http(f"{self.url}/health", 30, self.procs[0], "gateway"))
        self.api_key = self.admin.post("/admin/keys", json={"name": "bench"}).json()["key"]
        for i, file in enumerate(self.files):
            token = self.admin.post("/admin/enroll-tokens", json={"center": "dc-a", "uses": 1, "ttl_s": 600}).json()["token"]
            log = open(self.work / f"agent-{i}.log", "wb")
            self.procs.append(subprocess.Popen(
                [*_cli(), "worker", "--gateway", self.url, "--token", token, "--center", "dc-a", "--engine", "sim",
                 "--gpu", GPU, "--model", MODEL, "--seed", str(SEED), "--time-scale", str(self.time_scale),
                 "--drain-timeout", "5", "--reclaim-file", str(file), *FAST_RECLAIM],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        import re

        deadline = time.monotonic() + 60
        for i in range(self.n):
            while not (m := re.search(r"enrolled as worker (\S+)", (self.work / f"agent-{i}.log").read_text())):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"agent {i} did not enroll (see {self.work}/agent-{i}.log)")
                time.sleep(0.1)
            self.ids.append(m.group(1))
        self.wait_ready(self.n, 90)

    def workers(self) -> dict[str, dict]:
        return {w["id"]: w for w in self.admin.get("/admin/workers").json()["workers"]}

    def wait_ready(self, n: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            workers = self.workers()
            if sum(w["state"] == "ready" for w in workers.values()) >= n:
                return
            for w in workers.values():  # time-scaled engines may be flagged slow by the wall-clock probe
                if w.get("flagged"):
                    self.admin.post(f"/admin/workers/{w['id']}/clear")
            time.sleep(0.2)
        raise RuntimeError(f"only some workers ready: {[(w['id'], w['state']) for w in self.workers().values()]}")

    def wait_state(self, worker_id: str, state: str, timeout: float = 20) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            w = self.workers().get(worker_id, {})
            if w.get("state") == state:
                return w
            time.sleep(0.02)
        raise RuntimeError(f"worker {worker_id} not {state} within {timeout}s")

    def stop(self) -> None:
        for p in reversed(self.procs):
            _stop(p, 15)
        self.redis.stop()


def reclaim_cycles(fleet: Fleet, cycles: int) -> dict:
    """Reclaim and return workers one at a time, idle, reading the agents' own timings."""
    rows = []
    for c in range(cycles):
        i = c % fleet.n
        wid = fleet.ids[i]
        touched = time.monotonic()
        fleet.files[i].touch()
        w = fleet.wait_state(wid, "sleeping")
        seen_sleeping = time.monotonic() - touched
        removed = time.monotonic()
        fleet.files[i].unlink()
        w2 = fleet.wait_state(wid, "ready")
        seen_ready = time.monotonic() - removed
        rows.append({"cycle": c, "worker": wid, "reclaim_seconds": w.get("reclaim_seconds"),
                     "wake_seconds": w2.get("wake_seconds"), "touch_to_sleeping_s": round(seen_sleeping, 3),
                     "unlink_to_ready_s": round(seen_ready, 3)})
        print(f"  cycle {c}: {rows[-1]}", flush=True)
    med = lambda k: statistics.median(r[k] for r in rows if r[k] is not None)
    return {"cycles": rows, "median_reclaim_seconds": med("reclaim_seconds"), "median_wake_seconds": med("wake_seconds"),
            "median_touch_to_sleeping_s": med("touch_to_sleeping_s"), "median_unlink_to_ready_s": med("unlink_to_ready_s")}


def storm_schedule(n: int, duration: float, period: float, share: float, seed: int) -> list[tuple[float, str, list[int]]]:
    """(time, 'reclaim'|'return', worker indexes): every `period` s a fresh ~`share` of the
    fleet is reclaimed, and returned half a period later."""
    rng, k, events, t = random.Random(seed), max(1, round(n * share)), [], period / 4
    while t < duration:
        chosen = rng.sample(range(n), k)
        events += [(t, "reclaim", chosen), (t + period / 2, "return", chosen)]
        t += period
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
    summary = summarize(result.records, result.duration_s, slo)
    keep = ("completed", "failed", "duration", "request_throughput", "request_goodput", "output_throughput",
            "median_ttft_ms", "p99_ttft_ms", "median_tpot_ms", "p99_tpot_ms")
    return {**{k: summary.get(k) for k in keep}, **lost(result.records), "sent": len(result.records)}


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

        return asyncio.run(run_storm(f"http://127.0.0.1:{port}", "", requests, rate, events, act, slo))
    finally:
        _stop(router)
        _stop(engines)


def plot(results: dict, out: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    rows = results["timings"]["cycles"]
    x = range(len(rows))
    a.plot(x, [r["reclaim_seconds"] for r in rows], "o-", label="reclaim_seconds (agent)")
    a.plot(x, [r["wake_seconds"] for r in rows], "s-", label="wake_seconds (agent)")
    a.plot(x, [r["touch_to_sleeping_s"] for r in rows], "o:", label="file created -> sleeping (admin API)")
    a.plot(x, [r["unlink_to_ready_s"] for r in rows], "s:", label="file removed -> ready (admin API)")
    a.set_xlabel("cycle"); a.set_ylabel("seconds"); a.set_title("sim worker reclaim / wake"); a.legend(fontsize=7)
    names = [k for k in ("idlegrid", "vllm-router") if "completed" in results["storm"].get(k, {})]
    vals = [results["storm"][k] for k in names]
    w = 0.25
    for j, (key, label) in enumerate((("completed", "completed"), ("requests_with_tokens_lost", "lost tokens / failed"),
                                      ("failed", "failed"))):
        b.bar([i + j * w for i in range(len(names))], [v[key] for v in vals], w, label=label)
    b.set_xticks([i + w for i in range(len(names))], names); b.set_title("reclaim storm (simulated)"); b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "reclaim.png", dpi=110)
    return "reclaim.png"


def readme(r: dict) -> str:
    t, s, cfg = r["timings"], r["storm"], r["config"]
    lines = [
        "# Reclaim benchmark (issue 4) — simulated engines",
        "",
        f"Run: `python -m benchmarks.reclaim{' --quick' if cfg['quick'] else ''}` on {cfg['when']}. "
        f"Everything below is **simulated** (`idlegrid worker --engine sim`, time scale {cfg['time_scale']}, seed {SEED}); "
        "a sim engine frees no real GPU memory, so reclaim times are idlegrid's control path "
        "(drain heartbeat, hand-over, engine `/sleep`), not a GPU driver's.",
        "",
        "## 1. Reclaim and wake timings",
        "",
        f"A real gateway + Redis + {cfg['workers']} sim worker agents with `--reclaim-file` "
        f"(`{' '.join(FAST_RECLAIM)}`), idle; {len(t['cycles'])} cycles, one worker at a time.",
        "",
        "| median | seconds |", "|---|---|",
        f"| `reclaim_seconds` (agent: signal seen → GPU freed) | {t['median_reclaim_seconds']:.3f} |",
        f"| `wake_seconds` (agent: wake begun → serving) | {t['median_wake_seconds']:.3f} |",
        f"| reclaim file created → `sleeping` in `GET /admin/workers` | {t['median_touch_to_sleeping_s']:.3f} |",
        f"| reclaim file removed → `ready` in `GET /admin/workers` (includes `--wake-after 1`) | {t['median_unlink_to_ready_s']:.3f} |",
        "",
        "The outside timings add the file poll (every 0.3 s), the heartbeat that carries the state, "
        "and, on return, the 1 s every signal must stay clear.",
        "",
        "vLLM CPU worker: **not run** by this script (time). Measured by hand earlier with the tiny "
        "model (`tests/tiny_model.py`): reclaim 0.32–0.76 s, wake 0.12–0.42 s; vLLM on CPU frees no "
        "memory on sleep, so that is also control-path time.",
        "",
        "## 2. Reclaim storm",
        "",
        f"{cfg['workers']} sim workers, R1-style requests (prompts as `--workload r1`; outputs log-normal "
        f"median {cfg['output_median']}, σ 0.9, clipped to [{cfg['output_low']}, {cfg['output_high']}] tokens — "
        f"R1's lengths, cap lowered from 32,768 so 2 CPU cores can stream them), Poisson at {cfg['rate']} req/s for "
        f"{cfg['num_requests']} requests; every {cfg['period']} s {cfg['reclaimed']} of {cfg['workers']} workers "
        f"(~{100 * cfg['reclaimed'] / cfg['workers']:.0f}%) are reclaimed and returned {cfg['period'] / 2:.0f} s later. "
        f"Goodput SLO: TTFT {cfg['slo_sim']['ttft_ms']} ms, TPOT {cfg['slo_sim']['tpot_ms']} ms simulated "
        f"(÷{cfg['time_scale']} on the wall clock).",
        "",
        "- **idlegrid**: reclaim = create the worker's reclaim file (the agent drains it, hands "
        "its streams over to other workers, sleeps the engine); return = remove it.",
        "- **vllm-router** (round_robin) in front of the same kind of sim engines (separate processes, same seed), "
        "which knows nothing of reclaim: at the same times the script `POST /pause?mode=abort`s the engines "
        "and later `/resume`s them.",
        "",
        "| | sent | completed | failed | completed short | tokens lost | goodput (req/s) | output tok/s | p99 TTFT ms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in ("idlegrid", "vllm-router"):
        v = s.get(name, {})
        if "completed" not in v:
            lines.append(f"| {name} | {v.get('skipped', v.get('error', 'not run'))} |||||||| ")
            continue
        lines.append(f"| {name} | {v['sent']} | {v['completed']} | {v['failed']} | {v['short']} | {v['tokens_lost']} | "
                     f"{v['request_goodput']:.3f} | {v['output_throughput']:.0f} | {v['p99_ttft_ms'] or 0:.0f} |")
    lines += [
        "",
        "Tokens lost = for failed requests, max_tokens minus the text chunks received; for requests "
        "that finished with `usage.completion_tokens` below the `max_tokens` they asked for "
        "(with `ignore_eos`), the difference. Latencies are wall-clock ms (simulated ms ÷ time scale).",
        "",
        "Caveats: one run, a small sample (tens of requests, a few reclaim waves); the sim engine's "
        "`/pause?mode=abort` aborts the streams it runs and holds new ones until `/resume`, so behind "
        "vllm-router requests routed to a paused engine wait (the p99 TTFT) and the aborted ones fail. "
        "idlegrid's hand-over resumes a reclaimed worker's streams elsewhere, so none are lost.",
        "",
        "![reclaim](reclaim.png)",
        "",
        "Raw numbers: `results.json`.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer cycles and a shorter storm")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--workers", type=int, default=6)
    p.add_argument("--time-scale", type=float, default=4.0, help="simulated seconds per wall second (low enough that reclaims catch long streams in flight)")
    p.add_argument("--period", type=float, default=20.0, help="seconds between reclaim waves in the storm")
    p.add_argument("--no-router", action="store_true")
    args = p.parse_args(argv)
    cycles, duration = (6, 45.0) if args.quick else (12, 90.0)
    rate = 0.75
    outputs = LogNormal(4000, 0.9, 256, 16384)  # R1's lengths, capped at 16k to fit 2 CPU cores
    requests = r1_requests(int(rate * duration), outputs, SEED, "reclaim")
    slo_sim = {"ttft_ms": 2000.0, "tpot_ms": 60.0}
    slo = {k: v / args.time_scale for k, v in slo_sim.items()}
    events = storm_schedule(args.workers, duration, args.period, 0.3, SEED)
    reclaimed = len(events[0][2])
    args.out.mkdir(parents=True, exist_ok=True)
    results = {"config": {"quick": args.quick, "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                          "workers": args.workers, "time_scale": args.time_scale, "period": args.period,
                          "reclaimed": reclaimed, "rate": rate, "num_requests": len(requests),
                          "output_median": outputs.median, "output_low": outputs.low, "output_high": outputs.high,
                          "slo_sim": slo_sim, "events": events, "simulated": True},
               "storm": {}}
    with tempfile.TemporaryDirectory(prefix="reclaim-bench-") as tmp:
        work = Path(tmp)
        fleet = Fleet(args.workers, args.time_scale, work)
        try:
            print("starting gateway + sim workers", flush=True)
            fleet.start()
            print("reclaim cycles", flush=True)
            results["timings"] = reclaim_cycles(fleet, cycles)
            fleet.wait_ready(args.workers, 30)

            async def act(what: str, idx: list[int]) -> None:
                for i in idx:
                    if what == "reclaim":
                        fleet.files[i].touch()
                    else:
                        fleet.files[i].unlink(missing_ok=True)

            print("storm through idlegrid", flush=True)
            results["storm"]["idlegrid"] = asyncio.run(run_storm(fleet.url, fleet.api_key, requests, rate, events, act, slo))
            print(" ", results["storm"]["idlegrid"], flush=True)
        finally:
            fleet.stop()
        if args.no_router:
            results["storm"]["vllm-router"] = {"skipped": "--no-router"}
        else:
            print("storm through vllm-router", flush=True)
            try:
                results["storm"]["vllm-router"] = router_storm(args.workers, args.time_scale, work, requests, rate, events, slo)
            except Exception as exc:  # a comparison that fails must not lose the idlegrid numbers
                results["storm"]["vllm-router"] = {"error": f"{type(exc).__name__}: {exc}"}
            print(" ", results["storm"]["vllm-router"], flush=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, args.out)
    (args.out / "README.md").write_text(readme(results))
    print(f"wrote {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
