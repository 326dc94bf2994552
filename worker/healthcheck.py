"""``python -m worker.healthcheck``: exit 0 while a warm worker on this host is announced.

Used as the container health check: the worker's heartbeat thread keeps its entry alive, so
an entry that expired means the process is hung or gone.
"""

from __future__ import annotations

import socket
import sys

from redis.exceptions import RedisError

from core.redis_conn import connect_redis
from core.settings import Settings
from core.workers import WorkerRegistry


def main() -> int:
    settings = Settings()
    registry = WorkerRegistry(connect_redis(settings), prefix=settings.redis.key_prefix)
    hostname = socket.gethostname()
    try:
        warm = registry.warm()
    except RedisError as exc:  # a worker waiting for Redis to come back is not ready
        print(f"not ready: Redis is unreachable ({exc})", file=sys.stderr)
        return 1
    return 0 if any(w.hostname == hostname for w in warm) else 1


if __name__ == "__main__":
    sys.exit(main())
