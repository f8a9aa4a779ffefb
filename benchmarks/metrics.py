"""The numbers a benchmark reports, as plain functions of what was measured.

Definitions (the report repeats them):

* TTFT: send to the first chunk carrying generated text (reasoning or answer).
* ITL: every gap between consecutive text chunks of a request.
* E2EL: send to the last text chunk.
* TPOT: (E2EL - TTFT) / (output tokens - 1), for requests with more than one
  output token; as in `vllm bench serve`, a one-token request counts as
  TPOT 0 when judged against an SLO.
* Goodput: completed requests that meet every SLO given, per second of the
  run's duration.
* Steady window (for energy): the time the load holds its steady level, as
  ML.ENERGY measures: from when the number of requests in flight first
  reaches the steady level, to when the last request is sent (after that the
  load only drains). The steady level is the concurrency for a closed loop,
  and for an open loop the time-weighted median of requests in flight
  between the first and the last send.
* Tokens per joule: output tokens received in the steady window divided by
  the energy the workers' counters grew by in that window. A request's
  output tokens are spread evenly over its text chunks to place them in
  time (exact when each chunk carries one token, as vLLM streams).
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Sequence

from benchmarks.client import RequestRecord

PERCENTILES = (50.0, 90.0, 99.0)
LATENCY_METRICS = ("ttft", "tpot", "itl", "e2el")
SLO_KEYS = ("ttft_ms", "tpot_ms", "e2el_ms")


def percentile(values: Sequence[float], p: float) -> float:
    """The p-th percentile with linear interpolation between closest ranks (numpy's default)."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * p / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _p_word(p: float) -> str:
    return str(int(p)) if int(p) == p else str(p)


def distribution_stats(name: str, values_s: Sequence[float], percentiles: Iterable[float] = PERCENTILES) -> dict:
    """`mean_<name>_ms`, `median_…`, `std_…`, `p<P>_…` (population std, like numpy); None when empty."""
    values_ms = [v * 1000.0 for v in values_s]
    stats: dict[str, float | None] = {
        f"mean_{name}_ms": statistics.fmean(values_ms) if values_ms else None,
        f"median_{name}_ms": statistics.median(values_ms) if values_ms else None,
        f"std_{name}_ms": statistics.pstdev(values_ms) if values_ms else None,
    }
    for p in percentiles:
        stats[f"p{_p_word(p)}_{name}_ms"] = percentile(values_ms, p) if values_ms else None
    return stats


def request_tpot(record: RequestRecord) -> float | None:
    """Seconds per output token after the first; None for one-token outputs."""
    if record.ttft_s is None or record.e2el_s is None or record.output_tokens <= 1:
        return None
    return (record.e2el_s - record.ttft_s) / (record.output_tokens - 1)


def meets_slo(record: RequestRecord, slo: dict[str, float]) -> bool:
    """Whether a completed request meets every SLO (milliseconds) given."""
    if not record.success:
        return False
    checks = {
        "ttft_ms": record.ttft_s,
        "tpot_ms": request_tpot(record) or 0.0,  # one-token requests: TPOT 0
        "e2el_ms": record.e2el_s,
    }
    return all(checks[key] is not None and checks[key] * 1000.0 <= limit for key, limit in slo.items())


def in_flight_timeline(intervals: Sequence[tuple[float, float]]) -> list[tuple[float, int]]:
    """Steps (time, requests in flight from then on) for (start, end) intervals."""
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    steps: list[tuple[float, int]] = []
    level = 0
    for t, change in events:
        level += change
        if steps and steps[-1][0] == t:
            steps[-1] = (t, level)
        else:
            steps.append((t, level))
    return steps


def _time_weighted_median(steps: list[tuple[float, int]], t0: float, t1: float) -> float:
    """Median in-flight level over [t0, t1], weighting each level by how long it held."""
    durations: Counter[int] = Counter()
    for (t, level), (t_next, _) in zip(steps, steps[1:] + [(math.inf, 0)]):
        lo, hi = max(t, t0), min(t_next, t1)
        if hi > lo:
            durations[level] += hi - lo
    total = sum(durations.values())
    if total <= 0:
        return 0.0
    acc = 0.0
    for level in sorted(durations):
        acc += durations[level]
        if acc >= total / 2:
            return float(level)
    return float(max(durations))


@dataclass
class Window:
    start_s: float
    end_s: float
    steady_level: float
    kind: str  # "steady", or "whole_run" when no steady part could be found
    note: str = ""

    @property
    def length_s(self) -> float:
        return self.end_s - self.start_s

    def to_json(self) -> dict:
        return {
            "start_s": round(self.start_s, 6),
            "end_s": round(self.end_s, 6),
            "length_s": round(self.length_s, 6),
            "steady_level": self.steady_level,
            "kind": self.kind,
            "note": self.note,
        }


def steady_window(intervals: Sequence[tuple[float, float]], concurrency: int | None = None) -> Window | None:
    """The steady window of a run whose requests occupied the given (start, end) intervals.

    Falls back to the whole run (first send to last end) when the load never
    held a steady level (e.g. a single request); None for no requests.
    """
    if not intervals:
        return None
    starts = sorted(s for s, _ in intervals)
    first_send, last_send = starts[0], starts[-1]
    last_end = max(e for _, e in intervals)
    steps = in_flight_timeline(intervals)
    if concurrency is not None:
        level = float(min(concurrency, len(intervals)))
    else:
        level = max(1.0, _time_weighted_median(steps, first_send, last_send))
    reached = next((t for t, n in steps if n >= level), None)
    if reached is not None and last_send > reached:
        return Window(reached, last_send, level, "steady")
    return Window(
        first_send,
        last_end,
        level,
        "whole_run",
        "the load never held a steady level before the last request was sent; energy covers the whole run",
    )


def unwrap_counter(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """A cumulative counter made monotone across resets.

    An energy counter that goes down was reset (engine or agent restarted)
    and counts again from zero, so everything counted before the reset is
    carried over.
    """
    out: list[tuple[float, float]] = []
    carried = 0.0
    previous: float | None = None
    for t, value in sorted(points):
        if previous is not None and value < previous:
            carried += previous
        previous = value
        out.append((t, carried + value))
    return out


def counter_at(points: Sequence[tuple[float, float]], t: float) -> float:
    """The counter's value at time t, interpolated between samples and held
    flat outside them (before a worker was first seen, after it was last seen)."""
    if not points:
        raise ValueError("no samples")
    if t <= points[0][0]:
        return points[0][1]
    if t >= points[-1][0]:
        return points[-1][1]
    for (ta, va), (tb, vb) in zip(points, points[1:]):
        if ta <= t <= tb:
            if tb == ta:
                return vb
            return va + (vb - va) * (t - ta) / (tb - ta)
    return points[-1][1]  # unreachable for sorted points


def energy_between(points: Sequence[tuple[float, float]], t0: float, t1: float) -> float:
    """Joules a cumulative counter (samples of (time, joules)) grew by over [t0, t1]."""
    monotone = unwrap_counter(points)
    return counter_at(monotone, t1) - counter_at(monotone, t0)


def tokens_between(records: Iterable[RequestRecord], t0: float, t1: float) -> float:
    """Output tokens whose chunks arrived in [t0, t1) (run-relative seconds)."""
    total = 0.0
    for record in records:
        times = record.token_times_s
        if not times:
            continue
        per_chunk = record.output_tokens / len(times)
        inside = sum(1 for t in times if t0 <= record.start_s + t < t1)
        total += inside * per_chunk
    return total


def max_output_tokens_per_s(records: Sequence[RequestRecord]) -> float:
    """The most output tokens received in any one-second bucket of the run."""
    buckets: Counter[int] = Counter()
    for record in records:
        times = record.token_times_s
        if not times:
            continue
        per_chunk = record.output_tokens / len(times)
        for t in times:
            buckets[int(math.floor(record.start_s + t))] += per_chunk
    return max(buckets.values(), default=0.0)


def summarize(
    records: Sequence[RequestRecord],
    duration_s: float,
    slo: dict[str, float] | None = None,
    percentiles: Iterable[float] = PERCENTILES,
) -> dict:
    """The latency and throughput summary of one run, named as `vllm bench serve` names it.

    Requests cut short by an interrupt count neither as completed nor failed.
    """
    percentiles = tuple(percentiles)
    finished = [r for r in records if r.error_kind != "interrupted"]
    done = [r for r in finished if r.success]
    failed = [r for r in finished if not r.success]
    total_input = sum(r.prompt_tokens if r.prompt_tokens is not None else r.input_len for r in done)
    total_output = sum(r.output_tokens for r in done)
    ttfts = [r.ttft_s for r in done if r.ttft_s is not None]
    tpots = [t for t in (request_tpot(r) for r in done) if t is not None]
    itls = [gap for r in done for gap in r.itls_s]
    e2els = [r.e2el_s for r in done if r.e2el_s is not None]
    good = sum(1 for r in done if meets_slo(r, slo)) if slo else None
    per_s = (lambda x: x / duration_s) if duration_s > 0 else (lambda x: 0.0)
    steps = in_flight_timeline([(r.start_s, r.end_s) for r in records])

    summary = {
        "duration": duration_s,
        "completed": len(done),
        "failed": len(failed),
        "total_input_tokens": total_input,
        "total_output_tokens": total_output,
        "request_throughput": per_s(len(done)),
        "request_goodput": per_s(good) if good is not None else None,
        "good_requests": good,
        "output_throughput": per_s(total_output),
        "total_token_throughput": per_s(total_input + total_output),
        "max_output_tokens_per_s": max_output_tokens_per_s(done),
        "max_concurrent_requests": max((n for _, n in steps), default=0),
    }
    for name, values in zip(LATENCY_METRICS, (ttfts, tpots, itls, e2els)):
        summary.update(distribution_stats(name, values, percentiles))
    summary["failures"] = dict(Counter(r.error_kind for r in failed))
    summary["output_tokens_from"] = sorted({r.output_tokens_from for r in done})
    return summary
