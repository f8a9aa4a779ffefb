"""`idlegrid bench`: latency, goodput, tokens/s and tokens per joule against any OpenAI-compatible endpoint.

    idlegrid bench --base-url http://127.0.0.1:8000/v1 --api-key K --model M \\
        --workload r1 --num-requests 200 --rate 2 --slo ttft_ms=2000,tpot_ms=60 \\
        --energy-from http://127.0.0.1:8000 --out results/r1-rate2

Ctrl-C stops sending, cancels what is in flight and still writes everything
measured so far (`interrupted: true`); the exit status is then 130.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import logging
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from tqdm import tqdm

from benchmarks import report
from benchmarks.client import chat_url
from benchmarks.energy import (
    EnergySampler,
    WorkerEnergyReader,
    energy_over_window,
    energy_source_kind,
    reader_for,
    redact,
    unavailable,
)
from benchmarks.metrics import SLO_KEYS, Window, steady_window, summarize
from benchmarks.runner import LevelResult, LoadLevel, Target, run_level
from benchmarks.workloads import WORKLOADS, BenchRequest, WorkloadError, build_requests

EXIT_INTERRUPTED = 130


class UsageError(ValueError):
    """A bad flag value: reported as one line, exit status 2."""


class EndpointError(RuntimeError):
    """The endpoint cannot be benchmarked (unreachable, key refused, model not served): one line, exit status 1."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base-url", required=True, help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1")
    parser.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY", ""), help="bearer key (default $OPENAI_API_KEY)")
    parser.add_argument("--model", required=True, help="model id to request")
    parser.add_argument("--workload", required=True, choices=WORKLOADS, help="r1 reasoning, chat turns, fixed lengths, or a jsonl file")
    parser.add_argument("--input-len", type=int, help="prompt tokens (fixed workload)")
    parser.add_argument("--output-len", type=int, help="output tokens (fixed workload; default for jsonl lines without one)")
    parser.add_argument("--jsonl", help="requests file for --workload jsonl")
    parser.add_argument("--num-requests", type=int, required=True, help="requests per load level")
    load = parser.add_mutually_exclusive_group(required=True)
    load.add_argument("--rate", help="open-loop arrivals per second ('inf' sends all at once)")
    load.add_argument("--rates", help="sweep: comma-separated rates, one load level each, e.g. 1,2,4,8")
    load.add_argument("--concurrency", type=int, help="closed loop: requests kept in flight")
    parser.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of arrival gaps; 1 = Poisson (default), <1 burstier")
    parser.add_argument("--slo", help="goodput SLO in ms, e.g. ttft_ms=2000,tpot_ms=60 (keys: ttft_ms, tpot_ms, e2el_ms)")
    parser.add_argument("--energy-from", help="gateway URL (admin API), redis:// URL, or a Prometheus /metrics URL")
    parser.add_argument("--admin-token", default=os.environ.get("IDLEGRID_ADMIN_TOKEN"), help="gateway admin token (default $IDLEGRID_ADMIN_TOKEN)")
    parser.add_argument("--energy-interval", type=float, default=0.5, help="seconds between energy readings (default 0.5)")
    parser.add_argument("--percentiles", default="50,90,99", help="latency percentiles to report (default 50,90,99)")
    parser.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false", help="let the engine stop at EOS (lengths then vary)")
    parser.add_argument("--request-timeout", type=float, default=600.0, help="seconds without a byte before a request fails (default 600)")
    parser.add_argument("--seed", type=int, default=0, help="seed for prompts, lengths and arrivals (default 0)")
    parser.add_argument("--out", required=True, help="output folder for results.json, requests.jsonl, plots and report.md")


@dataclass
class BenchConfig:
    base_url: str
    api_key: str
    model: str
    workload: str
    requests_by_level: list[list[BenchRequest]]  # same lengths at every level, fresh prompt text
    levels: list[LoadLevel]
    out: Path
    slo: dict[str, float] | None = None
    energy_from: str | None = None
    admin_token: str | None = None
    energy_interval_s: float = 0.5
    percentiles: tuple[float, ...] = (50.0, 90.0, 99.0)
    ignore_eos: bool = True
    request_timeout_s: float = 600.0
    seed: int = 0
    workload_params: dict = field(default_factory=dict)


