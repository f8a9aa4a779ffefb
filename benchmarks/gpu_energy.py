"""Real NVML energy: tokens per joule of a GPU serving through idlegrid, by batch size.

    python -m benchmarks.gpu_energy --out benchmarks/results/gpu-energy          # an NVIDIA GPU, about 5 minutes
    python -m benchmarks.gpu_energy --device cpu --config tiny --quick --out /tmp/ge   # smoke test anywhere

No vLLM build and no model weights are needed: the engine is `workers.torch_engine`,
a Llama-shaped model (8B by default) with random weights doing the real
transformer compute on the GPU. One process each: a private Redis, a gateway,
and a worker agent (`idlegrid worker --engine torch`) that launches the engine
on GPU 0 and heartbeats the GPU's NVML energy counter, as it does for vLLM.
The GPU first sits idle for a while (idle power); then `idlegrid bench`'s
harness sends the same fixed workload, closed loop, at each concurrency,
reading energy from the gateway as `--energy-from` does, so tokens per joule
is whole-board energy over each level's steady window: energy_source "nvml".
On a machine without NVML the run still goes through, and says energy was not
measured.

Writes to --out: results.json, report.md, gpu_energy.png and logs.txt (the
tails of the agent's, engine's and gateway's logs).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import math
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks.cli import BenchConfig, bench
from benchmarks.energy import reader_for
from benchmarks.overhead import Processes, wait_http
from benchmarks.runner import LoadLevel
from benchmarks.workloads import build_requests
from gateway.registry import add_api_key_now

ADMIN_TOKEN = "gpu-energy-admin"
API_KEY = "sk-gpu-energy"
SUMMARY_KEYS = ("completed", "failed", "duration", "output_throughput", "request_throughput", "median_ttft_ms",
                "p99_ttft_ms", "median_tpot_ms", "p99_tpot_ms", "median_itl_ms", "tokens_per_joule", "energy_joules",
                "avg_power_w", "energy_source", "energy_note", "steady_output_throughput", "steady_output_tokens")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_energy", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="output folder (results.json, report.md, gpu_energy.png, logs.txt)")
    p.add_argument("--config", default="8b", help="torch engine model shape: tiny, 1b, 8b (default 8b)")
    p.add_argument("--device", default="cuda", help="cuda or cpu (default cuda: GPU 0, or the first of CUDA_VISIBLE_DEVICES)")
    p.add_argument("--concurrency", default=None, help="closed-loop levels, comma-separated (default 1,8,32,128,256; quick 1,4)")
    p.add_argument("--rounds", type=int, default=None, help="requests per level = rounds x concurrency (default 3; quick 2)")
    p.add_argument("--input-len", type=int, default=None, help="prompt words per request (default 256; quick 32)")
    p.add_argument("--output-len", type=int, default=None, help="output tokens per request, ignore_eos (default 256; quick 16)")
    p.add_argument("--max-num-seqs", type=int, default=None, help="engine batch limit (default: the largest level)")
    p.add_argument("--max-model-len", type=int, default=None, help="engine context length (default: room for the workload)")
    p.add_argument("--idle-seconds", type=float, default=None, help="idle power measured over this long first (default 10; quick 2)")
    p.add_argument("--time-budget", type=float, default=510.0,
                   help="seconds for the whole run; a level still running then is cut short, later ones skipped (default 510)")
    p.add_argument("--quick", action="store_true", help="small and short: a smoke test")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    quick = args.quick
    args.concurrency = [int(c) for c in (args.concurrency or ("1,4" if quick else "1,8,32,128,256")).split(",") if c.strip()]
    if not args.concurrency or min(args.concurrency) < 1:
        p.error("--concurrency needs positive numbers")
    args.rounds = args.rounds or (2 if quick else 3)
    args.input_len = args.input_len or (32 if quick else 256)
    args.output_len = args.output_len or (16 if quick else 256)
    args.idle_seconds = args.idle_seconds if args.idle_seconds is not None else (2.0 if quick else 10.0)
    args.max_num_seqs = args.max_num_seqs or max(args.concurrency)
    # Chat template and word pieces make a prompt of N words a little over N tokens.
    args.max_model_len = args.max_model_len or 2 * args.input_len + args.output_len + 64
    return args


class Stack:
    """Redis, a gateway and one torch worker, each a process of its own."""

    def __init__(self, work: Path, args: argparse.Namespace) -> None:
        self.work, self.args = work, args
        self.procs = Processes(work)
        self.redis = None
        self.url = ""
        self.agent = None

    def start(self) -> None:
        from gateway.embedded_redis import EmbeddedRedis, free_port

        args = self.args
        self.redis = EmbeddedRedis(self.work / "redis").start()
        add_api_key_now(self.redis.url, API_KEY, "gpu-energy")
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        cli = [sys.executable, "-m", "gateway.cli"]
        self.procs.start("gateway", [*cli, "--log-level", "WARNING", "gateway", "--redis", self.redis.url,
                                     "--port", str(port), "--admin-token", ADMIN_TOKEN])
        wait_http(self.url + "/health", timeout=60)
        with httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=10) as c:
            token = c.post("/admin/enroll-tokens", json={"center": "gpu", "uses": 1, "ttl_s": 3600}).raise_for_status().json()["token"]
        env = {"PYTHONUNBUFFERED": "1"}
        if args.device.startswith("cuda") and "CUDA_VISIBLE_DEVICES" not in os.environ:
            env["CUDA_VISIBLE_DEVICES"] = "0"
        self.agent = self.procs.start("agent", [
            *cli, "worker", "--gateway", self.url, "--token", token, "--center", "gpu",
            "--engine", "torch", "--model", args.config, "--seed", str(args.seed),
            "--max-num-seqs", str(args.max_num_seqs), "--heartbeat-interval", "0.5",
            "--", "--device", args.device, "--max-model-len", str(args.max_model_len),
        ], env=env)

    def wait_ready(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        with httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=10) as c:
            while time.monotonic() < deadline:
                ready = [w for w in c.get("/admin/workers").json()["workers"] if w["state"] == "ready"]
                if ready:
                    return ready[0]
                if self.agent.poll() is not None:
                    raise RuntimeError(f"the worker agent exited with code {self.agent.returncode}:\n{self.log_tail('agent')}")
                time.sleep(0.5)
        raise TimeoutError(f"the torch worker was not ready in {timeout:.0f}s:\n{self.log_tail('agent')}")

    def log_tail(self, name: str, lines: int = 40) -> str:
        try:
            return "\n".join((self.work / f"{name}.log").read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        self.procs.stop_all()  # the agent hands over, deregisters and stops its engine
        if self.redis:
            self.redis.stop()


async def idle_power(url: str, seconds: float) -> dict:
    """Average power over `seconds` of doing nothing, from the worker's energy counter."""
    reader = reader_for(url, ADMIN_TOKEN)
    points: list[tuple[float, float]] = []
    instant: list[float] = []
    try:
        deadline = time.monotonic() + seconds
        while True:
            for reading in await reader.read():
                if reading.energy_j is not None:
                    if not points or reading.energy_j != points[-1][1]:
                        points.append((time.monotonic(), reading.energy_j))
                    if reading.power_w is not None:
                        instant.append(reading.power_w)
            if time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.25)
    finally:
        await reader.close()
    if len(points) < 2:
        return {"seconds": seconds, "power_w": None, "note": "no energy counter changed while idle (none reported?)"}
    (t0, e0), (t1, e1) = points[0], points[-1]
    return {
        "seconds": round(t1 - t0, 2),
        "power_w": round((e1 - e0) / (t1 - t0), 1),
        "instant_power_w_mean": round(sum(instant) / len(instant), 1) if instant else None,
        "counter_updates": len(points),
    }


