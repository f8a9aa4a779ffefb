"""Gateway settings. Plain data; the CLI and tests build it."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class GatewayConfig:
    redis_url: str
    center: str = "default"
    # Round trips (ms) from this gateway's center to others, until measured (gateway.distance).
    center_rtt_ms: dict[str, float] = field(default_factory=dict)
    policy: str = "slo_pack"  # gateway.policies.DEFAULT_POLICY
    admin_token: str = ""
    # Largest request body accepted (413 above it).
    max_body_bytes: int = 4 * 1024 * 1024
    # Engines may think for minutes: no total timeout, only an idle gap between chunks.
    engine_idle_timeout_s: float = 300.0
    engine_connect_timeout_s: float = 5.0
    # A worker silent for this long gets no new work.
    heartbeat_ttl_s: float = 3.0
    heartbeat_interval_s: float = 1.0
    # Reservations expire unless their gateway renews them (a dead gateway leaks nothing).
    reservation_lease_s: float = 60.0
    # Engines tried for one request before the first byte.
    max_attempts: int = 3
    # Expected output tokens when a request sets no max_tokens (R1-style answers are long).
    default_output_tokens: int = 4096
    # How long a request may wait for room before a 429.
    queue_timeout_s: float = 30.0
    # Probe each newly enrolled worker (answers? how fast?) before it gets traffic.
    qualify: bool = True
