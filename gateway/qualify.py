"""Qualification: a newly enrolled worker proves it can serve before it gets traffic.

When a worker first reports `ready`, the gateway keeps it in `starting` and
probes its engine directly (with the engine's own API key, which only gateways
hold): a warm-up completion, then batches of 1, 4 and 8 concurrent short
completions with `ignore_eos` and a fixed `max_tokens`, each batch run twice
and the faster run kept (a busy host only ever adds time). Each batch gives
time to first token, time per output token and throughput. A worker whose engine
does not answer properly, or decodes far slower than the GPU profile it
declared, is flagged: it stays in `starting` until an operator clears it
(`idlegrid admin clear WORKER`). Otherwise it becomes `ready`, and its
measured speed feeds the scheduler's estimate (`gateway.headroom`): where the
worker declared no speed model, TPOT over batch size gives one, a fixed cost
per decode step plus a cost per sequence (`fit_speed`).

Times are wall-clock, as the gateway sees them. A simulated engine run with
`--time-scale X` decodes about X times faster than its profile declares, so it
is only flagged when it is slow even by the wall clock.

Exactly one gateway probes a worker: it holds a short Redis lock that it keeps
renewing while the probe runs, so if that gateway dies another one takes over
on a later heartbeat.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from dataclasses import dataclass
from typing import Any

import httpx
from redis.asyncio import Redis

from gateway import keys
from gateway.fleet import READY, STARTING, Worker

log = logging.getLogger("idlegrid.qualify")

PASSED = "passed"
FLAGGED = "flagged"
CLEARED = "cleared"

PROMPT = "Qualification probe. Count slowly from one to twenty, one number per line."
LOCK_TTL_S = 10.0  # a dead gateway's probe is taken over this long after it died


@dataclass(frozen=True)
class ProbeSettings:
    batch_sizes: tuple[int, ...] = (1, 4, 8)
    max_tokens: int = 32
    repeats: int = 2  # runs of each batch size; the fastest is kept
    timeout_s: float = 60.0  # the whole probe; a hung engine is flagged after this
    slow_factor: float = 3.0  # flag when measured TPOT > slow_factor × declared tpot_base_ms

    @classmethod
    def from_config(cls, config: Any) -> ProbeSettings:
        """Settings from a GatewayConfig; fields it lacks keep their defaults."""
        default = cls()
        sizes = getattr(config, "qualify_batch_sizes", default.batch_sizes)
        return cls(
            batch_sizes=tuple(int(b) for b in sizes) or default.batch_sizes,
            max_tokens=int(getattr(config, "qualify_max_tokens", default.max_tokens)),
            repeats=max(1, int(getattr(config, "qualify_repeats", default.repeats))),
            timeout_s=float(getattr(config, "qualify_timeout_s", default.timeout_s)),
            slow_factor=float(getattr(config, "qualify_slow_factor", default.slow_factor)),
        )


def enabled(config: Any) -> bool:
    return bool(getattr(config, "qualify", True))


def lock_key(worker_id: str) -> str:
    # Same hash tag as the worker's record, so it lives in the same Cluster slot.
    return f"{keys.PREFIX}:qualify_lock:{worker_id}"


class ProbeFailed(Exception):
    """The engine did not answer the probe properly; the message says how."""


# -- measuring -----------------------------------------------------------------


@dataclass
class StreamTiming:
    ttft_s: float
    tpot_s: float | None  # None for a one-token answer
    tokens: int
    prompt_tokens: int


def _engine_error(response: httpx.Response, body: bytes) -> str:
    try:
        error = json.loads(body)["error"]
        message = error["message"] if isinstance(error, dict) else error
    except (ValueError, KeyError, TypeError):
        message = body[:200].decode(errors="replace") or response.reason_phrase
    return f"engine answered {response.status_code}: {message}"


async def _one_stream(client: httpx.AsyncClient, worker: Worker, max_tokens: int) -> StreamTiming:
    """One streamed completion; times its first token and the tokens after it."""
    body = {
        "model": worker.model,
        "prompt": PROMPT,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,  # a fixed answer length, whatever the model writes
        "stream": True,
        "stream_options": {"include_usage": True},
        "return_token_ids": True,  # counts tokens whose text is empty (partial UTF-8)
    }
    started = time.perf_counter()
    first = last = None
    counted = 0
    usage: dict[str, Any] = {}
    async with client.stream("POST", f"{worker.engine_url}/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise ProbeFailed(_engine_error(response, await response.aread()))
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            try:
                chunk = json.loads(data)
            except ValueError:
                raise ProbeFailed(f"engine sent a stream event that is not JSON: {data[:80]!r}") from None
            if "error" in chunk:
                raise ProbeFailed(f"engine sent an error event: {str(chunk['error'])[:200]}")
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices") or []:
                ids = choice.get("token_ids")
                n = len(ids) if ids is not None else int(bool(choice.get("text")))
                if n:
                    last = time.perf_counter()
                    first = first or last
                    counted += n
    tokens = int(usage.get("completion_tokens") or counted)
    if first is None or tokens == 0:
        raise ProbeFailed("engine answered with no tokens")
    if tokens != max_tokens:
        raise ProbeFailed(f"engine returned {tokens} of {max_tokens} tokens despite ignore_eos")
    tpot = (last - first) / (tokens - 1) if tokens > 1 else None
    return StreamTiming(first - started, tpot, tokens, int(usage.get("prompt_tokens") or 0))


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


async def _batch(client: httpx.AsyncClient, worker: Worker, size: int, max_tokens: int) -> tuple[dict[str, Any], list[StreamTiming]]:
    started = time.perf_counter()
    streams = await asyncio.gather(*(_one_stream(client, worker, max_tokens) for _ in range(size)))
    wall = time.perf_counter() - started
    tpots = [s.tpot_s for s in streams if s.tpot_s is not None]
    summary = {
        "batch": size,
        "ttft_ms": round(1000 * sum(s.ttft_s for s in streams) / size, 3),
        "tpot_ms": round(1000 * _median(tpots), 4) if tpots else None,
        "tokens_per_s": round(sum(s.tokens for s in streams) / wall, 1),
    }
    return summary, streams


def fit_speed(points: list[tuple[float, float]]) -> tuple[float, float]:
    """(tpot_base_ms, tpot_ms_per_seq) from (batch size, TPOT ms) points, by least
    squares: each sequence in the batch adds its share of the GEMMs and sampling to
    every decode step. A slope the noise makes negative is taken as flat.

    The probe cannot also fit a cost per KV token (`tpot_ms_per_1k_kv`): its streams
    all hold the same few dozen tokens, so the KV held grows in lockstep with the
    batch, and a KV slope fitted here would be the per-sequence cost under another
    name, charged again for every long context. Reading a few dozen tokens per
    sequence is negligible next to computing one, so the slope is per sequence."""
    n = len(points)
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    var = sum((x - mean_x) ** 2 for x, _ in points)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / var if var > 0 else 0.0
    if slope <= 0:
        return min(y for _, y in points), 0.0
    base = mean_y - slope * mean_x
    if base <= 0:  # the line would predict a free step for an empty batch: keep the fastest seen
        return min(y for _, y in points), slope
    return base, slope


async def probe(worker: Worker, settings: ProbeSettings) -> dict[str, Any]:
    """Measure `worker`'s engine; the verdict and numbers, as stored in its record."""
    started = time.perf_counter()
    result: dict[str, Any] = {"status": FLAGGED, "reason": "", "declared_tpot_base_ms": worker.tpot_base_ms}
    headers = {"Authorization": f"Bearer {worker.engine_api_key}"} if worker.engine_api_key else {}
    timeout = httpx.Timeout(settings.timeout_s, connect=5.0)
    try:
        async with httpx.AsyncClient(headers=headers, timeout=timeout) as client:
            measured = await asyncio.wait_for(_measure(client, worker, settings), settings.timeout_s)
    except ProbeFailed as exc:
        result["reason"] = f"probe failed: {exc}"
    except asyncio.TimeoutError:
        result["reason"] = f"probe failed: no complete answer within {settings.timeout_s:g} s"
    except httpx.HTTPError as exc:
        result["reason"] = f"probe failed: engine at {worker.engine_url} unreachable ({type(exc).__name__}: {exc})"
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        result["reason"] = f"probe failed: engine's answer is not vLLM's OpenAI format ({type(exc).__name__}: {exc})"
    else:
        result.update(measured)
        result.update(_verdict(worker, measured, settings))
    result["probe_s"] = round(time.perf_counter() - started, 3)
    result["at"] = time.time()
    return result


