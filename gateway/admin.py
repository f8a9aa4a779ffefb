"""The admin API operators (and `idlegrid admin`) use: keys, enrollment tokens,
and the fleet. Every call needs the admin token."""

from __future__ import annotations

import dataclasses
import secrets
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from gateway.errors import APIError
from gateway.fleet import DRAINING, Worker

_HIDDEN = {"engine_api_key", "extra"}


def _check_admin(request: Request) -> None:
    expected = request.app.state.gateway.config.admin_token
    auth = request.headers.get("authorization", "")
    given = auth[7:] if auth.lower().startswith("bearer ") else ""
    if not expected or not given or not secrets.compare_digest(given, expected):
        raise APIError(401, "admin token missing or wrong", code="invalid_admin_token")


async def _body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if not raw:
        return {}
    try:
        body = await request.json()
    except ValueError:
        raise APIError(400, "body is not valid JSON") from None
    if not isinstance(body, dict):
        raise APIError(400, "body must be a JSON object")
    return body


def worker_json(w: Worker) -> dict[str, Any]:
    out = {f.name: getattr(w, f.name) for f in dataclasses.fields(w) if f.name not in _HIDDEN}
    out["queue_depth"] = w.queue_depth
    out["credential_hash"] = None
    out.pop("credential_hash")
    for key in ("qualification", "cordoned", "command"):
        if key in w.extra:
            out[key] = w.extra[key]
    return out


async def list_workers(request: Request) -> JSONResponse:
    _check_admin(request)
    workers = await request.app.state.gateway.registry.workers()
    return JSONResponse({"workers": [worker_json(w) for w in workers]})


async def create_key(request: Request) -> JSONResponse:
    _check_admin(request)
    body = await _body(request)
    key = await request.app.state.gateway.registry.create_api_key(
        name=str(body.get("name", "")),
        policy=str(body.get("policy", "")),
        allowed_centers=",".join(body.get("allowed_centers", []) or []),
    )
    return JSONResponse({"key": key, "name": body.get("name", "")}, status_code=201)


async def create_enroll_token(request: Request) -> JSONResponse:
    _check_admin(request)
    body = await _body(request)
    try:
        ttl_s = float(body.get("ttl_s", 3600))
        uses = int(body.get("uses", 1))
    except (TypeError, ValueError):
        raise APIError(400, "ttl_s and uses must be numbers") from None
    if ttl_s <= 0 or uses <= 0:
        raise APIError(400, "ttl_s and uses must be positive")
    center = str(body.get("center", ""))
    token = await request.app.state.gateway.registry.create_enroll_token(center=center, ttl_s=ttl_s, uses=uses)
    return JSONResponse({"token": token, "center": center, "ttl_s": ttl_s, "uses": uses}, status_code=201)


async def worker_action(request: Request) -> JSONResponse:
    _check_admin(request)
    gw = request.app.state.gateway
    worker_id = request.path_params["worker_id"]
    action = request.path_params["action"]
    if await gw.registry.get(worker_id) is None:
        raise APIError(404, f"no worker '{worker_id}'", code="worker_not_found")
    if action == "drain":
        # Cordon first, so no gateway places new work here from this instant.
        await gw.registry.update(worker_id, state=DRAINING, cordoned="1", command="drain")
    elif action == "wake":
        await gw.registry.update(worker_id, cordoned="0", command="wake")
    elif action == "revoke":
        await gw.registry.revoke_credential(worker_id)
        await gw.registry.remove(worker_id)
    else:
        raise APIError(404, f"unknown action '{action}'")
    gw.log.info("admin: %s %s", action, worker_id)
    return JSONResponse({"worker_id": worker_id, "action": action})


routes = [
    Route("/admin/workers", list_workers, methods=["GET"]),
    Route("/admin/keys", create_key, methods=["POST"]),
    Route("/admin/enroll-tokens", create_enroll_token, methods=["POST"]),
    Route("/admin/workers/{worker_id}/{action}", worker_action, methods=["POST"]),
]
