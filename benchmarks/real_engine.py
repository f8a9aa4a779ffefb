"""Throughput lost to the gateway on a real engine: vLLM (CPU build) serving the
tiny test model, measured straight and through idlegrid with `idlegrid bench`.

    python -m benchmarks.real_engine                       # the committed run
    python -m benchmarks.real_engine --rounds 1 --out /tmp/v   # quicker

One vLLM server (`tests/vllm_server.py`, the model from `tests/tiny_model.py`),
one Redis, one gateway, and one worker agent attached to the server with
`--engine-url`. Then the same closed-loop `fixed` workload is sent straight to
vLLM and through the gateway, alternating (direct, gateway, gateway, direct,
...) so that drift in the machine hits both alike; each target's throughput is
the median of its runs. Nothing is pinned: vLLM's CPU kernels use both cores,
and the gateway's CPU time (reported) is taken from them, which is part of
what the gateway costs on a machine like this one.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.overhead import Processes, cpu_seconds, version_of, wait_http
from benchmarks.report import plot_cdf

DEFAULT_OUT = Path(__file__).parent / "results" / "vllm-cpu"


def start_stack(work: Path) -> tuple[Any, Any, dict]:
    """vLLM + Redis + gateway + agent; returns (vllm server, redis, targets)."""
    import httpx

    from gateway.embedded_redis import EmbeddedRedis, free_port
    from gateway.registry import add_api_key_now
    from tests.vllm_server import TEST_ENGINE_ARGS, VLLMServer
    from tests.tiny_model import tiny_model_path
    from workers.vllm_launch import vllm_missing_reason

    missing = vllm_missing_reason()
    if missing:
        raise SystemExit(f"benchmarks.real_engine: {missing}")
    print("starting vLLM (CPU) with the tiny model (about a minute)...", flush=True)
    vllm = VLLMServer(tiny_model_path(), work / "vllm.log").start()
    redis = EmbeddedRedis(work / "redis").start()
    procs = Processes(work)
    api_key, admin = "sk-bench-real", "bench-admin"
    add_api_key_now(redis.url, api_key, "bench")
    port = free_port()
    gw = procs.start("gateway", [sys.executable, "-m", "gateway.cli", "--log-level", "WARNING", "gateway", "--redis", redis.url,
                                 "--port", str(port), "--admin-token", admin])
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/health")
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {admin}"}, timeout=10) as c:
        token = c.post("/admin/enroll-tokens", json={"center": "cpu", "uses": 1, "ttl_s": 600}).raise_for_status().json()["token"]
        procs.start("agent", [sys.executable, "-m", "gateway.cli", "--log-level", "WARNING", "worker", "--gateway", url,
                              "--token", token, "--center", "cpu", "--engine-url", vllm.base_url, "--engine-api-key", vllm.api_key,
                              "--model", vllm.model, "--max-num-seqs", _flag(TEST_ENGINE_ARGS, "--max-num-seqs", "32")])
        deadline = time.monotonic() + 60
        while not any(w["state"] == "ready" for w in c.get("/admin/workers").json()["workers"]):
            if time.monotonic() > deadline:
                raise TimeoutError("the vLLM worker did not enroll")
            time.sleep(0.2)
    targets = {
        "direct": {"base_url": vllm.base_url + "/v1", "api_key": vllm.api_key, "pid": None},
        "idlegrid": {"base_url": url + "/v1", "api_key": api_key, "pid": gw.pid},
    }
    return (vllm, redis, procs), targets, {"vllm_args": TEST_ENGINE_ARGS, "model": vllm.model}


def _flag(args: list[str], name: str, default: str) -> str:
    return args[args.index(name) + 1] if name in args else default



def bench_once(target: dict, model: str, args: argparse.Namespace, out: Path) -> dict:
    """One `idlegrid bench` run; its results.json, plus the gateway's CPU time."""
    cmd = [sys.executable, "-m", "benchmarks.cli", "--base-url", target["base_url"], "--api-key", target["api_key"],
           "--model", model, "--workload", "fixed", "--input-len", str(args.input_len), "--output-len", str(args.output_len),
           "--num-requests", str(args.num_requests), "--concurrency", str(args.concurrency), "--seed", str(args.seed),
           "--out", str(out)]
    cpu0 = cpu_seconds(target["pid"]) if target["pid"] else None
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env={**os.environ, "TQDM_DISABLE": "1"})
    result = json.loads((out / "results.json").read_text())
    if cpu0 is not None:
        result["gateway_cpu_s"] = round(cpu_seconds(target["pid"]) - cpu0, 3)
    return result