def parse_rate(text: str) -> float:
    try:
        rate = float(text)
    except ValueError:
        raise UsageError(f"rate {text!r} is not a number (use e.g. 2.5 or inf)") from None
    if not rate > 0:
        raise UsageError(f"rate must be positive, got {text}")
    return rate


def parse_slo(text: str | None) -> dict[str, float] | None:
    if not text:
        return None
    slo = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or key not in SLO_KEYS:
            raise UsageError(f"--slo part {part!r}: expected KEY=MS with KEY one of {', '.join(SLO_KEYS)}")
        try:
            slo[key] = float(value)
        except ValueError:
            raise UsageError(f"--slo {key}: {value!r} is not a number of milliseconds") from None
        if slo[key] <= 0:
            raise UsageError(f"--slo {key} must be positive")
    return slo


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    if args.num_requests < 1:
        raise UsageError("--num-requests must be at least 1")
    if args.burstiness <= 0:
        raise UsageError("--burstiness must be positive")
    if args.energy_interval <= 0:
        raise UsageError("--energy-interval must be positive")
    if args.concurrency is not None:
        if args.concurrency < 1:
            raise UsageError("--concurrency must be at least 1")
        levels = [LoadLevel(concurrency=args.concurrency)]
    elif args.rates is not None:
        levels = [LoadLevel(rate=parse_rate(r), burstiness=args.burstiness) for r in args.rates.split(",") if r.strip()]
        if not levels:
            raise UsageError("--rates needs at least one rate")
    else:
        levels = [LoadLevel(rate=parse_rate(args.rate), burstiness=args.burstiness)]
    try:
        percentiles = tuple(float(p) for p in args.percentiles.split(","))
    except ValueError:
        raise UsageError(f"--percentiles {args.percentiles!r}: expected numbers like 50,90,99") from None
    if not all(0 <= p <= 100 for p in percentiles):
        raise UsageError("--percentiles must lie between 0 and 100")
    if args.energy_from:
        try:
            energy_source_kind(args.energy_from, args.admin_token)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    if not args.base_url.startswith(("http://", "https://")):
        raise UsageError(f"--base-url {args.base_url!r}: expected http(s)://host:port[/v1]")
    try:
        requests_by_level = [
            build_requests(args.workload, args.num_requests, args.seed, args.input_len, args.output_len, args.jsonl,
                           text_seed=args.seed if i == 0 else f"{args.seed}/level{i}")
            for i in range(len(levels))
        ]
    except WorkloadError as exc:
        raise UsageError(str(exc)) from None
    params = {"input_len": args.input_len, "output_len": args.output_len} if args.workload == "fixed" else {}
    if args.workload == "jsonl":
        params = {"jsonl": args.jsonl}
    return BenchConfig(
        base_url=args.base_url,
        api_key=args.api_key or "",
        model=args.model,
        workload=args.workload,
        requests_by_level=requests_by_level,
        levels=levels,
        out=Path(args.out),
        slo=parse_slo(args.slo),
        energy_from=args.energy_from,
        admin_token=args.admin_token,
        energy_interval_s=args.energy_interval,
        percentiles=percentiles,
        ignore_eos=args.ignore_eos,
        request_timeout_s=args.request_timeout,
        seed=args.seed,
        workload_params=params,
    )


def _workload_description(config: BenchConfig) -> str:
    ins = [r.input_len for r in config.requests_by_level[0]]
    outs = [r.output_len for r in config.requests_by_level[0]]
    return (
        f"prompts ≈ {sum(ins) / len(ins):.0f} tokens and outputs {sum(outs) / len(outs):.0f} tokens on average, "
        f"outputs {min(outs)}–{max(outs)}"
    )


