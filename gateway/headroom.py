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
    """True when `worker` can take `request` now without exceeding its capacity.

    Capacity counts every request at its full size (prompt + expected output),
    not its average: a worker must never be promised more KV than it has.
    """
    if worker.reserved_requests >= worker.max_num_seqs:
        return False
    capacity = worker.kv_capacity_tokens
    if capacity > 0 and worker.reserved_tokens + request.reserved_tokens > capacity:
        return False
    # The engine's own view covers load that is not ours (migrated streams,
    # requests sent to the engine directly).
    return worker.kv_usage < kv_threshold


def kv_tokens_held(worker: Worker) -> int:
    """KV tokens the worker holds on average while it serves what it has now.

    Each reservation counts its prompt plus half its expected output: an answer
    grows from nothing to its full length, so over its life it holds about half
    (counting the full length, as the capacity check must, would predict ~2x the
    KV a busy worker really reads). The engine's own report wins when it is more:
    it covers load that is not ours (migrated streams, requests sent to the
    engine directly), and in steady state its requests are on average halfway too.
    """
    reported = int(worker.kv_usage * worker.kv_capacity_tokens) if worker.kv_capacity_tokens > 0 else 0
    # A record written before the average was tracked has only the full sizes.
    reserved = worker.reserved_average_kv_tokens or worker.reserved_tokens
    return max(reserved, reported)


def sequences_held(worker: Worker) -> int:
    """Sequences in the worker's batch: our reservations, or the engine's count when more."""
    return max(worker.reserved_requests, worker.running)


def predicted_tpot_ms(worker: Worker, extra_request: RouteRequest | None = None) -> float | None:
    """Predicted time per output token (ms), with `extra_request` added if given.

    A decode step reads the weights once (a fixed part), reads every sequence's
    KV cache (a part growing with the KV tokens held), and computes one token per
    sequence (the GEMMs and sampling grow with the batch: a part per sequence,
    which is what limits a GPU with little compute for its bandwidth, like the
    H20). Prompts share those steps: as answers finish, new ones arrive and
    their prompts are computed alongside the decodes, P/L prompt tokens per
    decoded token for answers of L tokens behind prompts of P, each costing
    about what a sequence's decode token does. Negligible for R1 (prompts of
    hundreds, answers of thousands), not for short answers behind long prompts.
    Without that model we fall back to the TPOT measured on the worker's own
    streams; None if neither.
    """
    if worker.tpot_base_ms is None:
        return worker.tpot_ms
    kv_tokens, sequences = kv_tokens_held(worker), sequences_held(worker)
    prompt_tokens, output_tokens = reserved_prompt_and_output(worker)
    if extra_request is not None:
        kv_tokens += extra_request.average_kv_tokens
        sequences += 1
        prompt_tokens += extra_request.prompt_tokens
        output_tokens += extra_request.max_output_tokens
    prefill_per_step = sequences * prompt_tokens / output_tokens if output_tokens > 0 else 0.0
    per_1k = worker.tpot_ms_per_1k_kv or 0.0
    per_seq = worker.tpot_ms_per_seq or 0.0
    return worker.tpot_base_ms + per_1k * kv_tokens / 1000 + per_seq * (sequences + prefill_per_step)


def reserved_prompt_and_output(worker: Worker) -> tuple[int, int]:
    """Prompt and output tokens of the worker's reservations, summed. Each counts
    prompt + output in full (`reserved_tokens`) and prompt + output / 2 on average
    (`reserved_average_kv_tokens`), so the two sums give both apart; (0, 0) for a
    record that does not track the average."""
    if not worker.reserved_average_kv_tokens:
        return 0, 0
    output = max(0, 2 * (worker.reserved_tokens - worker.reserved_average_kv_tokens))
    return max(0, worker.reserved_tokens - output), output


def fill_fraction(worker: Worker) -> float:
    """How full the worker is relative to its own capacity, 0..1 (or more): by
    sequences, or by the KV it holds on average (`kv_tokens_held`)."""
    by_seqs = worker.reserved_requests / worker.max_num_seqs if worker.max_num_seqs > 0 else 1.0
    if worker.kv_capacity_tokens > 0:
        return max(by_seqs, kv_tokens_held(worker) / worker.kv_capacity_tokens)
    return by_seqs


def expected_wait_ms(workers: Iterable[Worker], request: RouteRequest, ahead: int = 0) -> float | None:
    """How long `request` would wait for a slot on one of `workers` (ms), with
    `ahead` requests in line before it: 0 if a worker has headroom for each of
    them and for it, else until enough of their sequences are expected to
    finish; None if there is no worker to wait for, or none whose speed is known.

    A worker running n answers at its predicted TPOT finishes one every
    (answer length x TPOT) / n on average (they started at different times), so
    slots free at the sum of those rates, and the request's turn comes when the
    (ahead + 1)-th has. Counting the line matters: a busy worker frees a slot
    every few milliseconds, but a request with a hundred ahead of it waits for a
    hundred of them. Answer length: what its reservations expect on average, or
    this request's expectation if unknown.
    """
    workers = list(workers)
    slots_needed = ahead + 1 - sum(1 for w in workers if has_headroom(w, request))
    if slots_needed <= 0:
        return 0.0
    slots_per_ms = 0.0
    for worker in workers:
        tpot = predicted_tpot_ms(worker)
        if tpot is None:
            continue
        held = worker.reserved_requests
        answer_tokens = worker.reserved_tokens / held if held and worker.reserved_tokens else request.max_output_tokens
        slots_per_ms += max(1, sequences_held(worker)) / (tpot * max(1.0, answer_tokens))
    return slots_needed / slots_per_ms if slots_per_ms > 0 else None


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
