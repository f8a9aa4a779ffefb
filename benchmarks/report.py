"""What a benchmark leaves in its output folder.

* `results.json` — the configuration and one entry per load level (`runs`),
  with `vllm bench serve`'s field names where they overlap; for a single
  level its fields are also copied to the top level, where tools that read
  `vllm bench serve` results look for them.
* `requests.jsonl` — one line per request sent: times, tokens, errors.
* PNG plots (matplotlib's Agg backend, no display needed) and `report.md`,
  which embeds them and says how every number was measured.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

from benchmarks.client import RequestRecord
from benchmarks.metrics import request_tpot

LATENCY_CDF = "latency_cdf.png"
THROUGHPUT_VS_LOAD = "throughput_vs_load.png"
TOKENS_PER_JOULE_VS_LOAD = "tokens_per_joule_vs_load.png"
ENERGY_BY_CENTER = "energy_by_center.png"


def _jsonable(value):
    """JSON has no infinity: write it as "inf", as `vllm bench serve` does for its rate."""
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def write_results(out_dir: Path, results: dict) -> Path:
    path = out_dir / "results.json"
    path.write_text(json.dumps(_jsonable(results), indent=2) + "\n")
    return path


def write_requests(out_dir: Path, records: Sequence[RequestRecord]) -> Path:
    path = out_dir / "requests.jsonl"
    with path.open("w") as f:
        for record in records:
            f.write(json.dumps(record.to_json()) + "\n")
    return path


# --- plots -----------------------------------------------------------------


def Figure(**kwargs):  # noqa: N802 (stands in for matplotlib's class)
    """A matplotlib figure drawn by the Agg canvas: no display, no pyplot state.

    Imported here so that `idlegrid bench --help` and flag errors do not wait
    for matplotlib."""
    from matplotlib.figure import Figure as _Figure

    return _Figure(**kwargs)


def plot_cdf(ax, values_ms: Sequence[float], label: str, color: str | None = None) -> None:
    """One empirical CDF line (nothing for no values)."""
    if not values_ms:
        return
    ordered = sorted(values_ms)
    n = len(ordered)
    ax.step(ordered, [(i + 1) / n for i in range(n)], where="post", label=label, color=color)


def plot_latency_cdfs(path: Path, runs: Sequence[tuple[str, Sequence[RequestRecord]]]) -> Path:
    """TTFT, TPOT and E2E latency CDFs of completed requests, one line per load level."""
    fig = Figure(figsize=(13, 4), layout="constrained")
    axes = fig.subplots(1, 3)
    panels = (
        ("TTFT", lambda r: r.ttft_s),
        ("TPOT", request_tpot),
        ("E2E latency", lambda r: r.e2el_s),
    )
    for ax, (title, get) in zip(axes, panels):
        spans = []
        for label, records in runs:
            values = [get(r) * 1000 for r in records if r.success and get(r) is not None]
            plot_cdf(ax, values, label)
            spans += values
        positive = [v for v in spans if v > 0]
        if positive and max(positive) / min(positive) > 50:
            ax.set_xscale("log")
        ax.set_title(title)
        ax.set_xlabel("ms")
        ax.set_ylabel("fraction of requests")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        if not spans:
            ax.text(0.5, 0.5, "no completed requests", ha="center", va="center", transform=ax.transAxes)
    if axes[0].get_legend_handles_labels()[0]:
        axes[0].legend(fontsize="small")
    fig.savefig(path, dpi=110)
    return path


def _load_axis(runs: Sequence[dict]) -> tuple[list[float], str, list[dict]]:
    finite = [r for r in runs if isinstance(r.get("request_rate"), (int, float)) and not math.isinf(r["request_rate"])]
    return [r["request_rate"] for r in finite], "offered load (requests/s)", finite


def plot_throughput_vs_load(path: Path, runs: Sequence[dict]) -> Path:
    x, xlabel, used = _load_axis(runs)
    fig = Figure(figsize=(11, 4), layout="constrained")
    left, right = fig.subplots(1, 2)
    left.plot(x, [r["output_throughput"] for r in used], marker="o", label="output tokens/s")
    left.set_ylabel("output tokens/s")
    left.set_xlabel(xlabel)
    left.set_title("Output throughput")
    left.grid(alpha=0.3)
    right.plot(x, [r["request_throughput"] for r in used], marker="o", label="completed")
    if any(r.get("request_goodput") is not None for r in used):
        right.plot(x, [r.get("request_goodput") or 0 for r in used], marker="s", label="goodput (met the SLO)")
    right.plot(x, x, linestyle=":", color="grey", label="offered")
    right.set_ylabel("requests/s")
    right.set_xlabel(xlabel)
    right.set_title("Request throughput and goodput")
    right.legend(fontsize="small")
    right.grid(alpha=0.3)
    fig.savefig(path, dpi=110)
    return path


def plot_tokens_per_joule_vs_load(path: Path, runs: Sequence[dict]) -> Path:
    x, xlabel, used = _load_axis(runs)
    fig = Figure(figsize=(11, 4), layout="constrained")
    left, right = fig.subplots(1, 2)
    left.plot(x, [r.get("tokens_per_joule") or float("nan") for r in used], marker="o")
    left.set_ylabel("output tokens per joule")
    left.set_title(f"Tokens per joule ({_sources(used)})")
    right.plot(x, [r.get("avg_power_w") or float("nan") for r in used], marker="o", color="tab:red")
    right.set_ylabel("average power (W)")
    right.set_title("Fleet power in the steady window")
    for ax in (left, right):
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    fig.savefig(path, dpi=110)
    return path


def _sources(runs: Sequence[dict]) -> str:
    kinds = sorted({r.get("energy_source", "unavailable") for r in runs})
    return "mixed" if len(kinds) > 1 else kinds[0]


def plot_energy_by_center(path: Path, runs: Sequence[dict]) -> Path:
    """Average power and (when requests name their worker) tokens/J per center, per load level."""
    centers = sorted({c["center"] or "(none)" for r in runs for c in r.get("energy_by_center", [])})
    with_tokens = any(c.get("tokens_per_joule") is not None for r in runs for c in r.get("energy_by_center", []))
    fig = Figure(figsize=(11 if with_tokens else 6, 4), layout="constrained")
    axes = fig.subplots(1, 2 if with_tokens else 1)
    axes = list(axes) if with_tokens else [axes]
    width = 0.8 / max(1, len(runs))
    for i, run in enumerate(runs):
        per_center = {(c["center"] or "(none)"): c for c in run.get("energy_by_center", [])}
        xs = [j + i * width for j in range(len(centers))]
        axes[0].bar(xs, [(per_center.get(c) or {}).get("avg_power_w") or float("nan") for c in centers], width, label=run["label"])
        if with_tokens:
            axes[1].bar(xs, [(per_center.get(c) or {}).get("tokens_per_joule") or float("nan") for c in centers], width, label=run["label"])
    titles = ["Average power per center (W)", "Output tokens per joule per center"]
    for ax, title in zip(axes, titles):
        ax.set_xticks([j + width * (len(runs) - 1) / 2 for j in range(len(centers))], centers)
        ax.set_title(f"{title} ({_sources(runs)})")
        ax.grid(alpha=0.3, axis="y")
    if len(runs) > 1:
        axes[0].legend(fontsize="small")
    fig.savefig(path, dpi=110)
    return path


def make_plots(out_dir: Path, results: dict, records_by_run: Sequence[Sequence[RequestRecord]]) -> list[Path]:
    runs = results["runs"]
    plots = [plot_latency_cdfs(out_dir / LATENCY_CDF, [(r["label"], recs) for r, recs in zip(runs, records_by_run)])]
    if len(_load_axis(runs)[0]) > 1:
        plots.append(plot_throughput_vs_load(out_dir / THROUGHPUT_VS_LOAD, runs))
        if any(r.get("tokens_per_joule") is not None or r.get("avg_power_w") is not None for r in runs):
            plots.append(plot_tokens_per_joule_vs_load(out_dir / TOKENS_PER_JOULE_VS_LOAD, runs))
    if any(c["center"] for r in runs for c in r.get("energy_by_center", [])):
        plots.append(plot_energy_by_center(out_dir / ENERGY_BY_CENTER, runs))
    return plots


# --- report.md -------------------------------------------------------------


def _fmt(value, digits: int = 1) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if math.isinf(value):
            return "inf"
        if abs(value) >= 100 or digits == 0:
            return f"{value:,.0f}"
        return f"{value:.{digits}f}"
    return str(value)


def _energy_sentence(run: dict) -> str:
    source = run.get("energy_source", "unavailable")
    note = run.get("energy_note") or ""
    if source == "unavailable":
        return f"Energy: **unavailable** — {note or 'no energy source was given (--energy-from)'}. No tokens per joule is reported."
    what = {
        "nvml": "measured by NVML's cumulative energy counters",
        "modeled": "**modeled** by the simulated engine's power model, not measured",
        "mixed": "**mixed**: some workers measured by NVML, some modeled",
    }.get(source, f"from counters labelled `{source}`")
    text = (
        f"Energy {what}: {_fmt(run.get('energy_joules'))} J over the steady window, "
        f"average {_fmt(run.get('avg_power_w'))} W, "
        f"{_fmt(run.get('tokens_per_joule'), 2)} output tokens per joule."
    )
    return text + (f" Note: {note}." if note else "")


def write_report(out_dir: Path, results: dict, plots: Sequence[Path]) -> Path:
    runs = results["runs"]
    slo = results.get("slo")
    lines = ["# idlegrid bench report", ""]
    if results.get("interrupted"):
        lines += ["> **Interrupted**: the run was stopped early; these numbers cover only what was measured before.", ""]
    workload = results["workload"]
    if (results.get("served_model") or {}).get("simulated"):
        lines += [
            "> **Simulated engine**: the endpoint serves this model from idlegrid's simulated engine; latency, "
            "throughput and energy come from its GPU model, not from real GPUs.",
            "",
        ]
    lines += [
        f"- Endpoint: `{results['base_url']}`, model `{results['model_id']}`",
        f"- Workload: `{workload['name']}` ({workload['description']}), {results['num_prompts']} requests per load level, seed {results['seed']}",
        f"- Output lengths: {'fixed by `max_tokens` with `ignore_eos`' if results['ignore_eos'] else '`max_tokens` only (engine may stop early)'}",
        f"- SLO for goodput: {', '.join(f'{k} ≤ {v:g}' for k, v in slo.items()) if slo else 'none given'}",
        f"- Energy from: {results.get('energy_from') or 'not given'}",
        f"- Date: {results['date']}",
        "",
        "## Results",
        "",
        "| load | completed | failed | req/s | goodput req/s | output tok/s | TTFT mean / p99 (ms) "
        "| TPOT mean / p99 (ms) | ITL mean / p99 (ms) | E2E mean / p99 (ms) | tokens/J | avg W | energy |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        lines.append(
            f"| {r['label']} | {r['completed']} | {r['failed']} | {_fmt(r['request_throughput'], 2)} | "
            f"{_fmt(r['request_goodput'], 2)} | {_fmt(r['output_throughput'])} | "
            f"{_fmt(r['mean_ttft_ms'])} / {_fmt(r['p99_ttft_ms'])} | {_fmt(r['mean_tpot_ms'])} / {_fmt(r['p99_tpot_ms'])} | "
            f"{_fmt(r['mean_itl_ms'])} / {_fmt(r['p99_itl_ms'])} | {_fmt(r['mean_e2el_ms'])} / {_fmt(r['p99_e2el_ms'])} | "
            f"{_fmt(r.get('tokens_per_joule'), 2)} | {_fmt(r.get('avg_power_w'))} | {r.get('energy_source', 'unavailable')} |"
        )
    lines.append("")
    for r in runs:
        failures = ", ".join(f"{kind}: {n}" for kind, n in sorted(r["failures"].items())) or "none"
        lines += [f"### {r['label']}", "", f"- Failures by kind: {failures}"]
        if r.get("interrupted"):
            lines.append(f"- Interrupted; {r.get('unfinished', 0)} request(s) in flight were cancelled and are not counted.")
        window = r.get("steady_window")
        if window:
            lines.append(
                f"- Steady window: {window['start_s']:.2f}–{window['end_s']:.2f} s ({window['length_s']:.2f} s, "
                f"{window['kind']}, steady level {window['steady_level']:g} in flight)"
                + (f"; {window['note']}" if window.get("note") else "")
            )
        lines.append(f"- {_energy_sentence(r)}")
        if r.get("energy_by_center"):
            lines += ["", "| center | workers | energy (J) | avg W | output tokens | tokens/J | source |", "|---|---|---|---|---|---|---|"]
            for c in r["energy_by_center"]:
                lines.append(
                    f"| {c['center'] or '(none)'} | {c['workers']} | {_fmt(c['energy_joules'])} | {_fmt(c['avg_power_w'])} | "
                    f"{_fmt(c['output_tokens'], 0)} | {_fmt(c['tokens_per_joule'], 2)} | {c['energy_source']} |"
                )
        lines.append("")
    lines += ["## Plots", ""]
    for plot in plots:
        lines += [f"![{plot.stem.replace('_', ' ')}]({plot.name})", ""]
    lines += [
        "## How these numbers are measured",
        "",
        "- **TTFT**: from sending the request to the first streamed chunk that carries generated text "
        "(`delta.reasoning_content`, `delta.reasoning` or `delta.content`); a role-only first chunk does not count.",
        "- **ITL**: every gap between consecutive text chunks. **E2E**: send to the last text chunk.",
        "- **TPOT**: (E2E − TTFT) / (output tokens − 1), for requests with more than one output token.",
        "- **Output tokens**: `usage.completion_tokens` from the stream's final chunk (`stream_options.include_usage`).",
        "- **Throughput**: completed requests and their tokens divided by the level's duration "
        "(first send to last response). **Goodput**: completed requests meeting every SLO, per second.",
        "- **Steady window**: from when the requests in flight first reach the steady level (the concurrency "
        "of a closed loop; for an open loop, the time-weighted median in flight between the first and last "
        "send) to when the last request is sent; ramp-up and drain are left out, as ML.ENERGY measures.",
        "- **Tokens per joule**: output tokens received in the steady window divided by the joules the "
        "workers' cumulative energy counters grew by in it (counters sampled every "
        f"{results.get('energy_interval_s', 0.5):g} s and interpolated at the window's edges).",
        "",
    ]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines))
    return path


def write_all(out_dir: Path, results: dict, records_by_run: Sequence[Sequence[RequestRecord]]) -> list[Path]:
    """Write everything; returns the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [write_results(out_dir, results), write_requests(out_dir, [r for recs in records_by_run for r in recs])]
    plots = make_plots(out_dir, results, records_by_run)
    written += plots
    written.append(write_report(out_dir, results, plots))
    return written