def bench_config(args: argparse.Namespace, url: str, model: str, concurrency: int, out: Path, energy: bool) -> BenchConfig:
    count = args.rounds * concurrency
    return BenchConfig(
        base_url=url + "/v1", api_key=API_KEY, model=model, workload="fixed",
        requests_by_level=[build_requests("fixed", count, args.seed, args.input_len, args.output_len,
                                          text_seed=f"{args.seed}/c{concurrency}")],
        levels=[LoadLevel(concurrency=concurrency)], out=out,
        energy_from=url if energy else None, admin_token=ADMIN_TOKEN, energy_interval_s=0.25,
        seed=args.seed, workload_params={"input_len": args.input_len, "output_len": args.output_len},
    )


async def measure(stack: Stack, args: argparse.Namespace, worker: dict, deadline: float) -> dict:
    model = worker["model"]
    print(f"idle for {args.idle_seconds:g}s to measure idle power...", flush=True)
    idle = await idle_power(stack.url, args.idle_seconds)
    print(f"  idle power: {idle.get('power_w')} W", flush=True)

    warmup = min(8, max(args.concurrency))
    print(f"warm-up: {warmup} requests at concurrency {warmup} (not measured)...", flush=True)
    warm = bench_config(args, stack.url, model, warmup, stack.work / "warmup", energy=False)
    warm.requests_by_level = [build_requests("fixed", warmup, args.seed, args.input_len, min(32, args.output_len), text_seed="warmup")]
    await bench(warm)

    levels = []
    for concurrency in args.concurrency:
        left = deadline - time.monotonic()
        if left < 10:
            print(f"concurrency {concurrency}: skipped, the time budget is spent", flush=True)
            levels.append({"concurrency": concurrency, "skipped": "time budget spent"})
            continue
        print(f"concurrency {concurrency}: {args.rounds * concurrency} requests...", flush=True)
        stop = asyncio.Event()
        timer = asyncio.get_running_loop().call_later(left, stop.set)
        results, _ = await bench(bench_config(args, stack.url, model, concurrency, stack.work / f"c{concurrency}", energy=True), stop)
        timer.cancel()
        run = results["runs"][0]
        level = {"concurrency": concurrency, "requests": run["sent"], "interrupted": run["interrupted"],
                 **{k: run.get(k) for k in SUMMARY_KEYS}}
        window = run.get("steady_window") or {}
        level["steady_window_s"] = window.get("length_s")
        level["joules_per_output_token"] = 1 / level["tokens_per_joule"] if level.get("tokens_per_joule") else None
        levels.append(level)
    return {"idle": idle, "levels": levels}