async def _preflight(client: httpx.AsyncClient, config: BenchConfig, headers: dict) -> list[dict]:
    """Check the endpoint answers and serves the model; raise EndpointError with the reason if not."""
    url = chat_url(config.base_url).rsplit("/chat/completions", 1)[0] + "/models"
    try:
        response = await client.get(url, headers=headers, timeout=10.0)
    except httpx.HTTPError as exc:
        raise EndpointError(f"cannot reach {config.base_url}: {exc.__class__.__name__}: {exc}") from None
    if response.status_code in (401, 403):
        raise EndpointError(f"{url} refused the API key (HTTP {response.status_code})")
    if response.status_code != 200:
        return []  # some endpoints have no model list; the requests themselves will tell
    try:
        models = response.json().get("data") or []
    except ValueError:
        return []
    served = [m.get("id") for m in models]
    if models and config.model not in served:
        raise EndpointError(f"model {config.model!r} is not served at {config.base_url} (served: {', '.join(map(str, served))})")
    return [m for m in models if m.get("id") == config.model]


def _model_card(served: list[dict]) -> dict | None:
    """What the endpoint says about the model, and whether it is a simulated engine."""
    if not served:
        return None
    card = {k: served[0][k] for k in ("id", "owned_by", "root", "max_model_len", "workers") if k in served[0]}
    card["simulated"] = bool(served[0].get("simulated")) or served[0].get("owned_by") == "idlegrid-sim"
    return card


def _install_stop_handlers(stop: asyncio.Event) -> list[int]:
    """First Ctrl-C (or SIGTERM) sets `stop`; a second one is the default (immediate) behaviour."""
    loop = asyncio.get_running_loop()
    installed = []

    def on_signal(signum: int) -> None:
        print("\nidlegrid bench: stopping; writing what was measured so far (Ctrl-C again to quit now)", file=sys.stderr)
        stop.set()
        for s in installed:
            loop.remove_signal_handler(s)

    for signum in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(signum, on_signal, signum)
            installed.append(signum)
        except (NotImplementedError, RuntimeError, ValueError):
            pass  # not the main thread, or no signals here: stop only via the event
    return installed


def _remove_stop_handlers(installed: list[int]) -> None:
    loop = asyncio.get_running_loop()
    for signum in installed:
        loop.remove_signal_handler(signum)


def _run_entry(config: BenchConfig, result: LevelResult, window: Window | None, energy: dict) -> dict:
    level = result.level
    summary = summarize(result.records, result.duration_s, config.slo, config.percentiles)
    return {
        "label": level.label,
        "request_rate": level.rate if level.concurrency is None else None,
        "burstiness": level.burstiness if level.concurrency is None else None,
        "max_concurrency": level.concurrency,
        "num_prompts": len(config.requests_by_level[0]),
        "sent": len(result.records),
        "interrupted": result.interrupted,
        "unfinished": sum(1 for r in result.records if r.error_kind == "interrupted"),
        **summary,
        "steady_window": window.to_json() if window else None,
        **energy,
    }


