"""One way to open the Redis connection from settings, and to read what it answers."""

from __future__ import annotations

from redis import Redis

from core.settings import Settings


def connect_redis(settings: Settings) -> Redis:
    if settings.redis.url is None:
        raise RuntimeError(
            "no Redis URL configured: set SPASEMSR_REDIS__URL, or run `spasemsr serve`, "
            "which starts an embedded redis-server"
        )
    return Redis.from_url(
        settings.redis.url,
        socket_timeout=settings.redis.socket_timeout_seconds,
        socket_connect_timeout=settings.redis.socket_timeout_seconds,
        health_check_interval=30,
    )


def text(value: object) -> str:
    """A Redis reply value as text (redis-py answers bytes unless asked to decode)."""
    return value.decode() if isinstance(value, bytes) else str(value)