def gpu_name(worker: dict, device: str) -> str:
    if worker.get("gpu") and worker["gpu"] != "unknown":
        return worker["gpu"]  # what the agent read from NVML
    return "CPU (no NVIDIA GPU)" if device == "cpu" else "unknown"


def summarize(args: argparse.Namespace, worker: dict, measured: dict, started: float) -> dict:
    from workers.torch_engine.model import get_config

    import torch

    shape = get_config(args.config)
    sources = {lv.get("energy_source") for lv in measured["levels"] if not lv.get("skipped")}
    source = sources.pop() if len(sources) == 1 else ("mixed" if sources else "unavailable")
    return {
        "idlegrid_gpu_energy_schema": 1,
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": "python -m benchmarks.gpu_energy " + shlex.join(sys.argv[1:]),
        "gpu": gpu_name(worker, args.device),
        "device": args.device,
        "energy_source": source,
        "engine": {
            "kind": "torch (workers/torch_engine: a Llama-shaped model, random weights, greedy decoding)",
            "config": shape.name, "params": shape.params, "layers": shape.layers, "hidden_size": shape.hidden_size,
            "attention_heads": shape.attention_heads, "kv_heads": shape.kv_heads,
            "intermediate_size": shape.intermediate_size, "vocab_size": shape.vocab_size,
            "dtype": "bfloat16" if args.device.startswith("cuda") else "float32",
            "max_num_seqs": args.max_num_seqs, "max_model_len": args.max_model_len,
            "served_model": worker.get("model"),
        },
        "workload": {"kind": "fixed", "input_words": args.input_len, "output_tokens": args.output_len,
                     "ignore_eos": True, "streaming_chat": True, "rounds": args.rounds,
                     "requests_per_level": "rounds x concurrency", "path": "client -> gateway -> torch engine"},
        "idle": measured["idle"],
        "levels": measured["levels"],
        "software": {"python": platform.python_version(), "torch": torch.__version__,
                     "cuda": torch.version.cuda, "machine": platform.machine(), "cpus": os.cpu_count()},
        "wall_seconds": round(time.monotonic() - started, 1),
    }


