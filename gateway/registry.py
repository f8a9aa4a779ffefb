"""The fleet registry in Redis: workers, heartbeats, reservations, credentials.

Gateways are stateless; this module is the only place that reads or writes
fleet state. Anything two gateways could race on (reserving room on a worker,
redeeming an enrollment token) is one Lua script, so it is atomic. Scripts read
the clock with Redis `TIME`, so gateways on different hosts agree on "now".
Every write to a worker's record here bumps its version (`keys.WORKER_VERSIONS`),
so `WorkerCache` re-reads only the records that changed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import secrets
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from gateway import keys
from gateway.fleet import GONE, READY, Worker
from gateway.redis_pipe import RedisPipe

_INT_FIELDS = {f.name for f in dataclasses.fields(Worker) if f.type in ("int", "int | None")}
_FLOAT_FIELDS = {f.name for f in dataclasses.fields(Worker) if f.type in ("float", "float | None")}

# Reservations are kept per worker so that a call costs the same whether the
# worker runs 1 sequence or 1,000 (re-summing every entry on each call cost Redis
# ~0.6 ms of CPU per reserve or release at 256 live ones, ~2.2 ms at 1,024):
#   KEYS[1] the worker's hash: `reserved_requests`, `reserved_tokens` and
#           `reserved_average_kv_tokens` hold the live reservations' sums;
#   KEYS[2] a hash request_id -> "tokens average_kv_tokens", one entry per live one;
#   KEYS[4] a sorted set request_id -> lease expiry (Redis time).
# Every change to one goes through these scripts, atomically, so the sums stay the
# sums of the entries. A lease that runs out (its gateway died, or stopped
# renewing) is dropped, and taken off the sums, by the next call that meets it.
# Expects `sums`, the worker hash's three sums as read (HMGET).
_LIVE_RESERVATIONS = """
local count, total, average = tonumber(sums[1]) or 0, tonumber(sums[2]) or 0, tonumber(sums[3]) or 0
local expired = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', now)
for _, id in ipairs(expired) do
  local entry = redis.call('HGET', KEYS[2], id)
  if entry then
    local tokens, avg = string.match(entry, '^(%d+) (%d+)$')
    count, total, average = count - 1, total - tonumber(tokens), average - tonumber(avg)
    redis.call('HDEL', KEYS[2], id)
  end
end
if #expired > 0 then redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now) end
count, total, average = math.max(count, 0), math.max(total, 0), math.max(average, 0)
"""

RESERVE = """
-- KEYS: worker hash, reservations hash, versions hash, leases zset[, admission queue]
-- ARGV: request_id, tokens, lease_s, max_requests, max_tokens (0 = unknown), heartbeat_ttl, average_kv_tokens
-- Returns {1 or 0, reason, live requests, live tokens, live average KV tokens, version}:
-- the worker's reservations after the call (-1: not counted) and its record's new
-- version (0: not written). Given the admission queue, room is refused while anyone
-- waits in it, so a new request never passes those already in line. Reserving for
-- a request that holds room already (a retried call) replaces its reservation.
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
if KEYS[5] and redis.call('ZCARD', KEYS[5]) > 0 then return {0, 'queued', -1, -1, -1, 0} end
local w = redis.call('HMGET', KEYS[1], 'state', 'last_heartbeat', 'reserved_requests', 'reserved_tokens', 'reserved_average_kv_tokens')
if w[1] ~= 'ready' then return {0, 'not_ready', -1, -1, -1, 0} end
if now - tonumber(w[2] or '0') > tonumber(ARGV[6]) then return {0, 'stale', -1, -1, -1, 0} end
local sums = {w[3], w[4], w[5]}
""" + _LIVE_RESERVATIONS + """local held = redis.call('HGET', KEYS[2], ARGV[1])
if held then
  local tokens, avg = string.match(held, '^(%d+) (%d+)$')
  count, total, average = count - 1, total - tonumber(tokens), average - tonumber(avg)
end
local function keep_sums()
  redis.call('HSET', KEYS[1], 'reserved_requests', count, 'reserved_tokens', total, 'reserved_average_kv_tokens', average)
  return redis.call('HINCRBY', KEYS[3], KEYS[1], 1)
end
local refused = nil
local want = tonumber(ARGV[2])
if count + 1 > tonumber(ARGV[4]) then
  refused = 'max_num_seqs'
