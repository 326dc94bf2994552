"""``spasemsr serve``: the whole service on one machine (what ``make run`` uses).

Starts an embedded ``redis-server`` unless a Redis URL is configured, then the API and one
worker as child processes sharing the same settings; Ctrl-C (or SIGTERM) stops all of them.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from contextlib import ExitStack

from core.embedded_redis import EmbeddedRedis
from core.settings import Settings

logger = logging.getLogger(__name__)


def child_environment(settings: Settings, redis_url: str) -> dict[str, str]:
    env = dict(os.environ)
    env["SPASEMSR_REDIS__URL"] = redis_url
    env["SPASEMSR_VAR_DIR"] = str(settings.var_dir.resolve())
    return env


def api_command(settings: Settings) -> list[str]:
    return [
        sys.executable, "-m", "uvicorn", "--factory", "app.main:create_app",
        "--host", settings.api.host, "--port", str(settings.api.port),
        "--log-level", "warning", "--no-access-log",
    ]  # fmt: skip


def worker_command() -> list[str]:
    return [sys.executable, "-m", "worker"]


def serve(settings: Settings, *, workers: int = 1) -> int:
    settings.var_dir.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        redis_url = settings.redis.url
        if redis_url is None:
            embedded = stack.enter_context(EmbeddedRedis(settings.var_dir / "redis"))
            redis_url = embedded.url
        env = child_environment(settings, redis_url)
        children = [subprocess.Popen(api_command(settings), env=env)]
        children += [subprocess.Popen(worker_command(), env=env) for _ in range(workers)]
        stack.callback(_stop_all, children)
        url = f"http://{settings.api.host}:{settings.api.port}"
        print(f"SpaSemSR Serve is starting at {url}  (docs: {url}/docs; Ctrl-C stops it)")
        return _supervise(children, env)


MAX_RESTARTS_PER_MINUTE = 5


def _supervise(children: list[subprocess.Popen[bytes]], env: dict[str, str]) -> int:
    """Wait for Ctrl-C or SIGTERM; restart a worker that dies (a fatal device error makes a
    worker exit on purpose), but stop everything if the API dies or workers crash in a loop."""
    stop = False
    restarts: list[float] = []

    def _request_stop(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, _request_stop)
    try:
        while not stop:
            if (code := children[0].poll()) is not None:
                logger.error("the API exited with %s; stopping", code)
                return code or 1
            for index, child in enumerate(children[1:], start=1):
                if (code := child.poll()) is None:
                    continue
                now = time.monotonic()
                restarts = [t for t in restarts if now - t < 60] + [now]
                if len(restarts) > MAX_RESTARTS_PER_MINUTE:
                    logger.error("workers keep exiting (last code %s); stopping", code)
                    return code or 1
                logger.warning("worker exited with %s; starting a new one", code)
                children[index] = subprocess.Popen(worker_command(), env=env)
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    return 0


def _stop_all(children: list[subprocess.Popen[bytes]]) -> None:
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGINT)
    deadline = time.monotonic() + 20
    for child in children:
        try:
            child.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
    print("SpaSemSR Serve stopped.")