def _f(value, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:,.{digits}f}"
    return str(value)


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def report(results: dict) -> str:
    e, w, idle = results["engine"], results["workload"], results["idle"]
    rows = []
    for lv in results["levels"]:
        if lv.get("skipped"):
            rows.append(f"| {lv['concurrency']} | skipped ({lv['skipped']}) | | | | | | |")
            continue
        rows.append(
            f"| {lv['concurrency']} | {lv['completed']} / {lv['failed']} | {_f(lv['output_throughput'])} | "
            f"{_f(lv['median_tpot_ms'], 2)} | {_f(lv['median_ttft_ms'])} | {_f(lv['avg_power_w'])} | "
            f"{_f(lv['tokens_per_joule'], 3)} | {_f(lv['joules_per_output_token'], 4)} |"
        )
    measured = results["energy_source"] == "nvml"
    if measured:
        energy_text = (
            f"Energy is **measured**: the GPU's NVML cumulative energy counter "
            f"(`nvmlDeviceGetTotalEnergyConsumption`, whole board), read by the worker agent every 0.5 s and "
            f"heartbeated to the gateway, which `idlegrid bench --energy-from` samples; each level's joules are "
            f"over its steady window (all clients busy). Idle power before the run: {_f(idle.get('power_w'))} W."
        )
    else:
        energy_text = (
            f"Energy was **not measured** on this run (energy_source: `{results['energy_source']}`): no NVIDIA GPU "
            f"energy counter was readable here, so tokens per joule is blank. On an NVIDIA GPU the same command "
            f"reads NVML."
        )
    notes = sorted({lv["energy_note"] for lv in results["levels"] if lv.get("energy_note")})
    title = f"Tokens per joule on {results['gpu']}, measured" if measured else f"Torch engine on {results['gpu']}: energy not measured"
    return f"""# {title}

Reproduce: `{results['command']}` ({results['wall_seconds']:.0f} s wall, {results['date']}).

GPU: **{results['gpu']}**. Engine: idlegrid's torch engine (`workers/torch_engine`), config `{e['config']}`:
a Llama-shaped decoder, {_count(e['params'])} parameters ({e['layers']} layers, hidden {e['hidden_size']},
{e['attention_heads']} heads / {e['kv_heads']} KV heads, MLP {e['intermediate_size']}, vocabulary {e['vocab_size']}),
{e['dtype']}, **random weights** (so the text is gibberish) but the real compute and memory traffic of a model that
size: batched decode over a KV cache, greedy picks. max_num_seqs {e['max_num_seqs']}, max_model_len {e['max_model_len']}.
Plain PyTorch in eager mode (fused QKV and gate/up GEMMs, SDPA attention over the cache in place, no CUDA graphs or
custom kernels): a decode step spends much of its time launching kernels from Python, so the GPU draws well under its
limit and a step is slower than vLLM's would be. The absolute tokens per joule are a lower bound for this GPU; the
trend with batch size is the point.

Workload: `idlegrid bench --workload fixed`, prompts of {w['input_words']} words, {w['output_tokens']} output tokens
(`ignore_eos`), streaming chat through the idlegrid gateway, closed loop; each level sends {w['rounds']} x its
concurrency requests.

{energy_text}

| concurrency | completed / failed | output tok/s | TPOT p50 ms | TTFT p50 ms | avg power W | tokens/J | J/token |
|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

![throughput, power and tokens per joule by concurrency](gpu_energy.png)

{('Notes from the energy accounting: ' + '; '.join(notes)) if notes else ''}

Numbers: `results.json`. Logs: `logs.txt`.
"""


