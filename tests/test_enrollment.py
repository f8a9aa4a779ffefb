"""Enrollment and trust: tokens scoped to a center with an expiry and a use limit,
a credential per worker that reaches only its own record, revocation that takes
effect at once, and the `idlegrid admin` CLI that drives all of it.

Everything here is the real gateway on loopback over a real Redis; workers are
either raw HTTP calls to the control API (to try what a misbehaving worker
could send) or real `idlegrid worker` agents with simulated engines."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import httpx
import redis

from gateway import keys
from gateway.embedded_redis import free_port
from tests.conftest import MODEL, start_gateway
from workers.sim.profiles import PerfModel, get_gpu, get_model

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}


def enroll(gw, token: str, center: str = "dc-a", **fields) -> httpx.Response:
    """Enrollment as a worker agent sends it; the engine URL is a closed port
    (these workers never report ready, so nothing calls it)."""
    body = {"token": token, "center": center, "model": MODEL, "engine_url": f"http://127.0.0.1:{free_port()}",
            "gpu": "h100", "engine_kind": "external", "engine_api_key": "eng-secret-key-of-this-worker", **fields}
    return httpx.post(gw.url + "/control/enroll", json=body, timeout=10)


def enrolled(gw, center: str = "dc-a") -> tuple[str, str]:
    r = enroll(gw, gw.enroll_token(center), center)
    assert r.status_code == 200, r.text
    return r.json()["worker_id"], r.json()["credential"]


def heartbeat(gw, credential: str, body: dict | None = None, **params) -> httpx.Response:
    return httpx.post(gw.url + "/control/heartbeat", json=body or {"state": "draining"}, params=params,
                      headers={"Authorization": f"Bearer {credential}"}, timeout=10)


def assert_refused(r: httpx.Response, status: int, code: str, words: str) -> None:
    """An OpenAI-shaped error with the right status, code and a message that says why."""
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code
    assert words in error["message"]


def raw_record(gw, worker_id: str) -> dict[bytes, bytes]:
    with redis.Redis.from_url(gw.redis_url) as r:
        return r.hgetall(keys.worker(worker_id))


# -- enrollment tokens -------------------------------------------------------------


def test_unknown_and_wrong_center_tokens_are_refused(gateway_server):
    gw = gateway_server
    assert_refused(enroll(gw, "enr-made-up"), 401, "enroll_unknown", "not valid")
    assert_refused(enroll(gw, ""), 401, "enroll_unknown", "not valid")

    token = gw.enroll_token("dc-a")
    assert_refused(enroll(gw, token, center="dc-b"), 403, "enroll_wrong_center", "another center")
    # A refusal costs the token nothing: its one use is still there for its own center.
    assert enroll(gw, token, center="dc-a").status_code == 200
    assert_refused(enroll(gw, token, center="dc-a"), 401, "enroll_used_up", "used")

    # A token made without a center enrolls into any center.
    anywhere = gw.enroll_token("", uses=2)
    assert enroll(gw, anywhere, center="dc-a").status_code == 200
    assert enroll(gw, anywhere, center="dc-b").status_code == 200
    assert {w["center"] for w in gw.workers()} == {"dc-a", "dc-b"}


def test_a_token_serves_exactly_its_number_of_uses(gateway_server):
    gw = gateway_server
    token = gw.enroll_token("dc-a", uses=3)
    ids = [enroll(gw, token).json()["worker_id"] for _ in range(3)]
    assert len(set(ids)) == 3  # each use makes a worker of its own
    assert_refused(enroll(gw, token), 401, "enroll_used_up", "used")
    assert len(gw.workers()) == 3


def test_expired_and_revoked_tokens_are_refused(gateway_server):
    gw = gateway_server
    short = gw.enroll_token("dc-a", ttl_s=0.05)
    revoked = gw.enroll_token("dc-a", uses=5)
    with gw.admin as admin:
        assert admin.post("/admin/enroll-tokens/revoke", json={"token": revoked}).json() == {"revoked": True}
        assert_refused(admin.post("/admin/enroll-tokens/revoke", json={"token": "enr-nope"}), 404, "enroll_token_not_found", "no such")
        assert_refused(admin.post("/admin/enroll-tokens", json={"center": "dc-a", "ttl_s": 0}), 400, None, "positive")
    assert_refused(enroll(gw, revoked), 403, "enroll_revoked", "revoked")
    time.sleep(1.1)  # expiry is checked against Redis's clock in whole seconds
    assert_refused(enroll(gw, short), 401, "enroll_expired", "expired")
    assert gw.workers() == []


# -- worker credentials ---------------------------------------------------------


def test_a_worker_credential_reaches_only_its_own_record(gateway_server):
    gw = gateway_server
    a_id, a_cred = enrolled(gw, "dc-a")
    b_id, b_cred = enrolled(gw, "dc-b")
    b_before = raw_record(gw, b_id)
    a_before = raw_record(gw, a_id)

    # Worker A tries everything it could to write into B's record, or to promote itself.
    forged = {
        "state": "draining", "running": 3, "waiting": 1, "kv_usage": 0.25,
        "reclaim_reason": "file /run/reclaim exists", "reclaim_seconds": 1.5, "wake_seconds": 0.4,
        "id": b_id, "worker_id": b_id, "center": "dc-b", "engine_url": "http://attacker:1", "engine_api_key": "stolen",
        "qualified": "1", "flagged": "0", "cordoned": "0", "max_num_seqs": 100000, "tpot_base_ms": 0.001,
        "tpot_ms_per_seq": 0.0,
    }
    r = heartbeat(gw, a_cred, forged, worker_id=b_id, id=b_id)
    assert r.status_code == 200, r.text
    assert r.json()["state"] == "draining"

    assert raw_record(gw, b_id) == b_before  # not one byte of B changed
    a_after = raw_record(gw, a_id)
    for field in (b"id", b"center", b"engine_url", b"engine_api_key", b"max_num_seqs", b"tpot_base_ms", b"tpot_ms_per_seq"):
        assert a_after[field] == a_before[field], field
    assert b"qualified" not in a_after and b"flagged" not in a_after
    workers = {w["id"]: w for w in gw.workers()}
    assert (workers[a_id]["running"], workers[a_id]["waiting"], workers[a_id]["kv_usage"]) == (3, 1, 0.25)
    assert (workers[a_id]["reclaim_seconds"], workers[a_id]["wake_seconds"]) == (1.5, 0.4)
    assert workers[a_id]["reclaim_reason"] == "file /run/reclaim exists"
    assert workers[b_id]["running"] == 0 and workers[b_id]["reclaim_seconds"] is None

    # Reclaim timings stay until the agent reports new ones; a state the fleet does not
    # know is shown as reported but does not change the worker's state.
    heartbeat(gw, a_cred, {"state": "waking", "running": 0})
    a_now = {w["id"]: w for w in gw.workers()}[a_id]
    assert (a_now["reclaim_seconds"], a_now["state"], a_now["reported_state"]) == (1.5, "waking", "waking")
    heartbeat(gw, a_cred, {"state": "dancing", "running": 0})
    a_now = {w["id"]: w for w in gw.workers()}[a_id]
    assert (a_now["state"], a_now["reported_state"]) == ("waking", "dancing")

    # A worker credential is no admin token and no API key.
    assert httpx.get(gw.url + "/admin/workers", headers={"Authorization": f"Bearer {a_cred}"}).status_code == 401
    assert httpx.get(gw.url + "/v1/models", headers={"Authorization": f"Bearer {a_cred}"}).status_code == 401

    # Deregistering removes the caller, whatever it names.
    r = httpx.post(gw.url + "/control/deregister", params={"worker_id": b_id}, json={"worker_id": b_id},
                   headers={"Authorization": f"Bearer {a_cred}"})
    assert r.json() == {"worker_id": a_id, "removed": True}
    assert [w["id"] for w in gw.workers()] == [b_id]
    assert heartbeat(gw, b_cred).status_code == 200
    assert_refused(heartbeat(gw, a_cred), 401, "invalid_credential", "worker credential")


def test_bad_credentials_and_bodies_are_refused(gateway_server):
    gw = gateway_server
    _, cred = enrolled(gw)
    assert_refused(httpx.post(gw.url + "/control/heartbeat", json={}), 401, "invalid_credential", "credential")
    assert_refused(heartbeat(gw, "wkr-forged"), 401, "invalid_credential", "credential")
    assert_refused(heartbeat(gw, cred, {"running": "lots"}), 400, None, "running")
    assert_refused(heartbeat(gw, cred, {"reclaim_seconds": -1}), 400, None, "reclaim_seconds")


def test_engine_key_is_for_gateways_only(gateway_server):
    gw = gateway_server
    r = enroll(gw, gw.enroll_token("dc-a"))
    assert "eng-secret-key-of-this-worker" not in r.text
    credential = r.json()["credential"]
    with gw.admin as admin:
        listing = admin.get("/admin/workers").text
    for secret in ("eng-secret-key-of-this-worker", credential, "credential_hash", "engine_api_key"):
        assert secret not in listing
    # ...while the gateway itself keeps it, to call the engine.
    assert raw_record(gw, r.json()["worker_id"])[b"engine_api_key"] == b"eng-secret-key-of-this-worker"


def test_revoked_worker_is_out_at_once(gateway_server):
    gw = gateway_server
    agent = gw.start_sim_worker("dc-a")
    raw_id, raw_cred = enrolled(gw, "dc-b")
    (worker,) = gw.wait_ready(1)
    with gw.client as c:
        assert c.post("/v1/chat/completions", json=CHAT).status_code == 200
    with gw.admin as admin:
        for worker_id in (worker["id"], raw_id):
            assert admin.post(f"/admin/workers/{worker_id}/revoke").json() == {"worker_id": worker_id, "action": "revoke"}
        assert_refused(admin.post(f"/admin/workers/{raw_id}/revoke"), 404, "worker_not_found", raw_id)
    # Gone from the fleet the moment the operator said so: no list entry, no traffic.
    assert gw.workers() == []
    with gw.client as c:
        assert_refused(c.post("/v1/chat/completions", json=CHAT), 503, "no_worker", MODEL)
    assert_refused(heartbeat(gw, raw_cred, {"state": "ready"}), 401, "invalid_credential", "revoked")
    # The real agent hears 401 on its next heartbeat and stops, taking its engine with it.
    assert agent.wait(15) != 0
    assert gw.workers() == []


# -- the admin CLI -----------------------------------------------------------------


def admin_cli(gw, *args: str, token: str | None = "default") -> subprocess.CompletedProcess:
    env = {**os.environ, "IDLEGRID_ADMIN_TOKEN": gw.admin_token if token == "default" else (token or "")}
    if token is None:
        env.pop("IDLEGRID_ADMIN_TOKEN")
    return subprocess.run([sys.executable, "-m", "gateway.cli", "admin", "--gateway", gw.url, *args],
                          capture_output=True, text=True, env=env, timeout=30)


def test_api_keys_are_listed_without_the_secret_and_revoked_by_id_or_key(gateway_server):
    gw = gateway_server
    keys_made = {name: admin_cli(gw, "create-key", "--name", name, "--allowed-centers", "dc-a").stdout.strip()
                 for name in ("leaky-startup", "good-startup")}

    def works(key: str) -> bool:
        status = httpx.get(gw.url + "/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code
        assert status in (200, 401)
        return status == 200

    assert all(works(key) for key in keys_made.values())
    listing = admin_cli(gw, "keys")
    assert listing.returncode == 0, listing.stderr
    rows = {line.split()[1]: line.split()[0] for line in listing.stdout.splitlines()[1:]}
    assert {"leaky-startup", "good-startup"} <= rows.keys()
    assert "dc-a" in listing.stdout and not any(key in listing.stdout for key in keys_made.values())

    # By the id from the listing: refused at once here (no waiting out the key cache).
    assert admin_cli(gw, "revoke-key", rows["leaky-startup"]).returncode == 0
    assert not works(keys_made["leaky-startup"]) and works(keys_made["good-startup"])
    # By the key itself, as when it shows up somewhere public.
    assert admin_cli(gw, "revoke-key", keys_made["good-startup"]).returncode == 0
    assert not works(keys_made["good-startup"])
    names = [line.split()[1] for line in admin_cli(gw, "keys").stdout.splitlines()[1:]]
    assert "leaky-startup" not in names and "good-startup" not in names


def test_a_key_revoked_on_one_gateway_is_refused_by_every_gateway_at_once(gateway_server):
    gw = gateway_server
    other_server, other = start_gateway(gw.redis_url)
    try:
        key = admin_cli(gw, "create-key", "--name", "leaked").stdout.strip()

        def status_on(handle) -> int:
            return httpx.get(handle.url + "/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code

        assert status_on(other) == 200  # the other gateway now holds the key in its cache
        assert admin_cli(gw, "revoke-key", key).returncode == 0
        # Well inside the key cache's 5 s: the revocation reached the other gateway.
        refused = time.monotonic() + 1.0
        while status_on(other) != 401:
            assert time.monotonic() < refused, "the other gateway still takes the revoked key"
            time.sleep(0.05)
    finally:
        other_server.stop()


def test_admin_cli_end_to_end(gateway_server):
    gw = gateway_server
    # A client key that works on the OpenAI surface.
    out = admin_cli(gw, "create-key", "--name", "startup-a")
    assert out.returncode == 0, out.stderr
    key = out.stdout.strip()
    assert httpx.get(gw.url + "/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200

    # An enrollment token a real worker agent joins with.
    out = admin_cli(gw, "create-enroll-token", "--center", "dc-a", "--ttl", "60", "--uses", "1")
    assert out.returncode == 0, out.stderr
    token = out.stdout.strip()
    agent = subprocess.Popen([sys.executable, "-m", "gateway.cli", "worker", "--gateway", gw.url, "--token", token,
                              "--center", "dc-a", "--engine", "sim", "--gpu", "h100", "--model", MODEL,
                              "--time-scale", "20", "--drain-timeout", "5"], start_new_session=True)
    gw.agents.append(agent)
    gw.wait_ready(1)

    out = admin_cli(gw, "workers", "--json")
    assert out.returncode == 0, out.stderr
    (worker,) = json.loads(out.stdout)["workers"]
    assert (worker["center"], worker["gpu"], worker["model"], worker["state"]) == ("dc-a", "h100", MODEL, "ready")
    assert worker["qualification"]["status"] == "passed" and worker["qualification"]["tpot_ms"] > 0
    assert "engine_api_key" not in out.stdout
    # The speed model the agent read from its simulated engine, the per-sequence cost included.
    h100 = PerfModel(get_gpu("h100"), get_model(MODEL))
    assert worker["tpot_base_ms"] == round(h100.tpot_base_ms, 4)
    assert worker["tpot_ms_per_seq"] == round(h100.tpot_ms_per_seq, 5) > 0

    table = admin_cli(gw, "workers").stdout.splitlines()
    assert table[0].split()[:7] == ["ID", "CENTER", "GPU", "MODEL", "STATE", "LOAD", "QUALIFICATION"]
    assert worker["id"] in table[1] and "ready" in table[1] and "passed" in table[1]

    # The used token is spent; a fresh one can be voided before anyone uses it.
    assert_refused(enroll(gw, token), 401, "enroll_used_up", "used")
    spare = admin_cli(gw, "create-enroll-token", "--center", "dc-a").stdout.strip()
    out = admin_cli(gw, "revoke-enroll-token", spare)
    assert out.returncode == 0, out.stderr
    assert_refused(enroll(gw, spare), 403, "enroll_revoked", "revoked")

    out = admin_cli(gw, "revoke", worker["id"])
    assert out.returncode == 0, out.stderr
    assert json.loads(admin_cli(gw, "workers", "--json").stdout) == {"workers": []}
    assert agent.wait(15) != 0

    # Mistakes end in one clear line and exit status 2.
    for args, token, words in (
        (["workers"], None, "IDLEGRID_ADMIN_TOKEN"),
        (["workers"], "wrong-token", "401"),
        (["revoke", "nobody"], "default", "no worker 'nobody'"),
        (["revoke-enroll-token", "enr-nope"], "default", "no such enrollment token"),
        (["revoke-key", "sk-ig-nope"], "default", "no such API key"),
        (["create-enroll-token", "--uses", "0"], "default", "positive"),
        (["create-enroll-token", "--ttl", "-5"], "default", "positive"),
    ):
        out = admin_cli(gw, *args, token=token)
        assert out.returncode == 2, (args, out.stdout, out.stderr)
        assert words in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
