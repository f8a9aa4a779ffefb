"""The control API workers speak: enroll, heartbeat, deregister.

Workers never hold Redis credentials. They trade a one-time enrollment token
for a credential of their own, and that credential can only touch their own
record.
"""

from __future__ import annotations

import secrets
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from gateway import qualify
from gateway.errors import APIError
from gateway.fleet import DRAINING, READY, SLEEPING, STARTING, WAKING, Worker


class Enrollment(BaseModel):
    model_config = ConfigDict(extra="ignore")
    token: str
    center: str = Field(min_length=1)
    model: str = Field(min_length=1)
    engine_url: str = Field(min_length=1)
    gpu: str = "unknown"
    engine_api_key: str = ""
    engine_kind: str = "external"
    engine_pid: int | None = None
    max_num_seqs: int = Field(default=256, ge=1)
    kv_capacity_tokens: int = Field(default=0, ge=0)
    # The engine's speed model (see gateway.fleet.Worker); left out, the qualification probe fits one.
    tpot_base_ms: float | None = None
    tpot_ms_per_1k_kv: float | None = None
    tpot_ms_per_seq: float | None = None
    time_scale: float = Field(default=1.0, gt=0)  # simulated engines only


class Heartbeat(BaseModel):
    model_config = ConfigDict(extra="ignore")
    state: str | None = Field(default=None, max_length=32)
    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0
    power_w: float | None = None
    energy_j: float | None = None
    energy_source: str | None = None
    # The agent's last reclaim: why, signal to GPU memory freed, and wake to serving.
    reclaim_reason: str | None = Field(default=None, max_length=500)
    reclaim_seconds: float | None = Field(default=None, ge=0)
    wake_seconds: float | None = Field(default=None, ge=0)


# Kept from the last heartbeat that had them, not blanked by one that does not.
_STICKY = {"reclaim_reason", "reclaim_seconds", "wake_seconds"}

_REPORTABLE_STATES = {STARTING, READY, DRAINING, SLEEPING, WAKING}
_REFUSALS = {
    "unknown": "enrollment token is not valid; ask an operator for one (`idlegrid admin create-enroll-token`)",
    "expired": "enrollment token has expired; ask an operator for a new one",
    "wrong_center": "enrollment token is for another center than the one this worker gave",
    "used_up": "enrollment token has been used as many times as it allows",
    "revoked": "enrollment token was revoked by an operator",
}


async def _json(request: Request, model: type[BaseModel]) -> Any:
    try:
        return model.model_validate(await request.json())
    except ValidationError as exc:
        first = exc.errors()[0]
        raise APIError(400, f"invalid '{'.'.join(map(str, first['loc']))}': {first['msg']}") from None
    except ValueError:
        raise APIError(400, "body is not valid JSON") from None


async def _worker_id(request: Request) -> str:
    auth = request.headers.get("authorization", "")
    credential = auth[7:] if auth.lower().startswith("bearer ") else ""
    worker_id = await request.app.state.gateway.registry.worker_for_credential(credential) if credential else None
    if not worker_id:
        raise APIError(401, "unknown or revoked worker credential", code="invalid_credential")
    return worker_id


async def enroll(request: Request) -> JSONResponse:
    gw = request.app.state.gateway
    form: Enrollment = await _json(request, Enrollment)
    verdict = await gw.registry.redeem_enroll_token(form.token, form.center)
    if verdict != "ok":
        raise APIError(403 if verdict in ("wrong_center", "revoked") else 401, _REFUSALS.get(verdict, verdict), code=f"enroll_{verdict}")
    worker = Worker(
        id=f"{form.center}-{secrets.token_hex(4)}",
        center=form.center,
        model=form.model,
        engine_url=form.engine_url,
        gpu=form.gpu,
        state=STARTING,
        engine_api_key=form.engine_api_key,
        engine_kind=form.engine_kind,
        engine_pid=form.engine_pid,
        max_num_seqs=form.max_num_seqs,
        kv_capacity_tokens=form.kv_capacity_tokens,
        tpot_base_ms=form.tpot_base_ms,
        tpot_ms_per_1k_kv=form.tpot_ms_per_1k_kv,
        tpot_ms_per_seq=form.tpot_ms_per_seq,
        time_scale=form.time_scale,
    )
    await gw.registry.register(worker)
    credential = await gw.registry.issue_credential(worker.id)
    gw.log.info("enrolled worker %s (%s, %s, %s)", worker.id, worker.center, worker.gpu, worker.model)
    return JSONResponse({"worker_id": worker.id, "credential": credential, "heartbeat_interval_s": gw.config.heartbeat_interval_s})


async def heartbeat(request: Request) -> JSONResponse:
    gw = request.app.state.gateway
    worker_id = await _worker_id(request)
    beat: Heartbeat = await _json(request, Heartbeat)
    # Only the Heartbeat model's fields are stored, and only in the caller's own record:
    # a worker cannot name another worker, nor set its own qualification or cordon.
    fields = beat.model_dump(exclude={"state", *_STICKY})
    fields.update({name: getattr(beat, name) for name in _STICKY if getattr(beat, name) is not None})
    if beat.state:
        fields["reported_state"] = beat.state  # what the agent says, e.g. "waking", shown to operators
    if beat.state in _REPORTABLE_STATES:
        # A worker that says it is ready gets traffic only once it has qualified.
        fields["state"] = await qualify.gate(gw, worker_id, beat.state)
    result = await gw.registry.heartbeat(worker_id, fields)
    if result is None:
        raise APIError(401, "worker is not registered", code="invalid_credential")
    state, command = result
    if beat.state == READY and state == STARTING and await qualify.admit_if_qualified(gw.redis, worker_id):
        state = READY  # its probe passed while this heartbeat was on its way
    return JSONResponse({"state": state, "command": command or None})


async def deregister(request: Request) -> JSONResponse:
    gw = request.app.state.gateway
    worker_id = await _worker_id(request)
    await gw.registry.revoke_credential(worker_id)
    await gw.registry.remove(worker_id)
    gw.log.info("worker %s deregistered", worker_id)
    return JSONResponse({"worker_id": worker_id, "removed": True})


routes = [
    Route("/control/enroll", enroll, methods=["POST"]),
    Route("/control/heartbeat", heartbeat, methods=["POST"]),
    Route("/control/deregister", deregister, methods=["POST"]),
]
