"""One way to open the Redis connection from settings, and to read what it answers."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from core.settings import Settings

logger = logging.getLogger(__name__)


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


class RedisUnreachable(Exception):
    """Redis did not come back before the caller gave up waiting (a stop was requested)."""


def wait_for_redis(
    connection: Redis,
    *,
    should_stop: Callable[[], bool] = lambda: False,
    first_wait_seconds: float = 0.5,
    max_wait_seconds: float = 10.0,
) -> None:
    """Block until ``connection`` answers PING, backing off exponentially between tries.

    A worker that loses Redis has nothing useful to do but wait: exiting would only make its
    supervisor start replacements that fail the same way. ``should_stop`` lets a SIGTERM end
    the wait (``RedisUnreachable`` is raised then).
    """
    wait = first_wait_seconds
    while True:
        try:
            connection.ping()
            return
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            if should_stop():
                raise RedisUnreachable(str(exc)) from exc
            logger.warning("Redis is unreachable (%s); trying again in %.1f s", exc, wait)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and not should_stop():
            time.sleep(min(0.1, wait))
        wait = min(max_wait_seconds, wait * 2)
