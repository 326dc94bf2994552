"""Worker entry point: load the upscaler once, warm it, then take jobs without forking."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import sys
import time
import uuid
from collections.abc import Callable
from types import FrameType
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from rq import SimpleWorker
from rq.job import Job
from rq.serializers import JSONSerializer

from core.jobs import utcnow
from core.models import worker_models
from core.queue import JobQueue
from core.records import JobStore
from core.recovery import JobRecovery
from core.redis_conn import RedisUnreachable, connect_redis, wait_for_redis
from core.secrets_check import refuse_placeholder_api_keys
from core.settings import Settings
from core.storage import build_storage
from core.workers import WorkerInfo, WorkerRegistry, WorkerState
from worker.engine import load_upscalers
from worker.metrics import WorkerMetrics, install_metrics
from worker.runtime import Heartbeat, WorkerRuntime, install_runtime
from worker.tasks import JobFailedRecorded

logger = logging.getLogger(__name__)


def default_worker_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def run_worker(settings: Settings, *, burst: bool = False) -> None:
    """Serve jobs until stopped (SIGTERM/SIGINT finish the current job first)."""
    # The worker shares the API's secret: a placeholder key there stops it too (exits 1).
    refuse_placeholder_api_keys(settings.api)
    connection = connect_redis(settings)
    # Started before Redis (a restart of the whole host, a supervisor bringing Redis back):
    # wait for it rather than exit into a restart loop. SIGTERM still stops the process.
    wait_for_redis(connection)
    prefix = settings.redis.key_prefix
    name = settings.worker.name or default_worker_name()
    registry = WorkerRegistry(connection, prefix=prefix)
    served = worker_models(settings)
    metrics = WorkerMetrics(served)
    install_metrics(metrics)
    metrics.serve(settings.worker)  # up while warming: spasemsr_model_warm 0 until it is done
    registry.announce(
        WorkerInfo(
            name=name,
            state=WorkerState.WARMING,
            serving=served,
            pid=os.getpid(),
            hostname=socket.gethostname(),
            started_at=utcnow(),
        ),
        # Long enough for loading, compiling and CUDA-graph capture at full size.
        ttl_seconds=max(1800.0, 3 * settings.worker.heartbeat_seconds),
    )
    began = time.perf_counter()
    upscalers = load_upscalers(settings)
    for upscaler in upscalers.values():
        upscaler.warm_up()
        card = upscaler.card
        metrics.mark_warm(card)
        logger.info(
            "worker %s: %s warm (%s, %s, %s)%s",
            name, card.name, card.configuration, card.device, card.dtype,
            "" if card.trained else " -- UNTRAINED weights",
        )  # fmt: skip
    warmup_seconds = time.perf_counter() - began
    logger.info("worker %s warm in %.2f s", name, warmup_seconds)
    jobs = JobStore(connection, prefix=prefix, ttl_seconds=settings.worker.record_ttl_seconds)
    queue = JobQueue(connection, prefix=prefix)
    runtime = WorkerRuntime(
        settings=settings,
        name=name,
        upscalers=upscalers,
        storage=build_storage(settings),
        jobs=jobs,
        registry=registry,
        warmup_seconds=warmup_seconds,
        queue=queue,
        connection=connection,
        recovery=JobRecovery(
            connection,
            prefix=prefix,
            jobs=jobs,
            queue=queue,
            registry=registry,
            max_attempts=settings.worker.max_attempts,
            backoff_seconds=settings.worker.retry_backoff_seconds,
            job_timeout_seconds=settings.worker.job_timeout_seconds,
            keep_seconds=settings.worker.record_ttl_seconds,
            orphan_grace_seconds=settings.worker.orphan_grace_seconds,
        ),
    )
    install_runtime(runtime)
    # Announced warm before RQ's loop installs its own handlers: a stop signal in between must
    # still be a graceful stop (the loop below then never starts), not the default kill.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda _signum, _frame: runtime.begin_shutdown())
    runtime.announce()
    heartbeat = Heartbeat(runtime)
    heartbeat.start()
    die_with_this_process_on_fork()
    try:
        _take_jobs_until_stopped(
            runtime,
            lambda: ServingWorker(
                runtime,
                queue.queues_for(served, settings.worker.queues),
                connection=connection,
                serializer=JSONSerializer,
                name=name,
            ),
            burst=burst,
        )
    finally:
        heartbeat.stopped.set()
        _best_effort(lambda: registry.remove(name), "remove the worker's registry entry")
        metrics.mark_cold()
        metrics.stop()
        logger.info("worker %s stopped", name)


MAX_RESUMES_PER_MINUTE = 5


def _take_jobs_until_stopped(
    runtime: WorkerRuntime, new_worker: Callable[[], ServingWorker], *, burst: bool
) -> None:
    """Run RQ's loop, and ride out a Redis outage instead of exiting.

    RQ retries a lost connection while it waits for a job, but any other Redis call that fails
    (its maintenance, the bookkeeping around a job, its teardown) ends ``work()``. Then this
    waits for Redis, hands back the jobs this worker held (they were not at fault, so no
    attempt is counted), and starts RQ's loop again. Repeated quick exits with Redis up are
    a real fault: the process exits and its supervisor decides.
    """
    resumes: list[float] = []
    while not runtime.stopping():
        worker = new_worker()
        try:
            # The scheduler re-enqueues delayed retries (webhook backoff); RQ elects one
            # scheduler per Redis among the workers.
            worker.work(burst=burst, with_scheduler=True, logging_level="INFO")
            if burst or runtime.stopping():
                return
            logger.error("worker %s: RQ's loop ended unexpectedly", runtime.name)
        except (RedisConnectionError, RedisTimeoutError) as exc:
            if runtime.stopping():
                return
            logger.error("worker %s lost Redis: %s", runtime.name, exc)
        now = time.monotonic()
        resumes = [t for t in resumes if now - t < 60] + [now]
        if len(resumes) > MAX_RESUMES_PER_MINUTE:
            raise SystemExit(1)
        try:
            wait_for_redis(worker.connection, should_stop=runtime.stopping)
        except RedisUnreachable:
            return
        _best_effort(worker.register_death, "mark the old RQ worker dead")
        hand_back_held_jobs(runtime, reason="its worker lost its connection to Redis")
        logger.info("worker %s: Redis is back; taking jobs again", runtime.name)


def hand_back_held_jobs(runtime: WorkerRuntime, *, reason: str) -> list[str]:
    """Queue again the jobs marked running on this worker (it is alive, so no sweep would)."""
    recovery = runtime.recovery
    if recovery is None:
        return []
    held = [job_id for job_id, holder in recovery.running().items() if holder == runtime.name]
    for job_id in held:
        recovery.requeue(job_id, runtime.name, reason=reason, count_attempt=False)
    return held


def _best_effort(action: Callable[[], object], what: str) -> None:
    try:
        action()
    except (RedisConnectionError, RedisTimeoutError):
        logger.warning("could not %s: Redis is unreachable", what)


def die_with_this_process_on_fork() -> None:
    """RQ forks its scheduler; make every such child stoppable, and die when this process does.

    A forked child inherits this process's Python signal handlers, which only mark *this*
    worker as stopping: a SIGTERM reaching the child before RQ's scheduler installs its own
    would be swallowed, and the worker, joining the child on its way out, would never exit
    (a stop in the instant the worker starts). The child starts with the default actions.

    Without the death signal, a worker killed with SIGKILL leaves its scheduler child running
    with parent 1, holding the scheduler lock for a worker that no longer exists. Linux only
    (prctl); elsewhere only the signal actions are reset.
    """
    parent = os.getpid()
    os.register_at_fork(
        before=_hold_stop_signals,
        after_in_parent=_release_stop_signals,
        after_in_child=lambda: _prepare_forked_child(parent),
    )


STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT})


# Held from just before the fork until the child has its default actions: a SIGTERM sent to
# the child in between stays pending and is then acted on, instead of reaching a handler that
# is about to be replaced (CPython runs handlers late, after the hooks).
def _hold_stop_signals() -> None:
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)


def _release_stop_signals() -> None:
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def _prepare_forked_child(parent: int) -> None:
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_DFL)
    if sys.platform.startswith("linux"):
        _ask_for_parent_death_signal(parent)
    _release_stop_signals()


PR_SET_PDEATHSIG = 1
# RQ's scheduler checks for a stop once a second.
SCHEDULER_STOP_SECONDS = 10.0


def _ask_for_parent_death_signal(parent: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


class ServingWorker(SimpleWorker):
    """RQ's in-process worker, with a shutdown grace period for the job it is running.

    First SIGTERM/SIGINT: take no new job; the current one may finish within
    ``shutdown_grace_seconds``, after which it is handed back to the queue at its next step.
    A second signal hands it back at once.
    """

    def __init__(self, runtime: WorkerRuntime, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.runtime = runtime

    def request_stop(self, signum: int, frame: FrameType | None) -> None:
        self.runtime.begin_shutdown()
        # RQ stops an idle worker by raising StopRequested from this handler; when the signal
        # lands inside a logging call, logging swallows it and the worker ran on for good. The
        # flag makes its loop stop at its next check (after the job it had just taken) anyway.
        self._stop_requested = True
        super().request_stop(signum, frame)  # type: ignore[no-untyped-call]

    def request_force_stop(self, signum: int, frame: FrameType | None) -> None:
        """The second signal. RQ's own raises SystemExit mid-job, and ignores a signal that
        comes within a second of the first: while the first is still being handled (RQ stops
        the scheduler child inside it, which takes up to a second), a second Ctrl-C was lost.
        Ours hands the running job back at its next check, whenever the signal comes."""
        self._hand_back_now(signum, frame)

    def _install_signal_handlers(self) -> None:
        super()._install_signal_handlers()  # type: ignore[no-untyped-call]
        # A stop that came before RQ's handlers were in place: the loop stops at its first check.
        if self.runtime.stopping():
            self._stop_requested = True

    def stop_scheduler(self) -> None:
        """Stop the scheduler child, waiting a bounded time: RQ's own join has no bound, so one
        child that misses its SIGTERM would keep this worker from ever exiting."""
        process = self.scheduler._process if self.scheduler is not None else None
        if process is None or process.pid is None:
            return
        with contextlib.suppress(OSError):
            os.kill(process.pid, signal.SIGTERM)
        process.join(SCHEDULER_STOP_SECONDS)
        if process.is_alive():
            logger.warning(
                "worker %s: scheduler %d ignored SIGTERM for %.0f s; killing it",
                self.runtime.name, process.pid, SCHEDULER_STOP_SECONDS,
            )  # fmt: skip
            process.kill()
            process.join()

    def _hand_back_now(self, signum: int, frame: FrameType | None) -> None:
        self.runtime.begin_shutdown(immediately=True)

    def handle_exception(self, job: Job, *exc_info: Any) -> None:
        # A failure the job runner has recorded is an outcome, not a crash: one line, no
        # traceback (RQ logs every exception with its traceback).
        if isinstance(exc_info[1], JobFailedRecorded):
            logger.info("RQ job %s recorded as failed (%s)", job.id, exc_info[1])
            return
        super().handle_exception(job, *exc_info)


__all__ = ["run_worker"]
