"""Per-client rate limits and idempotency keys, kept in Redis so every API process agrees."""

from __future__ import annotations

import hashlib
import json
import math
import time

from redis import Redis

from core.errors import IdempotencyKeyMismatch

# Token bucket: capacity ``burst``, refilled at ``rate`` tokens per second. One script, so
# concurrent API processes cannot both spend the last token.
_TAKE_TOKEN = """
local tokens = tonumber(redis.call('HGET', KEYS[1], 'tokens') or ARGV[2])
local stamp = tonumber(redis.call('HGET', KEYS[1], 'stamp') or ARGV[3])
local rate, burst, now = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
tokens = math.min(burst, tokens + math.max(0, now - stamp) * rate)
local allowed = 0
if tokens >= 1 then tokens = tokens - 1; allowed = 1 end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'stamp', tostring(now))
redis.call('EXPIRE', KEYS[1], math.ceil(burst / rate) + 1)
return {allowed, tostring(tokens)}
"""


class RateLimiter:
    def __init__(self, connection: Redis, *, prefix: str, per_minute: float, burst: int) -> None:
        self._prefix = f"{prefix}:rate:"
        self._rate = per_minute / 60.0
        self._burst = burst
        self._take = connection.register_script(_TAKE_TOKEN)

    @property
    def enabled(self) -> bool:
        return self._rate > 0

    def try_acquire(self, client: str) -> float:
        """Spend one token; returns 0 when allowed, else the seconds until one is available."""
        if not self.enabled:
            return 0.0
        key = self._prefix + hashlib.sha256(client.encode()).hexdigest()[:32]
        allowed, tokens = self._take(keys=[key], args=[self._rate, self._burst, time.time()])
        if int(allowed) == 1:
            return 0.0
        return max(0.001, (1.0 - float(tokens)) / self._rate)


# One fixed window per client, opened by its first failure: count it, and give the counter its
# lifetime when it has none (a new window). One script, so concurrent API processes never
# leave a counter without an expiry.
_COUNT_FAILURE = """
local count = redis.call('INCR', KEYS[1])
if redis.call('PTTL', KEYS[1]) < 0 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
return count
"""

AUTH_FAILURE_WINDOW_SECONDS = 60.0


class AuthFailures:
    """Failed API-key attempts per client address, so that guessing keys stalls.

    After ``per_minute`` failures in a window (opened by the first of them), the address is
    refused until the window is over, before its key is even looked at. Successful attempts
    are not counted. ``per_minute=0`` turns it off.
    """

    def __init__(self, connection: Redis, *, prefix: str, per_minute: int) -> None:
        self._redis = connection
        self._prefix = f"{prefix}:auth-failures:"
        self._limit = per_minute
        self._count = connection.register_script(_COUNT_FAILURE)

    @property
    def enabled(self) -> bool:
        return self._limit > 0

    def _key(self, client: str) -> str:
        return self._prefix + hashlib.sha256(client.encode()).hexdigest()[:32]

    def blocked_for(self, client: str) -> float:
        """Seconds until ``client`` may try a key again; 0 when it may now."""
        if not self.enabled:
            return 0.0
        with self._redis.pipeline() as pipe:  # one transaction: the count and its lifetime
            pipe.get(self._key(client))
            pipe.pttl(self._key(client))
            count, ttl_ms = pipe.execute()
        if count is None or int(count) < self._limit:
            return 0.0
        # Only the script writes counters, always with a lifetime; one without: a full window.
        return int(ttl_ms) / 1000 if int(ttl_ms) > 0 else AUTH_FAILURE_WINDOW_SECONDS

    def record_failure(self, client: str) -> None:
        if self.enabled:
            window_ms = int(AUTH_FAILURE_WINDOW_SECONDS * 1000)
            self._count(keys=[self._key(client)], args=[window_ms])


def retry_after_header(seconds: float) -> int:
    return max(1, math.ceil(seconds))


class IdempotencyKeys:
    """Maps a client's ``Idempotency-Key`` to the job its first request created."""

    def __init__(self, connection: Redis, *, prefix: str, ttl_seconds: int) -> None:
        self._redis = connection
        self._prefix = f"{prefix}:idempotency:"
        self.ttl_seconds = ttl_seconds

    def key_for(self, owner: str, key: str) -> str:
        """The Redis key of ``owner``'s ``key`` (hashed: a client's key is not a key name)."""
        return self._prefix + hashlib.sha256(f"{owner}\x00{key}".encode()).hexdigest()

    @staticmethod
    def value_for(job_id: str, fingerprint: str) -> str:
        """What a claim stores: the job it created and the request it came from."""
        return json.dumps({"job_id": job_id, "fingerprint": fingerprint})

    @staticmethod
    def earlier_job(value: str | bytes, fingerprint: str) -> str:
        """The job of an earlier claim's ``value``, if it was the same request; raises
        ``IdempotencyKeyMismatch`` when it was a different one."""
        earlier = json.loads(value)
        if earlier["fingerprint"] != fingerprint:
            raise IdempotencyKeyMismatch(
                "This Idempotency-Key was used for a different image or different parameters."
            )
        return str(earlier["job_id"])

    def claim(self, owner: str, key: str, *, job_id: str, fingerprint: str) -> str | None:
        """Claim the key for a new job; returns the earlier job's id if it was claimed before.

        Raises ``IdempotencyKeyMismatch`` when the earlier request was a different one. (The
        submission path claims inside its admission script instead: ``JobQueue.admit``.)
        """
        value = self.value_for(job_id, fingerprint)
        if self._redis.set(self.key_for(owner, key), value, nx=True, ex=self.ttl_seconds):
            return None
        raw = self._redis.get(self.key_for(owner, key))
        if raw is None:  # expired between the two calls: claim again
            return self.claim(owner, key, job_id=job_id, fingerprint=fingerprint)
        return self.earlier_job(raw, fingerprint)

    def release(self, owner: str, key: str) -> None:
        self._redis.delete(self.key_for(owner, key))


def request_fingerprint(image: bytes, parameters_json: str, priority: str) -> str:
    digest = hashlib.sha256(image)
    digest.update(parameters_json.encode())
    digest.update(priority.encode())
    return digest.hexdigest()
