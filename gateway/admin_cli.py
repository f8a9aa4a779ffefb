"""`idlegrid admin`: the operator's client for the gateway's admin API."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

import httpx

from gateway.errors import UserError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gateway", default=os.environ.get("IDLEGRID_GATEWAY", "http://127.0.0.1:8000"), help="gateway URL (env IDLEGRID_GATEWAY)")
    sub = p.add_subparsers(dest="action", metavar="ACTION", parser_class=type(p))
    sub.required = True
    w = sub.add_parser("workers", help="list the fleet")
    w.add_argument("--json", action="store_true", help="machine-readable output")
    k = sub.add_parser("create-key", help="create a client API key")
    k.add_argument("--name", default="")
    k.add_argument("--policy", default="", help="default routing policy for this key")
    k.add_argument("--allowed-centers", default="", help="comma-separated centers this key's requests may run in")
    sub.add_parser("keys", help="list the client API keys (ids and names; the keys themselves are never stored)")
    rk = sub.add_parser("revoke-key", help="delete a client API key (it stops working within seconds)")
    rk.add_argument("key", metavar="KEY_OR_ID", help="the key itself, or its id from `keys`")
    t = sub.add_parser("create-enroll-token", help="create a worker enrollment token")
    t.add_argument("--center", default="", help="the only center the token enrolls into (default: any)")
    t.add_argument("--ttl", type=float, default=3600, help="seconds until it expires (default 3600)")
    t.add_argument("--uses", type=int, default=1, help="how many workers may use it (default 1)")
    r = sub.add_parser("revoke-enroll-token", help="void an enrollment token before it expires or is used up")
    r.add_argument("token")
    worker_actions = (
        ("drain", "stop sending work to a worker and hand its GPU back"),
        ("wake", "return a drained worker to service"),
        ("revoke", "take a worker out at once and void its credential"),
        ("clear", "let a worker the qualification probe flagged serve anyway"),
    )
    for action, help_text in worker_actions:
        a = sub.add_parser(action, help=help_text)
        a.add_argument("worker_id")


def run(args: argparse.Namespace) -> int:
    token = os.environ.get("IDLEGRID_ADMIN_TOKEN")
    if not token:
        raise UserError("set IDLEGRID_ADMIN_TOKEN to the gateway's admin token")
    client = httpx.Client(base_url=args.gateway, headers={"Authorization": f"Bearer {token}"}, timeout=10)
    try:
        if args.action == "workers":
            r = client.get("/admin/workers")
        elif args.action == "create-key":
            centers = [c for c in args.allowed_centers.split(",") if c]
            r = client.post("/admin/keys", json={"name": args.name, "policy": args.policy, "allowed_centers": centers})
        elif args.action == "keys":
            r = client.get("/admin/keys")
        elif args.action == "revoke-key":
            is_id = re.fullmatch(r"[0-9a-f]{12}", args.key) is not None
            r = client.post("/admin/keys/revoke", json={"id": args.key} if is_id else {"key": args.key})
        elif args.action == "create-enroll-token":
            r = client.post("/admin/enroll-tokens", json={"center": args.center, "ttl_s": args.ttl, "uses": args.uses})
        elif args.action == "revoke-enroll-token":
            r = client.post("/admin/enroll-tokens/revoke", json={"token": args.token})
        else:
            r = client.post(f"/admin/workers/{args.worker_id}/{args.action}")
    except httpx.HTTPError as exc:
        raise UserError(f"cannot reach the gateway at {args.gateway}: {exc}") from None
    if r.status_code >= 400:
        try:
            message = r.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = r.text
        raise UserError(f"gateway answered {r.status_code}: {message}")
    data = r.json()
    if args.action == "workers" and not args.json:
        _print_workers(data["workers"])
    elif args.action == "keys":
        _print_keys(data["keys"])
    elif args.action == "create-key":
        print(data["key"])
    elif args.action == "create-enroll-token":
        print(data["token"])
    else:
        print(json.dumps(data, indent=2))
    return 0


def _qualification(w: dict) -> str:
    """One word for the qualification probe's verdict, with the TPOT it measured."""
    q = w.get("qualification") or {}
    status = q.get("status") or ("qualifying" if w["state"] == "starting" else "-")
    return f"{status} {q['tpot_ms']:.2f}ms" if q.get("tpot_ms") is not None else status


def _print_keys(api_keys: list[dict]) -> None:
    print(f"{'ID':<13} {'NAME':<20} {'POLICY':<16} ALLOWED CENTERS")
    for k in api_keys:
        print(f"{k['id']:<13} {k.get('name') or '-':<20} {k.get('policy') or '(default)':<16} {k.get('allowed_centers') or '(any)'}")
    if not api_keys:
        print("(no keys)", file=sys.stderr)


def _print_workers(workers: list[dict]) -> None:
    header = f"{'ID':<16} {'CENTER':<8} {'GPU':<8} {'MODEL':<32} {'STATE':<9} {'LOAD':>9} {'QUALIFICATION':<18} {'ENGINE':<28} PID"
    print(header)
    for w in workers:
        load = f"{w['reserved_requests']}/{w['max_num_seqs']}"
        print(f"{w['id']:<16} {w['center']:<8} {w['gpu']:<8} {w['model'][:32]:<32} {w['state']:<9} {load:>9} "
              f"{_qualification(w):<18} {w['engine_url']:<28} {w.get('engine_pid') or '-'}")
    if not workers:
        print("(no workers)", file=sys.stderr)
