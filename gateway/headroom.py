"""Whether a worker can take one more request, and how fast it would then decode.

Load is counted in KV tokens, not requests: a reasoning request holds its
prompt plus thousands of output tokens in the KV cache for minutes, so two
workers with the same request count can be nowhere near equally full. All
capacity and speed figures come from each worker's own fields (engine report,
GPU profile, measurements), so an H20 and an H100 are never weighed alike.
"""

from __future__ import annotations

from typing import Iterable

from gateway.fleet import READY, RouteRequest, Worker

DEFAULT_KV_THRESHOLD = 0.9
# A worker whose last heartbeat is older than this is treated as gone: its
# engine-reported load is stale and it may already have been reclaimed.
DEFAULT_HEARTBEAT_TTL_S = 15.0


def has_headroom(worker: Worker, request: RouteRequest, *, kv_threshold: float = DEFAULT_KV_THRESHOLD) -> bool:
    """True when `worker` can take `request` now without exceeding its capacity."""
    if worker.reserved_requests >= worker.max_num_seqs:
        return False
    capacity = worker.kv_capacity_tokens
    if capacity > 0 and worker.reserved_tokens + request.reserved_tokens > capacity:
        return False
    # The engine's own view covers load that is not ours (migrated streams,
    # requests sent to the engine directly).
    return worker.kv_usage < kv_threshold


def kv_tokens_held(worker: Worker) -> int:
    """KV tokens the worker holds or has promised: our reservations, or what
    the engine reports when that is more."""
    reported = int(worker.kv_usage * worker.kv_capacity_tokens) if worker.kv_capacity_tokens > 0 else 0
    return max(worker.reserved_tokens, reported)


def predicted_tpot_ms(worker: Worker, extra_request: RouteRequest | None = None) -> float | None:
    """Predicted time per output token (ms), with `extra_request` added if given.

    Decode is memory-bound, so a step costs a fixed part (reading the weights)
    plus a part growing with the KV tokens read. Without that model we fall
    back to the TPOT measured on the worker's own streams; None if neither.
    """
    if worker.tpot_base_ms is not None:
        kv_tokens = kv_tokens_held(worker)
        if extra_request is not None:
            kv_tokens += extra_request.reserved_tokens
        per_1k = worker.tpot_ms_per_1k_kv or 0.0
        return worker.tpot_base_ms + per_1k * kv_tokens / 1000
    return worker.tpot_ms


def fill_fraction(worker: Worker) -> float:
    """How full the worker is relative to its own capacity, 0..1 (or more)."""
    by_seqs = worker.reserved_requests / worker.max_num_seqs if worker.max_num_seqs > 0 else 1.0
    if worker.kv_capacity_tokens > 0:
        return max(by_seqs, kv_tokens_held(worker) / worker.kv_capacity_tokens)
    return by_seqs


def is_fresh(worker: Worker, now: float, heartbeat_ttl: float = DEFAULT_HEARTBEAT_TTL_S) -> bool:
    return now - worker.last_heartbeat <= heartbeat_ttl


def candidates(
    workers: Iterable[Worker],
    request: RouteRequest,
    now: float,
    *,
    heartbeat_ttl: float = DEFAULT_HEARTBEAT_TTL_S,
    kv_threshold: float = DEFAULT_KV_THRESHOLD,
) -> list[Worker]:
    """The workers a policy may pick for `request`: ready, serving its model,
    alive, inside its allowed centers (data residency), with headroom."""
    allowed = set(request.allowed_centers)
    return [
        worker
        for worker in workers
        if worker.state == READY
        and worker.model == request.model
        and is_fresh(worker, now, heartbeat_ttl)
        and (not allowed or worker.center in allowed)
        and has_headroom(worker, request, kv_threshold=kv_threshold)
    ]
