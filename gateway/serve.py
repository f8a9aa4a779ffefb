"""`idlegrid gateway`: one gateway process on uvicorn."""

from __future__ import annotations

import argparse
import logging
import os

import uvicorn

from gateway.app import create_app
from gateway.config import GatewayConfig
from gateway.policies import DEFAULT_POLICY, POLICIES


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--redis", required=True, help="Redis URL holding the fleet state")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--center", default="default", help="the center this gateway runs in")
    p.add_argument("--policy", default=DEFAULT_POLICY, choices=sorted(POLICIES), help=f"routing policy (default {DEFAULT_POLICY})")
    p.add_argument("--admin-token", default=os.environ.get("IDLEGRID_ADMIN_TOKEN", ""), help="admin API token (env IDLEGRID_ADMIN_TOKEN)")


def config_from_args(args: argparse.Namespace) -> GatewayConfig:
    return GatewayConfig(redis_url=args.redis, center=args.center, policy=args.policy, admin_token=args.admin_token)


def run(args: argparse.Namespace) -> int:
    # httpx logs every engine request at INFO: a line per request on the hot path.
    logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLogger().level))
    app = create_app(config_from_args(args))
    # No HTTP keep-alive timeout games: streams stay open as long as the answer runs.
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_keep_alive=30)
    return 0
