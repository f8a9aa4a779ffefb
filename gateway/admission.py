"""The admission queue in Redis: late binding for requests no worker has room for.

A request that finds no headroom waits here instead of on a GPU that may be
reclaimed. Order is shared by every gateway: priority class first, then fair
across API keys (each key's n-th waiting request ranks with the other keys'
n-th), then arrival. A waiting request may only take room when it is near the
head — within as many places as there are workers with room — so no gateway
lets a late request jump the line. Each entry is placed only by the gateway
holding its client (`gateway.dispatch`), so nothing is dispatched twice, and a
new request skips the queue only when it is empty (checked in the same atomic
step as its reservation, `registry.RESERVE`).
"""

from __future__ import annotations

from redis.asyncio import Redis

from gateway import keys

# score = priority * _CLASS + fair_round * _ROUND + arrival seconds (since 2020). A
# round outweighs any gap between arrivals still waiting (entries are dropped a few
# seconds past their queue timeout), and a million rounds stay far below a class.
_CLASS = 1e15
_ROUND = 1e4
_EPOCH = 1_577_836_800.0

ENQUEUE = """
-- KEYS: queue zset, owners hash, depth hash
-- ARGV: request_id, priority, api_key, model|center, deadline (s)
-- An owner entry is "model|center deadline round api_key".
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
-- Fairness: a key's next request goes one round after its last one still waiting
-- (FIFO within a key), and a key with none waiting joins the round now at the
-- head, so it ranks with the other keys' next requests rather than behind them.
local round = -1
local owners = redis.call('HGETALL', KEYS[2])
for i = 1, #owners, 2 do
  local r, key = string.match(owners[i + 1], '^[^ ]+ [^ ]+ ([^ ]+) (.*)$')
  if key == ARGV[3] and tonumber(r) >= round then round = tonumber(r) + 1 end
end
if round < 0 then
  round = 0
  local head = redis.call('ZRANGE', KEYS[1], 0, 0)
  if head[1] then
    local owner = redis.call('HGET', KEYS[2], head[1])
    if owner then round = tonumber(string.match(owner, '^[^ ]+ [^ ]+ ([^ ]+) ') or '0') or 0 end
  end
end
local score = tonumber(ARGV[2]) * """ + repr(_CLASS) + """ + round * """ + repr(_ROUND) + """ + (now - """ + repr(_EPOCH) + """)
redis.call('ZADD', KEYS[1], score, ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[4] .. ' ' .. (now + tonumber(ARGV[5])) .. ' ' .. round .. ' ' .. ARGV[3])
redis.call('HINCRBY', KEYS[3], ARGV[4], 1)
return redis.call('ZRANK', KEYS[1], ARGV[1])
"""

LEAVE = """
-- KEYS: queue zset, owners hash, depth hash; ARGV: request_id
local owner = redis.call('HGET', KEYS[2], ARGV[1])
if not owner then return 0 end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
local label = string.match(owner, '^([^ ]+) ')
if redis.call('HINCRBY', KEYS[3], label, -1) <= 0 then redis.call('HDEL', KEYS[3], label) end
return 1
"""

RANKS = """
-- KEYS: queue zset, owners hash, depth hash; ARGV: request ids
-- Drops entries whose gateway stopped waiting for them (deadline passed), then
-- returns each request's place in line (0 = head), or -1 if it is not queued.
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local head = redis.call('ZRANGE', KEYS[1], 0, 15)
for _, id in ipairs(head) do
  local owner = redis.call('HGET', KEYS[2], id)
  local label, deadline = nil, nil
  if owner then label, deadline = string.match(owner, '^([^ ]+) ([^ ]+) ') end
  if not owner or tonumber(deadline) + 5 < now then
    redis.call('ZREM', KEYS[1], id)
    redis.call('HDEL', KEYS[2], id)
    if label and redis.call('HINCRBY', KEYS[3], label, -1) <= 0 then redis.call('HDEL', KEYS[3], label) end
  end
end
local ranks = {}
for i, id in ipairs(ARGV) do
  local rank = redis.call('ZRANK', KEYS[1], id)
  if rank == false then rank = -1 end
  ranks[i] = rank
end
return ranks
"""


class AdmissionQueue:
    def __init__(self, redis: Redis):
        self.redis = redis
        self._enqueue = redis.register_script(ENQUEUE)
        self._leave = redis.register_script(LEAVE)
        self._ranks = redis.register_script(RANKS)

    def _keys(self, model: str) -> list[str]:
        return [keys.queue(model), keys.queue_owners(model), keys.QUEUE_DEPTH]

    async def length(self, model: str) -> int:
        return await self.redis.zcard(keys.queue(model))

    async def enqueue(self, model: str, request_id: str, *, priority: int, api_key: str, center: str, timeout_s: float) -> int:
        label = f"{model}|{center}"
        return int(await self._enqueue(keys=self._keys(model), args=[request_id, priority, api_key or "-", label, timeout_s]))

    async def ranks(self, model: str, request_ids: list[str]) -> list[int]:
        """Each request's place in line (0 = head), -1 for one no longer queued."""
        if not request_ids:
            return []
        return [int(r) for r in await self._ranks(keys=self._keys(model), args=request_ids)]

    async def leave(self, model: str, request_id: str) -> bool:
        return bool(await self._leave(keys=self._keys(model), args=[request_id]))

    async def depths(self) -> dict[tuple[str, str], int]:
        """Waiting requests per (model, center), for /metrics and autoscalers."""
        raw = await self.redis.hgetall(keys.QUEUE_DEPTH)
        out = {}
        for label, n in raw.items():
            model, _, center = label.decode().rpartition("|")
            out[(model, center)] = int(n)
        return out
