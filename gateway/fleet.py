"""What the gateway knows about one worker, and how a request asks for room on it.

`Worker` is a snapshot read from Redis (see `gateway.registry`); policies only
ever see snapshots and never talk to Redis themselves, so they are plain
functions of their input and easy to test on hand-built fleets.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Worker lifecycle. Only READY workers get new requests.
STARTING = "starting"
READY = "ready"
DRAINING = "draining"
SLEEPING = "sleeping"
WAKING = "waking"
GONE = "gone"
STATES = (STARTING, READY, DRAINING, SLEEPING, WAKING, GONE)


@dataclass
class Worker:
    id: str
    center: str
    model: str  # served model id, as in /v1/models
    engine_url: str
    gpu: str = "unknown"
    state: str = STARTING
    engine_api_key: str = ""
    engine_kind: str = "external"  # vllm | sim | external
    engine_pid: int | None = None
    max_num_seqs: int = 256
    kv_capacity_tokens: int = 0  # 0 = unknown
    # Gateway-side reservations (atomic in Redis, summed over all gateways).
    reserved_requests: int = 0
    reserved_tokens: int = 0  # prompt + expected output of each: the most KV they can grow to
    # Prompt + half the expected output of each: the KV they hold on average over
    # their lives, which is what decode speed depends on (0 = not tracked: use reserved_tokens).
    reserved_average_kv_tokens: int = 0
    # Engine-reported load, from the worker's heartbeat.
    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0  # 0..1
    power_w: float | None = None
    energy_j: float | None = None
    energy_source: str | None = None  # "nvml" | "modeled" | None (unknown)
    tpot_ms: float | None = None  # measured time per output token, from streams
    # Predicted decode step time: tpot ≈ tpot_base_ms + tpot_ms_per_1k_kv * (KV tokens held / 1000)
    # + tpot_ms_per_seq * sequences (reading the weights, reading the KV cache, each
    # sequence's share of the GEMMs and sampling). From the GPU/model profile
    # (simulated engines) or the qualification probe.
    tpot_base_ms: float | None = None
    tpot_ms_per_1k_kv: float | None = None
    tpot_ms_per_seq: float | None = None
    # Simulated seconds per wall second (a time-scaled simulated engine; 1 for real
    # ones): the speed model above is in simulated ms, so distances measured on the
    # wall clock are scaled by it to compare.
    time_scale: float = 1.0
    last_heartbeat: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def queue_depth(self) -> int:
        """Requests this worker holds or is about to hold."""
        return max(self.reserved_requests, self.running) + self.waiting


@dataclass
class RouteRequest:
    """What a policy may know about the request it is placing."""

    model: str
    prompt_tokens: int  # estimated
    max_output_tokens: int  # expected output tokens the reservation counts
    prefix_key: str = ""  # text the prefix-affinity policy hashes
    prompt_chars: int = 0  # the prompt's length in characters (0: given as token ids)
    center: str = ""  # the gateway's own center
    allowed_centers: tuple[str, ...] = ()  # empty = any
    api_key_id: str = ""
    # Round trip (ms) from the gateway to each center (gateway.distance), and how
    # long the request would wait for room in the gateway's own center (ms; None:
    # nothing to wait for there: no worker, or none whose speed is known). A
    # request leaves its center only when the wait saved is more than the round
    # trip added.
    center_rtt_ms: dict[str, float] = field(default_factory=dict)
    local_wait_ms: float | None = None

    @property
    def reserved_tokens(self) -> int:
        """KV tokens the request can grow to: what capacity is reserved for."""
        return self.prompt_tokens + self.max_output_tokens

    @property
    def average_kv_tokens(self) -> int:
        """KV tokens the request holds on average over its life: its prompt, plus an
        output that grows from nothing to `max_output_tokens`."""
        return self.prompt_tokens + (self.max_output_tokens + 1) // 2