KEYS = ("completed", "failed", "duration", "output_throughput", "request_throughput", "median_ttft_ms", "p99_ttft_ms",
        "median_tpot_ms", "median_itl_ms", "p99_itl_ms", "median_e2el_ms")


def run(args: argparse.Namespace) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="idlegrid-real-"))
    (vllm, redis, procs), targets, engine = start_stack(work)
    runs: list[dict] = []
    try:
        # Warm up both paths (first requests compile and fill caches), unmeasured.
        for name in ("direct", "idlegrid"):
            warm = argparse.Namespace(**{**vars(args), "num_requests": args.concurrency})
            bench_once(targets[name], engine["model"], warm, work / f"warmup-{name}")
        for i in range(args.rounds):
            order = ("direct", "idlegrid") if i % 2 == 0 else ("idlegrid", "direct")
            for name in order:
                r = bench_once(targets[name], engine["model"], args, work / f"run-{i}-{name}")
                entry = {"target": name, "round": i, **{k: r.get(k) for k in KEYS}}
                if "gateway_cpu_s" in r:
                    entry["gateway_cpu_s"] = r["gateway_cpu_s"]
                    entry["gateway_cpu_share"] = round(r["gateway_cpu_s"] / r["duration"], 3)
                entry["_requests"] = (work / f"run-{i}-{name}" / "requests.jsonl").read_text()
                runs.append(entry)
                print(f"  round {i} {name}: {r['output_throughput']:.1f} output tok/s, TTFT p50 {r['median_ttft_ms']:.1f} ms, "
                      f"{r['completed']} ok / {r['failed']} failed", flush=True)
    finally:
        procs.stop_all()
        redis.stop()
        vllm.stop()
    return summarize(args, engine, runs)


def summarize(args: argparse.Namespace, engine: dict, runs: list[dict]) -> dict:
    by = {name: [r for r in runs if r["target"] == name] for name in ("direct", "idlegrid")}
    med = {name: {k: statistics.median([r[k] for r in rs if r.get(k) is not None]) for k in KEYS if any(r.get(k) is not None for r in rs)}
           for name, rs in by.items()}
    d, g = med["direct"]["output_throughput"], med["idlegrid"]["output_throughput"]
    gw_cpu = [r["gateway_cpu_share"] for r in by["idlegrid"] if "gateway_cpu_share" in r]
    return {
        "engine": {"server": version_of("vllm-cpu"), "model": "tiny-r1 (tests/tiny_model.py: 2-layer Qwen2, random weights)", **engine},
        "workload": {"kind": "fixed", "input_len": args.input_len, "output_len": args.output_len, "concurrency": args.concurrency,
                     "num_requests": args.num_requests, "rounds": args.rounds},
        "machine": {"cpus": os.cpu_count(), "pinned": False, "nice": args.nice, "load_average_after": [round(x, 2) for x in os.getloadavg()]},
        "median": med,
        "throughput_ratio": round(g / d, 4),
        "throughput_lost_pct": round(100 * (1 - g / d), 2),
        "added_median_ttft_ms": round(med["idlegrid"]["median_ttft_ms"] - med["direct"]["median_ttft_ms"], 3),
        "added_median_itl_ms": round(med["idlegrid"]["median_itl_ms"] - med["direct"]["median_itl_ms"], 3),
        "gateway_cpu_share_median": statistics.median(gw_cpu) if gw_cpu else None,
        "runs": runs,
    }


def plot(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"direct": "#555555", "idlegrid": "#1f77b4"}
    runs = results["runs"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    rounds = sorted({r["round"] for r in runs})
    for j, name in enumerate(("direct", "idlegrid")):
        values = [next((r["output_throughput"] for r in runs if r["target"] == name and r["round"] == i), 0) for i in rounds]
        bars = ax.bar([i + (j - 0.5) * 0.4 for i in rounds], values, 0.4, label=name, color=colors[name])
        ax.bar_label(bars, fmt="{:,.0f}", fontsize=8)
    ax.set_xticks(rounds, [f"round {i}" for i in rounds])
    ax.set_ylabel("output tokens/s")
    ax.set_title(f"throughput (lost through the gateway: {results['throughput_lost_pct']:.1f}%)")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    for ax, key, title in ((axes[1], "ttft_ms", "TTFT"), (axes[2], "itl_ms", "inter-token latency")):
        for name in ("direct", "idlegrid"):
            values: list[float] = []
            for r in runs:
                if r["target"] != name:
                    continue
                for line in r["_requests"].splitlines():
                    rec = json.loads(line)
                    v = rec.get(key)
                    values.extend(v if isinstance(v, list) else ([v] if v is not None else []))
            plot_cdf(ax, values, name, colors[name])
        ax.set_title(f"{title} CDF (all rounds)")
        ax.set_xlabel("ms")
        ax.set_xscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "vllm_cpu.png", dpi=110)
    plt.close(fig)