async def _measure(client: httpx.AsyncClient, worker: Worker, settings: ProbeSettings) -> dict[str, Any]:
    # The first request pays one-off costs (connection, kernels, caches): not measured.
    await _one_stream(client, worker, settings.max_tokens)
    batches: list[dict[str, Any]] = []
    tpots: list[float] = []
    points: list[tuple[float, float]] = []
    for size in settings.batch_sizes:
        runs = []
        for _ in range(settings.repeats):
            summary, streams = await _batch(client, worker, size, settings.max_tokens)
            tpots += [s.tpot_s for s in streams if s.tpot_s is not None]
            # Over the decode, each stream holds its prompt plus half its answer on average.
            summary["kv_tokens"] = round(sum(s.prompt_tokens + s.tokens / 2 for s in streams))
            runs.append(summary)
        # A stall on a shared host (another process on the core, a GC pause in the
        # reader) only ever adds time, so the fastest run is the engine's own speed;
        # on a 2-core host one slow run of 8 streams read 1.5x the per-sequence cost.
        summary = min(runs, key=lambda b: b["tpot_ms"] if b["tpot_ms"] is not None else float("inf"))
        batches.append(summary)
        if summary["tpot_ms"] is not None:
            points.append((size, summary["tpot_ms"]))
    out: dict[str, Any] = {
        "ttft_ms": batches[0]["ttft_ms"],
        # The median over every probe stream: one stall on a busy host, or one burst of
        # tokens an engine sends at once after a stall, does not decide the verdict.
        "tpot_ms": round(1000 * _median(tpots), 4) if tpots else None,
        "tokens_per_s": max(b["tokens_per_s"] for b in batches),
        "batches": batches,
        "max_tokens": settings.max_tokens,
        "repeats": settings.repeats,
    }
    if points:
        base, per_seq = fit_speed(points)
        out["fit"] = {"tpot_base_ms": round(base, 4), "tpot_ms_per_seq": round(per_seq, 5)}
    return out