else
  -- A request larger than the whole cache still gets an empty worker, else it would starve.
  local cap = tonumber(ARGV[5])
  if cap > 0 and count > 0 and total + want > cap then refused = 'kv_capacity' end
end
if refused then
  if held then  -- a retried call whose room is now taken: it holds none
    redis.call('HDEL', KEYS[2], ARGV[1])
    redis.call('ZREM', KEYS[4], ARGV[1])
  end
  local version = 0
  if held or #expired > 0 then version = keep_sums() end
  return {0, refused, count, total, average, version}
end
local want_average = tonumber(ARGV[7])
redis.call('HSET', KEYS[2], ARGV[1], want .. ' ' .. want_average)
redis.call('ZADD', KEYS[4], now + tonumber(ARGV[3]), ARGV[1])
count, total, average = count + 1, total + want, average + want_average
return {1, 'ok', count, total, average, keep_sums()}
"""

RELEASE = """
-- KEYS: worker hash, reservations hash, versions hash, leases zset; ARGV: request_id
-- Returns {live requests, live tokens, live average KV tokens, version (0: the worker is gone)}
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local sums = redis.call('HMGET', KEYS[1], 'reserved_requests', 'reserved_tokens', 'reserved_average_kv_tokens')
if not sums[1] and redis.call('EXISTS', KEYS[1]) == 0 then  -- the worker is gone, and its room with it
  redis.call('DEL', KEYS[2], KEYS[4])
  return {0, 0, 0, 0}
end
""" + _LIVE_RESERVATIONS + """local held = redis.call('HGET', KEYS[2], ARGV[1])
if held then
  local tokens, avg = string.match(held, '^(%d+) (%d+)$')
  count, total, average = math.max(count - 1, 0), math.max(total - tonumber(tokens), 0), math.max(average - tonumber(avg), 0)
  redis.call('HDEL', KEYS[2], ARGV[1])
  redis.call('ZREM', KEYS[4], ARGV[1])
end
redis.call('HSET', KEYS[1], 'reserved_requests', count, 'reserved_tokens', total, 'reserved_average_kv_tokens', average)
return {count, total, average, redis.call('HINCRBY', KEYS[3], KEYS[1], 1)}
"""

RENEW = """
-- KEYS: leases zset; ARGV: lease_s, request ids...
-- Only leases still held are extended: one already run out stays out.
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
for i = 2, #ARGV do
  local expiry = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if expiry and tonumber(expiry) >= now then
    redis.call('ZADD', KEYS[1], now + tonumber(ARGV[1]), ARGV[i])
  end
end
return 1
"""

HEARTBEAT = """
-- KEYS: worker hash, versions hash; ARGV: field, value, field, value, ...
-- Returns {state, command} or false when the worker is not registered.
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
for i = 1, #ARGV, 2 do
  -- A cordoned worker (drained by an operator) cannot talk itself back into
  -- service; it may still report how far its yield got (draining, sleeping).
  local back = ARGV[i + 1] == 'ready' or ARGV[i + 1] == 'waking' or ARGV[i + 1] == 'starting'
  if not (ARGV[i] == 'state' and back and redis.call('HGET', KEYS[1], 'cordoned') == '1') then
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  end
end
redis.call('HSET', KEYS[1], 'last_heartbeat', tostring(now))
redis.call('HINCRBY', KEYS[2], KEYS[1], 1)
local r = redis.call('HMGET', KEYS[1], 'state', 'command')
-- A command (drain, wake, stop) is delivered once, with this heartbeat's reply.
redis.call('HDEL', KEYS[1], 'command')
return {r[1] or '', r[2] or ''}
"""

RECORD_FAILURE = """
-- KEYS: worker hash, versions hash; ARGV: threshold, window_s, open_s
-- A circuit breaker: `threshold` failures within `window_s` keep the worker out
-- for `open_s`. Returns 1 if this failure opened the breaker.
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HINCRBY', KEYS[2], KEYS[1], 1)
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local since = tonumber(redis.call('HGET', KEYS[1], 'failures_since') or '0') or 0
local failures = 1
if now - since <= tonumber(ARGV[2]) then
  failures = tonumber(redis.call('HGET', KEYS[1], 'failures') or '0') + 1
else
  redis.call('HSET', KEYS[1], 'failures_since', tostring(now))
end
if failures >= tonumber(ARGV[1]) then
  redis.call('HSET', KEYS[1], 'breaker_until', tostring(now + tonumber(ARGV[3])), 'failures', 0, 'failures_since', 0)
  return 1
