"""The admin API operators (and `idlegrid admin`) use: keys, enrollment tokens,
and the fleet. Every call needs the admin token."""

from __future__ import annotations

import dataclasses
import json
import secrets
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from gateway import keys, qualify
from gateway.errors import APIError
from gateway.fleet import DRAINING, Worker
from gateway.registry import api_key_id, hash_secret

# The engine's API key is for gateways only; credentials are never shown.
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


def _number(text: str | None) -> float | None:
    try:
        return float(text) if text else None
    except ValueError:
        return None


def worker_json(w: Worker) -> dict[str, Any]:
    out = {f.name: getattr(w, f.name) for f in dataclasses.fields(w) if f.name not in _HIDDEN}
    out["queue_depth"] = w.queue_depth
    for key in ("cordoned", "command", "reported_state", "reclaim_reason"):
        if key in w.extra:
            out[key] = w.extra[key]
    try:
        out["qualification"] = json.loads(w.extra["qualification"]) if w.extra.get("qualification") else None
    except ValueError:
        out["qualification"] = None
    out["qualified"] = w.extra.get("qualified") == "1"
    out["flagged"] = w.extra.get("flagged") == "1"
    out["reclaim_seconds"] = _number(w.extra.get("reclaim_seconds"))
    out["wake_seconds"] = _number(w.extra.get("wake_seconds"))
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
    return JSONResponse({"key": key, "id": api_key_id(hash_secret(key)), "name": body.get("name", "")}, status_code=201)


async def list_keys(request: Request) -> JSONResponse:
    _check_admin(request)
    return JSONResponse({"keys": await request.app.state.gateway.registry.api_keys()})


async def revoke_key(request: Request) -> JSONResponse:
    """Delete a client API key (a leaked key, a customer gone), given as `key` or by
    its `id` from the listing. Every gateway refuses it at once: the revocation is
    published to all of them (gateway.app.Gateway.forget_revoked_keys_forever)."""
    _check_admin(request)
    body = await _body(request)
    key, key_id = (value if isinstance(value, str) and value else None for value in (body.get("key"), body.get("id")))
    if key is None and key_id is None:
        raise APIError(400, "give the API key to revoke as 'key', or its id as 'id'", param="id")
    gw = request.app.state.gateway
    if not await gw.registry.revoke_api_key(key=key, key_id=key_id):
        raise APIError(404, "no such API key", code="api_key_not_found")
    gw.forget_api_keys()
    gw.log.info("admin: revoked an API key")
    return JSONResponse({"revoked": True})


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


# Flags a token as revoked; REDEEM_ENROLL_TOKEN (gateway.registry) then refuses it.
_REVOKE_ENROLL_TOKEN = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'revoked', '1')
return 1
"""


async def revoke_enroll_token(request: Request) -> JSONResponse:
    """Void an enrollment token before it expires or is used up (a leaked token)."""
    _check_admin(request)
    body = await _body(request)
    token = body.get("token")
    if not isinstance(token, str) or not token:
        raise APIError(400, "give the enrollment token to revoke as 'token'", param="token")
    redis = request.app.state.gateway.registry.redis
    if not await redis.eval(_REVOKE_ENROLL_TOKEN, 1, keys.enroll_token(hash_secret(token))):
        raise APIError(404, "no such enrollment token (or it expired long ago)", code="enroll_token_not_found")
    request.app.state.gateway.log.info("admin: revoked an enrollment token")
    return JSONResponse({"revoked": True})


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
        # Credential first: from this instant its heartbeats get 401; then the record
        # goes, so no gateway places new work on it.
        await gw.registry.revoke_credential(worker_id)
        await gw.registry.remove(worker_id)
    elif action == "clear":
        # An operator vouches for a worker the qualification probe flagged.
        await qualify.clear(gw.redis, worker_id)
    else:
        raise APIError(404, f"unknown action '{action}'")
    gw.log.info("admin: %s %s", action, worker_id)
    return JSONResponse({"worker_id": worker_id, "action": action})


routes = [
    Route("/admin/workers", list_workers, methods=["GET"]),
    Route("/admin/keys", create_key, methods=["POST"]),
    Route("/admin/keys", list_keys, methods=["GET"]),
    Route("/admin/keys/revoke", revoke_key, methods=["POST"]),
    Route("/admin/enroll-tokens", create_enroll_token, methods=["POST"]),
    Route("/admin/enroll-tokens/revoke", revoke_enroll_token, methods=["POST"]),
    Route("/admin/workers/{worker_id}/{action}", worker_action, methods=["POST"]),
]