def _verdict(worker: Worker, measured: dict[str, Any], settings: ProbeSettings) -> dict[str, Any]:
    sizes = ",".join(str(b["batch"]) for b in measured["batches"])
    passed = {"status": PASSED, "reason": f"answered {settings.max_tokens} tokens per stream at batch sizes {sizes}"}
    declared = worker.tpot_base_ms
    if not declared:
        return passed
    # Each batch against what the declared profile predicts for its size and the KV cache
    # it held; the median over batches, so one stalled or one bursty batch does not decide.
    # A simulated engine slowed below real time declares its GPU's speed in simulated
    # time: the wall-clock measurement is converted, as the gateway's distances are.
    # One sped up is judged by the wall clock: converted, the relay's own ~0.3 ms per
    # token would be magnified by the speed-up and read as a slow GPU.
    scale = min(1.0, worker.time_scale)
    ratios = [
        b["tpot_ms"] * scale / (declared + (worker.tpot_ms_per_1k_kv or 0.0) * b["kv_tokens"] / 1000
                        + (worker.tpot_ms_per_seq or 0.0) * b["batch"])
        for b in measured["batches"] if b["tpot_ms"] is not None
    ]
    if not ratios:
        return passed
    slowdown = _median(ratios)
    if slowdown > settings.slow_factor:
        reason = (f"decodes {slowdown:.1f}x slower than its declared GPU profile predicts ({measured['tpot_ms'] * scale:.2f} "
                  f"ms/token measured{'' if scale == 1 else ' in simulated time'}, {declared:.2f} ms/token declared at an empty cache; limit {settings.slow_factor:g}x)")
        return {"status": FLAGGED, "reason": reason, "slowdown": round(slowdown, 2)}
    return {**passed, "slowdown": round(slowdown, 2)}


# -- storing -------------------------------------------------------------------

# A worker that passed (or was cleared), says it is ready and is not cordoned
# by an operator becomes ready.
_ADMIT = """
local w = redis.call('HMGET', KEYS[1], 'state', 'reported_state', 'cordoned', 'qualified')
if w[1] == 'starting' and w[2] == 'ready' and w[3] ~= '1' and w[4] == '1' then
  redis.call('HSET', KEYS[1], 'state', 'ready')
  redis.call('HINCRBY', KEYS[2], KEYS[1], 1)
  return 1
end
return 0
"""

# A verdict lands in the worker's hash, then the worker is admitted if it may be.
# A worker revoked meanwhile is not brought back, and a probe that ends after an
# operator cleared the worker does not undo the clear.
STORE = """
-- KEYS: worker hash, worker versions; ARGV: outcome ('passed' | 'flagged' | 'cleared'), then field, value, ...
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if ARGV[1] ~= 'cleared' and redis.call('HGET', KEYS[1], 'qualified') == '1' then return 0 end
for i = 2, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
end
local w = redis.call('HMGET', KEYS[1], 'state', 'reported_state', 'cordoned', 'qualified')
if w[1] == 'starting' and w[2] == 'ready' and w[3] ~= '1' and w[4] == '1' then
  redis.call('HSET', KEYS[1], 'state', 'ready')
end
-- Gateways re-read only the worker records whose version moved.
redis.call('HINCRBY', KEYS[2], KEYS[1], 1)
return 1
"""


async def _store(redis: Redis, worker_id: str, outcome: str, fields: dict[str, str]) -> bool:
    args = [outcome]
    for name, value in fields.items():
        args += [name, value]
    return bool(await redis.eval(STORE, 2, keys.worker(worker_id), keys.WORKER_VERSIONS, *args))