end
redis.call('HSET', KEYS[1], 'failures', failures)
return 0
"""

REDEEM_ENROLL_TOKEN = """
-- KEYS: enroll token hash; ARGV: center
-- Returns 'ok' or the reason the token is refused.
if redis.call('EXISTS', KEYS[1]) == 0 then return 'unknown' end
local t = redis.call('TIME')
local now = tonumber(t[1])
local tok = redis.call('HMGET', KEYS[1], 'center', 'expires_at', 'uses_left', 'revoked')
if tok[4] == '1' then return 'revoked' end
if tonumber(tok[2]) < now then return 'expired' end
if tok[1] ~= '' and tok[1] ~= ARGV[1] then return 'wrong_center' end
if tonumber(tok[3]) <= 0 then return 'used_up' end
redis.call('HINCRBY', KEYS[1], 'uses_left', -1)
return 'ok'
"""


def hash_secret(secret: str) -> str:
    """Keys, tokens and credentials are stored hashed, never in the clear."""
    return hashlib.sha256(secret.encode()).hexdigest()


def api_key_id(key_hash: str) -> str:
    """What names a client API key in listings: the start of its hash, which tells
    nothing about the key (unique enough for the keys of one fleet)."""
    return key_hash[:12]


def _encode(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    if isinstance(value, dict):
        return ""
    return str(value)


@dataclass
class Reservation:
    """The outcome of reserving room on a worker (or of releasing it)."""

    ok: bool
    reason: str  # "ok", "released", or why room was refused: queued, not_ready, stale, max_num_seqs, kv_capacity
    # The worker's live reservations after the call, summed over all gateways (None:
    # refused before counting them), and its record's version (0: the call did not write it).
    requests: int | None = None
    tokens: int | None = None
    average_kv_tokens: int | None = None
    version: int = 0

    def worker_fields(self) -> dict[str, int]:
        """The counts as the `Worker` fields the call stored."""
        if self.requests is None:
            return {}
        return {"reserved_requests": self.requests, "reserved_tokens": int(self.tokens or 0),
                "reserved_average_kv_tokens": int(self.average_kv_tokens or 0)}


def _reservation(reply: list) -> Reservation:
    """RESERVE's reply."""
    ok, reason, requests, total, average_total, version = reply
    return Reservation(bool(ok), reason.decode() if isinstance(reason, bytes) else reason,
                       _counted(requests), _counted(total), _counted(average_total), int(version))


def _counted(value: int) -> int | None:
    return None if value < 0 else int(value)


def _decode_raw(raw: dict[bytes, bytes]) -> Worker:
    return _decode_worker({k.decode(): v.decode() for k, v in raw.items()})


def _decode_worker(raw: dict[str, str]) -> Worker:
    values: dict[str, Any] = {}
    for f in dataclasses.fields(Worker):
        if f.name not in raw or f.name == "extra":
            continue
        text = raw[f.name]
        if f.name in _INT_FIELDS:
            values[f.name] = int(float(text)) if text else (None if "None" in str(f.type) else 0)
        elif f.name in _FLOAT_FIELDS:
            values[f.name] = float(text) if text else (None if "None" in str(f.type) else 0.0)
        else:
            values[f.name] = text if text or "None" not in str(f.type) else None
    known = {f.name for f in dataclasses.fields(Worker)}
    extra = {k: v for k, v in raw.items() if k not in known}
    return Worker(**values, extra=extra)


