"""Driving one load level: send the requests on schedule, collect their records.

A level is either open loop (arrivals at a rate, see `arrivals`) or closed
loop (a fixed number of clients). Setting `stop` ends the level early:
nothing more is sent and requests in flight are cancelled, their records
marked `interrupted`; what finished before stays measured.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import httpx

from benchmarks.arrivals import arrival_offsets, describe
from benchmarks.client import RequestRecord, request_body, stream_chat
from benchmarks.workloads import BenchRequest


@dataclass(frozen=True)
class LoadLevel:
    rate: float | None = None  # requests per second (open loop); inf = all at once
    burstiness: float = 1.0
    concurrency: int | None = None  # closed loop

    @property
    def label(self) -> str:
        return describe(self.rate, self.burstiness, self.concurrency)


@dataclass
class LevelResult:
    level: LoadLevel
    records: list[RequestRecord]  # the requests that were sent, in send order
    started_s: float  # on the benchmark's clock
    duration_s: float  # first send to last request finished (or the stop)
    interrupted: bool


@dataclass
class Target:
    """Where and how to send requests."""

    client: httpx.AsyncClient
    url: str  # .../v1/chat/completions
    headers: dict
    model: str
    ignore_eos: bool = True


async def _send(target: Target, request: BenchRequest, record: RequestRecord, t0: float, done: Callable[[], None]) -> None:
    body = request_body(target.model, request, target.ignore_eos)
    await stream_chat(target.client, target.url, target.headers, body, record, t0)
    done()


async def _cancel_all(tasks: list[asyncio.Task]) -> None:
    """Cancel what is still running and wait, so every record is final before we return."""
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def _open_loop(target, requests, level, seed, t0, records, done) -> None:
    offsets = arrival_offsets(len(requests), level.rate, level.burstiness, seed)
    start = time.perf_counter()
    tasks: list[asyncio.Task] = []
    try:
        for request, offset in zip(requests, offsets):
            delay = start + offset - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            record = RequestRecord(index=request.index, input_len=request.input_len, max_tokens=request.output_len)
            records.append(record)
            tasks.append(asyncio.create_task(_send(target, request, record, t0, done)))
        await asyncio.gather(*tasks)
    finally:
        await _cancel_all(tasks)


async def _closed_loop(target, requests, level, t0, records, done) -> None:
    pending = iter(requests)

    async def one_client() -> None:
        for request in pending:  # shared: each request goes to exactly one client
            record = RequestRecord(index=request.index, input_len=request.input_len, max_tokens=request.output_len)
            records.append(record)
            await _send(target, request, record, t0, done)

    clients = [asyncio.create_task(one_client()) for _ in range(min(level.concurrency, len(requests)))]
    try:
        await asyncio.gather(*clients)
    finally:
        await _cancel_all(clients)


async def run_level(
    target: Target,
    requests: Sequence[BenchRequest],
    level: LoadLevel,
    t0: float,
    stop: asyncio.Event,
    seed: int = 0,
    on_done: Callable[[], None] = lambda: None,
    run_index: int = 0,
) -> LevelResult:
    """Run one load level; `t0` is the benchmark's clock origin (time.perf_counter())."""
    records: list[RequestRecord] = []
    started = time.perf_counter()
    if level.concurrency is not None:
        work = asyncio.create_task(_closed_loop(target, requests, level, t0, records, on_done))
    else:
        work = asyncio.create_task(_open_loop(target, requests, level, seed, t0, records, on_done))
    stopped = asyncio.create_task(stop.wait())
    await asyncio.wait({work, stopped}, return_when=asyncio.FIRST_COMPLETED)
    interrupted = not work.done()
    if interrupted:
        work.cancel()
    stopped.cancel()
    await asyncio.gather(work, stopped, return_exceptions=True)
    if not work.cancelled() and work.exception() is not None:
        raise work.exception()
    for record in records:
        record.run = run_index
    return LevelResult(
        level=level,
        records=records,
        started_s=started - t0,
        duration_s=time.perf_counter() - started,
        interrupted=interrupted,
    )