def plot(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = [lv for lv in results["levels"] if not lv.get("skipped") and lv.get("completed")]
    if not levels:
        return
    x = [lv["concurrency"] for lv in levels]
    panels = (("output_throughput", "output tokens/s"), ("avg_power_w", "average power (W)"), ("tokens_per_joule", "tokens per joule"))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, (key, label) in zip(axes, panels):
        y = [lv.get(key) if lv.get(key) is not None else float("nan") for lv in levels]
        ax.plot(x, y, marker="o")
        for xi, yi in zip(x, y):
            if not math.isnan(yi):
                text = f"{yi:,.0f}" if yi >= 100 else f"{yi:.3g}"
                ax.annotate(text, (xi, yi), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
        if all(math.isnan(v) for v in y):
            ax.text(0.5, 0.5, "not measured", transform=ax.transAxes, ha="center", va="center", color="gray")
        if key == "avg_power_w" and results["idle"].get("power_w"):
            ax.axhline(results["idle"]["power_w"], color="gray", linestyle="--", label="idle")
            ax.legend()
        ax.set_xscale("log", base=2)
        ax.set_xticks(x, [str(c) for c in x])
        ax.set_xlabel("concurrency (sequences in the batch)")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{results['gpu']}, torch engine {results['engine']['config']} ({results['energy_source']} energy)")
    fig.tight_layout()
    fig.savefig(out / "gpu_energy.png", dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TQDM_DISABLE", "1")  # one progress line per level is plenty in a log
    work = Path(tempfile.mkdtemp(prefix="idlegrid-gpu-energy-"))
    stack = Stack(work, args)
    try:
        stack.start()
        print(f"starting the torch engine ({args.config} on {args.device}); the agent enrolls it when it is up...", flush=True)
        worker = stack.wait_ready(timeout=max(60.0, args.time_budget - 120))
        print(f"worker ready: {worker['model']} on {gpu_name(worker, args.device)} "
              f"(energy source: {worker.get('energy_source') or 'none'})", flush=True)
        measured = asyncio.run(measure(stack, args, worker, deadline=started + args.time_budget))
    finally:
        stack.stop()
        logs = "\n\n".join(f"==> {name}.log <==\n{stack.log_tail(name, 200)}" for name in ("agent", "gateway"))
        (out / "logs.txt").write_text(logs + "\n")
        shutil.rmtree(work, ignore_errors=True)
    results = summarize(args, worker, measured, started)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, out)
    (out / "report.md").write_text(report(results))
    print(f"\n{results['gpu']}, torch engine {args.config}, energy source: {results['energy_source']}")
    print(f"idle power: {_f(results['idle'].get('power_w'))} W")
    for lv in results["levels"]:
        if lv.get("skipped"):
            print(f"  concurrency {lv['concurrency']:>4}: skipped ({lv['skipped']})")
            continue
        print(f"  concurrency {lv['concurrency']:>4}: {_f(lv['output_throughput'])} tok/s, TPOT p50 {_f(lv['median_tpot_ms'], 2)} ms, "
              f"{_f(lv['avg_power_w'])} W, {_f(lv['tokens_per_joule'], 3)} tokens/J ({lv['completed']} ok, {lv['failed']} failed)")
    if results["energy_source"] != "nvml":
        print("energy was not measured: no NVML energy counter here (tokens/J needs an NVIDIA GPU)")
    print(f"written to {out}/ (results.json, report.md, gpu_energy.png, logs.txt) in {results['wall_seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