def write(results: dict, out: Path) -> None:
    slim = json.loads(json.dumps(results))
    for r in slim["runs"]:
        r.pop("_requests", None)
    (out / "results.json").write_text(json.dumps(slim, indent=2) + "\n")
    plot(results, out)
    (out / "README.md").write_text(readme(slim))


def readme(results: dict) -> str:
    w, m = results["workload"], results["median"]
    nice = results["machine"].get("nice")
    rows = []
    for name in ("direct", "idlegrid"):
        r = m[name]
        rows.append(f"| {name} | {r['output_throughput']:.1f} | {r['request_throughput']:.2f} | {r['median_ttft_ms']:.1f} | "
                    f"{r['p99_ttft_ms']:.1f} | {r['median_tpot_ms']:.2f} | {r['median_itl_ms']:.2f} | {r['p99_itl_ms']:.2f} |")
    runs = "\n".join(f"| {r['round']} | {r['target']} | {r['output_throughput']:.1f} | {r['median_ttft_ms']:.1f} | "
                     f"{r['completed']} / {r['failed']} | {r.get('gateway_cpu_share', '')} |" for r in results["runs"])
    return f"""# Real engine: vLLM (CPU) straight vs. through the idlegrid gateway

Reproduce: `python -m benchmarks.real_engine{f' --nice {nice}' if nice else ''}`

Engine: {results['engine']['server']}, model {results['engine']['model']}, engine args
`{' '.join(results['engine']['vllm_args'])}`. Workload: `idlegrid bench --workload fixed --input-len {w['input_len']}
--output-len {w['output_len']} --concurrency {w['concurrency']} --num-requests {w['num_requests']}` (streaming chat,
`ignore_eos`), {w['rounds']} rounds per target, alternating direct/gateway so drift hits both; medians over rounds.
Machine: {results['machine']['cpus']} cores, nothing pinned (vLLM's CPU kernels take what they get; the gateway's
CPU time comes out of the same two cores){f', everything at niceness {nice}' if nice else ''}; load average after the
run {results['machine'].get('load_average_after')}.

**Throughput through the gateway: {100 * results['throughput_ratio']:.1f}% of direct
({results['throughput_lost_pct']:+.1f}% lost).** Added median TTFT {results['added_median_ttft_ms']:.1f} ms, added
median inter-token latency {results['added_median_itl_ms']:.2f} ms; the gateway process used
{results['gateway_cpu_share_median']:.2f} of a core while relaying.

| target | output tok/s | req/s | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | ITL p50 ms | ITL p99 ms |
|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

Every run:

| round | target | output tok/s | TTFT p50 ms | completed / failed | gateway CPU (cores) |
|---|---|---|---|---|---|
{runs}

![throughput and latency](vllm_cpu.png)

On this machine the engine is CPU-bound, so every CPU-second the gateway spends relaying is taken from vLLM:
the throughput lost is close to the gateway's CPU share divided by the {results['machine']['cpus']} cores. With a GPU
engine the gateway's CPU time would not slow decoding.

Numbers: `results.json`. The tiny model's weights are random (the text is gibberish); what matters here is that
every byte of serving is vLLM's own, so the gateway relays real vLLM streams at real vLLM pace.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.real_engine", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(DEFAULT_OUT), help=f"output folder (default {DEFAULT_OUT})")
    parser.add_argument("--rounds", type=int, default=4, help="runs per target, alternating (default 4)")
    parser.add_argument("--concurrency", type=int, default=16, help="closed-loop clients (default 16)")
    parser.add_argument("--num-requests", type=int, default=64, help="requests per run (default 64)")
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--nice", type=int, default=0,
                        help="run everything at this niceness (e.g. -10 on a machine busy with other work; needs root)")
    args = parser.parse_args(argv)
    if args.nice:
        os.nice(args.nice)  # vLLM, the gateway, the agent and the bench runs inherit it
    results = run(args)
    write(results, Path(args.out))
    print(json.dumps({k: results[k] for k in ("throughput_ratio", "throughput_lost_pct", "added_median_ttft_ms",
                                                "added_median_itl_ms", "gateway_cpu_share_median")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