def record_fields(worker: Worker, result: dict[str, Any]) -> dict[str, str]:
    """What a probe result changes in the worker's Redis hash."""
    passed = result["status"] == PASSED
    fields = {
        "qualification": json.dumps(result, separators=(",", ":")),
        "qualified": "1" if passed else "0",
        "flagged": "0" if passed else "1",
    }
    if result.get("tpot_ms") is not None:
        fields["tpot_ms"] = str(result["tpot_ms"])
    fit = result.get("fit")
    # A declared profile (simulated engines, operators who know their GPU) is kept;
    # otherwise the probe's fit is the scheduler's speed model.
    if passed and fit and fit["tpot_base_ms"] > 0 and worker.tpot_base_ms is None:
        fields["tpot_base_ms"] = str(fit["tpot_base_ms"])
        fields["tpot_ms_per_seq"] = str(fit["tpot_ms_per_seq"])
    return fields


async def clear(redis: Redis, worker_id: str) -> bool:
    """An operator vouches for a flagged (or still untested) worker: it may serve."""
    raw = await redis.hget(keys.worker(worker_id), "qualification")
    try:
        result = json.loads(raw) if raw else {}
    except ValueError:
        result = {}
    result.update({"status": CLEARED, "cleared_at": time.time()})
    fields = {"qualification": json.dumps(result, separators=(",", ":")), "qualified": "1", "flagged": "0"}
    return await _store(redis, worker_id, CLEARED, fields)


# -- the heartbeat hook ----------------------------------------------------------


async def admit_if_qualified(redis: Redis, worker_id: str) -> bool:
    """Ready for a worker whose probe passed while its heartbeat was being stored:
    that heartbeat read "not qualified yet" and wrote `starting` over the probe's `ready`."""
    return bool(await redis.eval(_ADMIT, 2, keys.worker(worker_id), keys.WORKER_VERSIONS))


_running: set[asyncio.Task] = set()  # probes in flight, kept from the garbage collector


async def gate(gw: Any, worker_id: str, reported: str) -> str:
    """The state to store for a worker that reports `reported`: `ready` only once it
    has qualified (or an operator cleared it). Starts its probe if nobody has."""
    if reported != READY:
        return reported
    qualified, flagged = await gw.redis.hmget(keys.worker(worker_id), "qualified", "flagged")
    if qualified == b"1":
        return READY
    if flagged == b"1":
        return STARTING
    if not enabled(gw.config):
        return READY
    await start(gw, worker_id)
    return STARTING


async def start(gw: Any, worker_id: str) -> bool:
    """Probe `worker_id` in the background unless some gateway already is."""
    holder = secrets.token_hex(8)  # only for a person reading Redis: which probe holds it
    if not await gw.redis.set(lock_key(worker_id), holder, nx=True, px=int(LOCK_TTL_S * 1000)):
        return False
    task = asyncio.create_task(_run(gw, worker_id))
    _running.add(task)
    task.add_done_callback(_running.discard)
    return True


async def _keep_lock(redis: Redis, worker_id: str) -> None:
    while True:
        await asyncio.sleep(LOCK_TTL_S / 3)
        await redis.pexpire(lock_key(worker_id), int(LOCK_TTL_S * 1000))


async def _run(gw: Any, worker_id: str) -> None:
    settings = ProbeSettings.from_config(gw.config)
    try:
        worker = await gw.registry.get(worker_id)
        if worker is None:
            return  # revoked or deregistered before we got to it
        gw.log.info("qualifying worker %s (%s on %s)", worker_id, worker.model, worker.gpu)
        keeper = asyncio.create_task(_keep_lock(gw.redis, worker_id))
        try:
            result = await probe(worker, settings)
        finally:
            keeper.cancel()
        stored = await _store(gw.redis, worker_id, result["status"], record_fields(worker, result))
        if not stored:
            return
        if result["status"] == PASSED:
            gw.log.info("worker %s qualified: TTFT %s ms, TPOT %s ms, up to %s tokens/s (%.2f s probe)",
                        worker_id, result["ttft_ms"], result["tpot_ms"], result["tokens_per_s"], result["probe_s"])
        else:
            gw.log.warning("worker %s flagged, kept out until `idlegrid admin clear %s`: %s",
                           worker_id, worker_id, result["reason"])
    except Exception:
        # Redis trouble: nothing stored, so a later heartbeat starts a new probe.
        gw.log.exception("qualification of worker %s did not finish", worker_id)
    finally:
        with contextlib.suppress(Exception):
            await gw.redis.delete(lock_key(worker_id))