async def bench(config: BenchConfig, stop: asyncio.Event | None = None) -> tuple[dict, int]:
    """Run every load level, write the output folder, return (results, exit status)."""
    stop = stop or asyncio.Event()
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    timeout = httpx.Timeout(config.request_timeout_s, connect=10.0)
    reader: WorkerEnergyReader | None = reader_for(config.energy_from, config.admin_token) if config.energy_from else None
    installed = _install_stop_handlers(stop)
    t0 = time.perf_counter()
    sampler = EnergySampler(reader, t0, config.energy_interval_s) if reader else None
    sampler_stop = asyncio.Event()
    sampler_task = None
    results_by_level: list[LevelResult] = []
    try:
        async with httpx.AsyncClient(timeout=timeout, limits=httpx.Limits(max_connections=None, max_keepalive_connections=64)) as client:
            served = await _preflight(client, config, headers)
            target = Target(client, chat_url(config.base_url), headers, config.model, config.ignore_eos)
            if sampler:
                await sampler.sample_once()
                if sampler.errors:  # asked for energy and cannot get it: say so before any traffic
                    raise EndpointError(f"cannot read energy counters from {redact(config.energy_from)}: {sampler.errors[0]}")
                sampler_task = asyncio.create_task(sampler.run(sampler_stop))
            for index, level in enumerate(config.levels):
                if stop.is_set():
                    break
                requests = config.requests_by_level[index]
                with tqdm(total=len(requests), desc=level.label, unit="req", leave=True, disable=None) as bar:
                    result = await run_level(target, requests, level, t0, stop, config.seed + index, lambda: bar.update(1), index)
                results_by_level.append(result)
    finally:
        if sampler_task:
            sampler_stop.set()
            await sampler_task
            await sampler.sample_once()  # the counters after the last request
        if reader:
            await reader.close()
        _remove_stop_handlers(installed)

    runs = []
    for result in results_by_level:
        window = steady_window([(r.start_s, r.end_s) for r in result.records], result.level.concurrency)
        if sampler:
            energy = energy_over_window(sampler.snapshots, window, result.records, config.model)
            if not sampler.snapshots and sampler.errors:
                energy["energy_note"] = f"every energy reading failed: {sampler.errors[-1]}"
        else:
            energy = unavailable("no energy source was given (--energy-from)")
        runs.append(_run_entry(config, result, window, energy))

    interrupted = stop.is_set()
    results = {
        "idlegrid_bench_schema": 1,
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "backend": "openai-chat",
        "base_url": config.base_url,
        "model_id": config.model,
        "served_model": _model_card(served),
        "workload": {"name": config.workload, "description": _workload_description(config), **config.workload_params},
        "num_prompts": len(config.requests_by_level[0]),
        "seed": config.seed,
        "ignore_eos": config.ignore_eos,
        "slo": config.slo,
        "percentiles": list(config.percentiles),
        "energy_from": redact(config.energy_from) if config.energy_from else None,
        "energy_interval_s": config.energy_interval_s,
        "energy_read_errors": len(sampler.errors) if sampler else 0,
        "interrupted": interrupted,
        "runs": runs,
    }
    if len(runs) == 1:
        results.update({k: v for k, v in runs[0].items() if k not in results})
    report.write_all(config.out, results, [r.records for r in results_by_level])
    _print_summary(config, results)
    if interrupted:
        return results, EXIT_INTERRUPTED
    if runs and all(r["completed"] == 0 for r in runs):
        failures = {}
        for r in runs:
            for kind, n in r["failures"].items():
                failures[kind] = failures.get(kind, 0) + n
        what = ", ".join(f"{k}: {n}" for k, n in sorted(failures.items()))
        hint = " (an endpoint that rejects ignore_eos needs --no-ignore-eos)" if config.ignore_eos and set(failures) == {"http_400"} else ""
        print(f"idlegrid bench: error: every request failed ({what}){hint}; see {config.out / 'requests.jsonl'}", file=sys.stderr)
        return results, 1
    return results, 0


def _print_summary(config: BenchConfig, results: dict) -> None:
    def f(v, d=1):
        return "-" if v is None else (f"{v:.{d}f}" if isinstance(v, float) and not math.isinf(v) else str(v))

    for r in results["runs"]:
        print(
            f"{r['label']}: {r['completed']} ok, {r['failed']} failed, {f(r['request_throughput'], 2)} req/s, "
            f"{f(r['output_throughput'])} out tok/s, TTFT p50/p99 {f(r['median_ttft_ms'])}/{f(r['p99_ttft_ms'])} ms, "
            f"TPOT p50 {f(r['median_tpot_ms'])} ms, tokens/J {f(r.get('tokens_per_joule'), 3)} ({r.get('energy_source')})"
        )
    print(f"results written to {config.out}/ (results.json, requests.jsonl, report.md)")


def run(args: argparse.Namespace) -> int:
    # httpx logs every request at INFO; thousands of lines would bury the progress bar.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        config = config_from_args(args)
        config.out.mkdir(parents=True, exist_ok=True)
        _, status = asyncio.run(bench(config))
        return status
    except UsageError as exc:
        print(f"idlegrid bench: error: {exc}", file=sys.stderr)
        return 2
    except (EndpointError, OSError) as exc:
        print(f"idlegrid bench: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="idlegrid bench", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
