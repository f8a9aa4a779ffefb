"""Prefix affinity: the same prompt prefix goes to the same worker, so the
engine's prefix cache is reused, unless that worker is overloaded.

The prefix is cut into fixed character blocks and hashed as a chain (each
block's hash covers all blocks before it), an approximation of the token
blocks engines cache. The chain hash picks a worker by rendezvous hashing,
weighted by KV capacity: every gateway computes the same answer from the
same fleet with no shared state, and a worker joining or leaving moves only
the prefixes it wins or held.
"""

from __future__ import annotations

import hashlib
import math
import random
from typing import Sequence

from gateway.fleet import RouteRequest, Worker
from gateway.policies.least_load import least_loaded

BLOCK_CHARS = 256
# Route on at most this many leading blocks (system prompt and first turns):
# later text does not change the worker as a conversation grows.
MAX_BLOCKS = 4


def _digest(data: bytes) -> bytes:
    # Not Python's hash(): it is salted per process, and every gateway
    # process must map a prefix to the same worker.
    return hashlib.blake2b(data, digest_size=16).digest()


def prefix_hash(text: str, *, block_chars: int = BLOCK_CHARS, max_blocks: int = MAX_BLOCKS) -> bytes:
    """Chain hash over the first `max_blocks` blocks of `text`."""
    chain = b""
    for start in range(0, min(len(text), block_chars * max_blocks), block_chars):
        chain = _digest(chain + text[start : start + block_chars].encode())
    return chain


def _rendezvous_score(key: bytes, worker: Worker, weight: float) -> float:
    value = int.from_bytes(_digest(key + worker.id.encode())[:8], "big")
    unit = (value + 0.5) / 2**64  # uniform in (0, 1)
    return -weight / math.log(unit)


def rendezvous(key: bytes, workers: Sequence[Worker]) -> Worker:
    """The worker that wins `key`; bigger GPUs (by KV capacity) win
    proportionally more keys when every worker reports its capacity."""
    weighted = all(worker.kv_capacity_tokens > 0 for worker in workers)
    return max(
        workers,
        key=lambda w: _rendezvous_score(key, w, w.kv_capacity_tokens if weighted else 1.0),
    )


class PrefixAffinity:
    name = "prefix_affinity"

    def __init__(
        self,
        rng: random.Random | None = None,
        *,
        balance_abs_threshold: int = 8,
        balance_rel_threshold: float = 1.5,
        block_chars: int = BLOCK_CHARS,
        max_blocks: int = MAX_BLOCKS,
    ) -> None:
        self._rng = rng or random.Random()
        self.balance_abs_threshold = balance_abs_threshold
        self.balance_rel_threshold = balance_rel_threshold
        self.block_chars = block_chars
        self.max_blocks = max_blocks

    def choose(self, request: RouteRequest, candidates: Sequence[Worker]) -> Worker | None:
        if not candidates:
            return None
        if not request.prefix_key:
            return least_loaded(candidates, self._rng)
        key = prefix_hash(request.prefix_key, block_chars=self.block_chars, max_blocks=self.max_blocks)
        chosen = rendezvous(key, candidates)
        if self._overloaded(chosen, candidates):
            # A hot prefix must not pile onto one GPU: losing the cache hit
            # costs one prefill, a queue costs every request behind it.
            return least_loaded(candidates, self._rng)
        return chosen

    def _overloaded(self, chosen: Worker, candidates: Sequence[Worker]) -> bool:
        lowest = min(worker.queue_depth for worker in candidates)
        load = chosen.queue_depth
        return load - lowest > self.balance_abs_threshold and load > lowest * self.balance_rel_threshold