class Registry:
    def __init__(self, redis: Redis, *, heartbeat_ttl: float = 3.0, lease_s: float = 60.0):
        self.redis = redis
        self.heartbeat_ttl = heartbeat_ttl
        self.lease_s = lease_s
        self._reserve = redis.register_script(RESERVE)
        self._release = redis.register_script(RELEASE)
        self._renew = redis.register_script(RENEW)
        self._heartbeat = redis.register_script(HEARTBEAT)
        self._redeem = redis.register_script(REDEEM_ENROLL_TOKEN)
        self._record_failure = redis.register_script(RECORD_FAILURE)
        # Reserve and release run on every request's path: over one pipelined connection.
        self._pipe = RedisPipe.like(redis)

    async def _hot(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        """Run a script that is on every request's path (idempotent: it may be retried)."""
        if self._pipe is None:
            return await script(keys=keys, args=args)
        return await self._pipe.script(script, keys, args)

    async def close(self) -> None:
        if self._pipe is not None:
            await self._pipe.close()

    async def now(self) -> float:
        sec, usec = await self.redis.time()
        return sec + usec / 1e6

    # -- workers ---------------------------------------------------------

    async def register(self, worker: Worker) -> None:
        fields = {f.name: _encode(getattr(worker, f.name)) for f in dataclasses.fields(Worker) if f.name != "extra"}
        fields.update({k: _encode(v) for k, v in worker.extra.items()})
        fields["last_heartbeat"] = str(await self.now())
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(keys.worker(worker.id))
            pipe.hset(keys.worker(worker.id), mapping=fields)
            pipe.hincrby(keys.WORKER_VERSIONS, keys.worker(worker.id), 1)
            pipe.sadd(keys.WORKERS, worker.id)
            await pipe.execute()

    async def heartbeat(self, worker_id: str, fields: dict[str, Any]) -> tuple[str, str] | None:
        """Store a worker's report; returns (state, pending command), None if unknown."""
        args: list[str] = []
        for name, value in fields.items():
            args += [name, _encode(value)]
        result = await self._heartbeat(keys=[keys.worker(worker_id), keys.WORKER_VERSIONS], args=args)
        if not result:
            return None
        state, command = (x.decode() if isinstance(x, bytes) else x for x in result)
        return state, command

    async def update(self, worker_id: str, **fields: Any) -> bool:
        if not await self.redis.exists(keys.worker(worker_id)):
            return False
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(keys.worker(worker_id), mapping={k: _encode(v) for k, v in fields.items()})
            pipe.hincrby(keys.WORKER_VERSIONS, keys.worker(worker_id), 1)
            await pipe.execute()
        return True

    async def remove(self, worker_id: str) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.srem(keys.WORKERS, worker_id)
            pipe.delete(keys.worker(worker_id), keys.reservations(worker_id), keys.leases(worker_id))
            pipe.hdel(keys.WORKER_VERSIONS, keys.worker(worker_id))
            await pipe.execute()

    async def workers(self) -> list[Worker]:
        """Every registered worker; one that stopped heartbeating reads as GONE."""
        ids = sorted(x.decode() for x in await self.redis.smembers(keys.WORKERS))
        if not ids:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.time()
            for worker_id in ids:
                pipe.hgetall(keys.worker(worker_id))
            replies = await pipe.execute()
        sec, usec = replies[0]
        now = sec + usec / 1e6
        out = []
        for raw in replies[1:]:
            if not raw:
                continue
            w = _decode_raw(raw)
            if now - w.last_heartbeat > self.heartbeat_ttl:
                w.state = GONE
            out.append(w)
        return out

    async def get(self, worker_id: str) -> Worker | None:
        raw = await self.redis.hgetall(keys.worker(worker_id))
        if not raw:
            return None
        return _decode_raw(raw)

    # -- reservations ----------------------------------------------------

    async def reserve(self, worker: Worker, request_id: str, tokens: int, average_kv_tokens: int | None = None,
                      *, unless_queued: str | None = None) -> Reservation:
        """Atomically take room for one request on `worker`, summed over all gateways:
        `tokens` of KV capacity, and `average_kv_tokens` (default: all of them) counted
        towards the worker's predicted decode speed. With `unless_queued` (a model),
        refused while requests wait in that model's admission queue."""
        return _reservation(await self._hot(self._reserve, *self._reserve_call(worker, request_id, tokens, average_kv_tokens, unless_queued)))

    def reserve_now(self, worker: Worker, request_id: str, tokens: int, average_kv_tokens: int | None = None,
                    *, unless_queued: str | None = None) -> asyncio.Future[Reservation]:
        """`reserve`, its command on its way to Redis before this returns (when the
        connection is up): a future that is ready the moment the reply is read.
        Awaiting it may raise RedisError (a lost connection, a Redis that forgot
        its scripts) where `reserve` would have tried again: a retried reservation
        counts once, so the caller can call `reserve` then."""
        call = self._reserve_call(worker, request_id, tokens, average_kv_tokens, unless_queued)
        sent = self._pipe.script_now(self._reserve, *call, decode=_reservation) if self._pipe is not None else None
        if sent is None:
            return asyncio.ensure_future(self.reserve(worker, request_id, tokens, average_kv_tokens, unless_queued=unless_queued))
        return sent

    def _reserve_call(self, worker: Worker, request_id: str, tokens: int, average_kv_tokens: int | None,
                      unless_queued: str | None) -> tuple[list[str], list[Any]]:
        average = int(tokens if average_kv_tokens is None else average_kv_tokens)
        script_keys = [keys.worker(worker.id), keys.reservations(worker.id), keys.WORKER_VERSIONS, keys.leases(worker.id)]
        if unless_queued is not None:
            script_keys.append(keys.queue(unless_queued))
        return script_keys, [request_id, int(tokens), self.lease_s, worker.max_num_seqs, worker.kv_capacity_tokens, self.heartbeat_ttl, average]

    async def release(self, worker_id: str, request_id: str) -> Reservation:
        requests, total, average_total, version = await self._hot(
            self._release, [keys.worker(worker_id), keys.reservations(worker_id), keys.WORKER_VERSIONS, keys.leases(worker_id)],
            [request_id])
        return Reservation(True, "released", int(requests), int(total), int(average_total), int(version))

    async def renew(self, worker_id: str, request_ids: list[str]) -> None:
        """Extend leases of live requests; a gateway that dies stops renewing, so its
        reservations expire instead of leaking."""
        if request_ids:
            await self._renew(keys=[keys.leases(worker_id)], args=[self.lease_s, *request_ids])

    async def record_failure(self, worker_id: str, *, threshold: int = 3, window_s: float = 30.0, open_s: float = 30.0) -> bool:
        """Count an engine failure; True when it opened the worker's circuit breaker."""
        return bool(await self._record_failure(keys=[keys.worker(worker_id), keys.WORKER_VERSIONS], args=[threshold, window_s, open_s]))

    # -- enrollment and worker credentials -------------------------------

    async def create_enroll_token(self, center: str = "", ttl_s: float = 3600, uses: int = 1) -> str:
        token = "enr-" + secrets.token_urlsafe(24)
        expires_at = int(await self.now() + ttl_s)
        await self.redis.hset(
            keys.enroll_token(hash_secret(token)),
            mapping={"center": center, "expires_at": expires_at, "uses_left": uses, "revoked": "0"},
        )
        await self.redis.expireat(keys.enroll_token(hash_secret(token)), expires_at + 86400)
        return token

    async def redeem_enroll_token(self, token: str, center: str) -> str:
        """'ok', or why the token is refused: unknown, expired, wrong_center, used_up, revoked."""
        result = await self._redeem(keys=[keys.enroll_token(hash_secret(token))], args=[center])
        return result.decode() if isinstance(result, bytes) else result

    async def issue_credential(self, worker_id: str) -> str:
        credential = "wkr-" + secrets.token_urlsafe(32)
        await self.redis.set(keys.credential(hash_secret(credential)), worker_id)
        await self.redis.hset(keys.worker(worker_id), "credential_hash", hash_secret(credential))
        return credential

    async def worker_for_credential(self, credential: str) -> str | None:
        worker_id = await self.redis.get(keys.credential(hash_secret(credential)))
        return worker_id.decode() if worker_id else None

    async def revoke_credential(self, worker_id: str) -> None:
        cred_hash = await self.redis.hget(keys.worker(worker_id), "credential_hash")
        if cred_hash:
            await self.redis.delete(keys.credential(cred_hash.decode()))

    # -- API keys (tenants) ----------------------------------------------

    async def add_api_key(self, key: str, name: str = "", policy: str = "", allowed_centers: str = "") -> None:
        h = hash_secret(key)
        await self.redis.hset(keys.api_key(h), mapping={"name": name, "policy": policy, "allowed_centers": allowed_centers})
        await self.redis.sadd(keys.API_KEYS, h)

    async def lookup_api_key(self, key: str) -> dict[str, str] | None:
        raw = await self.redis.hgetall(keys.api_key(hash_secret(key)))
        if not raw:
            return None
        return {k.decode(): v.decode() for k, v in raw.items()}

    async def create_api_key(self, name: str = "", policy: str = "", allowed_centers: str = "") -> str:
        key = "sk-ig-" + secrets.token_urlsafe(24)
        await self.add_api_key(key, name=name, policy=policy, allowed_centers=allowed_centers)
        return key

    async def api_keys(self) -> list[dict[str, str]]:
        """Every client API key: its id (see `api_key_id`), name, policy and centers; never the key."""
        hashes = sorted(h.decode() for h in await self.redis.smembers(keys.API_KEYS))
        async with self.redis.pipeline(transaction=False) as pipe:
            for h in hashes:
                pipe.hgetall(keys.api_key(h))
            records = await pipe.execute() if hashes else []
        return [{"id": api_key_id(h), **{k.decode(): v.decode() for k, v in raw.items()}}
                for h, raw in zip(hashes, records) if raw]

    async def revoke_api_key(self, *, key: str | None = None, key_id: str | None = None) -> bool:
        """Delete a client API key, given the key itself (preferred) or its id; False if there is none."""
        if key is not None:
            found = [hash_secret(key)]
        else:
            found = [h.decode() for h in await self.redis.smembers(keys.API_KEYS) if api_key_id(h.decode()) == key_id]
        if len(found) != 1:
            return False
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(keys.api_key(found[0]))
            pipe.srem(keys.API_KEYS, found[0])
            pipe.publish(keys.API_KEYS_REVOKED, found[0])
            deleted, _, _ = await pipe.execute()
        return bool(deleted)


class WorkerCache:
    """The fleet as last read, re-reading only the workers whose record changed.

    Fetching and parsing every worker's hash is most of what reading the fleet
    costs, and most records have not changed since the last read a few dozen ms
    ago. A read takes the version counters (one reply) and fetches only the
    records whose counter moved. Writes that bypass this module (the qualification
    probe's verdict, TPOT estimates) bump nothing: they show with the worker's next
    heartbeat, or at once with `read(full=True)`.
    """

    def __init__(self, registry: Registry):
        self.registry = registry
        self._known: dict[str, tuple[int | None, Worker]] = {}  # worker id -> (version, record)

    async def read(self, *, full: bool = False) -> tuple[list[Worker], float, bool]:
        """(every registered worker, Redis time of the read, whether anything changed
        since the last read). A worker that stopped heartbeating reads as GONE."""
        async with self.registry.redis.pipeline(transaction=False) as pipe:
            pipe.time()
            pipe.smembers(keys.WORKERS)
            pipe.hgetall(keys.WORKER_VERSIONS)
            (sec, usec), members, raw_versions = await pipe.execute()
        now = sec + usec / 1e6
        ids = sorted(x.decode() for x in members)
        versions = {k.decode(): int(v) for k, v in raw_versions.items()}

        def version(worker_id: str) -> int | None:
            return versions.get(keys.worker(worker_id))

        # A record without a version (written before versions existed) is always re-read.
        stale = [i for i in ids if full or i not in self._known or version(i) is None or self._known[i][0] != version(i)]
        left = set(self._known).difference(ids)
        for worker_id in left:
            del self._known[worker_id]
        if stale:
            async with self.registry.redis.pipeline(transaction=False) as pipe:
                for worker_id in stale:
                    pipe.hgetall(keys.worker(worker_id))
                records = await pipe.execute()
            for worker_id, raw in zip(stale, records):
                if raw:
                    self._known[worker_id] = (version(worker_id), _decode_raw(raw))
                else:
                    self._known.pop(worker_id, None)
        workers = []
        for worker_id in ids:
            entry = self._known.get(worker_id)
            if entry is None:
                continue
            worker = entry[1]
            if now - worker.last_heartbeat > self.registry.heartbeat_ttl:
                worker = dataclasses.replace(worker, state=GONE)
            workers.append(worker)
        return workers, now, bool(stale or left)

    def note(self, worker_id: str, version: int, fields: dict[str, Any]) -> None:
        """Apply a write this gateway just made to a worker's record (it knows what
        it wrote) to the cached record, which may be in a snapshot being used right
        now. When that write is all that changed since the last read, the record
        need not be fetched again."""
        entry = self._known.get(worker_id)
        if entry is None:
            return
        known_version, worker = entry
        for name, value in fields.items():
            setattr(worker, name, value)
        if version and known_version is not None and version == known_version + 1:
            self._known[worker_id] = (version, worker)


def is_routable(worker: Worker, model: str) -> bool:
    return worker.state == READY and worker.model == model


def add_api_key_now(redis_url: str, key: str, name: str) -> None:
    """Store a client API key from code that is not async (scripts, tests)."""
    import asyncio

    async def add() -> None:
        client = Redis.from_url(redis_url)
        try:
            await Registry(client).add_api_key(key, name=name)
        finally:
            await client.aclose()

    asyncio.run(add())
