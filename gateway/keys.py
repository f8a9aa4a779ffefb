"""Redis key names. One place, so the schema is readable at a glance.

Every key carries the hash tag `{fleet}` (or `{tenants}`), so each Lua script
touches one slot and the same code runs on Redis Cluster.
"""

PREFIX = "idlegrid:{fleet}"

WORKERS = f"{PREFIX}:workers"  # SET of worker ids
# HASH worker hash key -> counter bumped by every write to that hash (see registry.WorkerCache)
WORKER_VERSIONS = f"{PREFIX}:worker_versions"


def worker(worker_id: str) -> str:
    return f"{PREFIX}:worker:{worker_id}"  # HASH of Worker fields


def reservations(worker_id: str) -> str:
    # Named anew when entries lost their expiry (it moved to `leases`): an entry
    # "tokens expiry" of the old key must never be read as "tokens average".
    return f"{PREFIX}:reservations:{worker_id}"  # HASH request_id -> "tokens average_kv_tokens"


def leases(worker_id: str) -> str:
    return f"{PREFIX}:leases:{worker_id}"  # ZSET request_id -> lease expiry (Redis time)


def enroll_token(token_hash: str) -> str:
    return f"{PREFIX}:enroll:{token_hash}"  # HASH center, expires_at, uses_left


def credential(credential_hash: str) -> str:
    return f"{PREFIX}:cred:{credential_hash}"  # STRING worker id


def api_key(key_hash: str) -> str:
    return f"idlegrid:{{tenants}}:key:{key_hash}"  # HASH name, policy, allowed_centers


API_KEYS = "idlegrid:{tenants}:keys"  # SET of key hashes
# Pub/sub channel: a key hash, published when that key is revoked (every gateway drops it from its cache)
API_KEYS_REVOKED = "idlegrid:{tenants}:keys:revoked"


def queue(model: str) -> str:
    return f"{PREFIX}:queue:{model}"  # ZSET request_id -> order score


def queue_owners(model: str) -> str:
    return f"{PREFIX}:queue_owners:{model}"  # HASH request_id -> "model|center deadline api_key"


QUEUE_DEPTH = f"{PREFIX}:queue_depth"  # HASH "model|center" -> waiting requests

MODEL_STATS = f"{PREFIX}:model_stats"  # HASH "<model>:output_tokens" -> running mean
