"""Runs the API under uvicorn with a deadline on request heads: ``python -m app.server``.

uvicorn's HTTP/1.1 protocols time out idle keep-alive connections, but not a client that is
still sending its request head: one header line every few seconds holds a connection (and
its memory) forever, and a few hundred such clients hold the server. ``HeadDeadlineProtocol``
closes a connection whose complete request head has not arrived ``header_deadline_seconds``
after the connection opened or after its previous response. Request bodies have their own
idle timeout and deadline (``app.uploads.UploadLimitMiddleware``).
"""

from __future__ import annotations

import asyncio
import logging

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from app.main import create_app
from core.settings import Settings

logger = logging.getLogger(__name__)


class HeadDeadlineProtocol(H11Protocol):
    """uvicorn's h11 protocol, closing connections that are too slow to send a request head.

    The timer runs while h11 waits for a head (its ``their_state`` is ``IDLE``): armed when
    the connection opens and when a response completes on a kept-alive connection; stopped
    once h11 has parsed a complete head, so slow responses and bodies are not cut by it.
    """

    header_deadline_seconds: float = 30.0

    _head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:
            self._stop_head_timer()
        elif self._head_timer is None:  # a next head begins after a body read past a response
            self._arm_head_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # may already start a pipelined next request
        if self.conn.their_state is h11.IDLE:
            self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_timer()
        super().connection_lost(exc)

    def _arm_head_timer(self) -> None:
        self._stop_head_timer()
        if not self.transport.is_closing():
            self._head_timer = self.loop.call_later(
                self.header_deadline_seconds, self._head_too_slow
            )

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_too_slow(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            logger.info(
                "closing %s: no complete request head within %g s",
                self.client,
                self.header_deadline_seconds,
            )
            self.transport.close()  # connection_lost then closes the h11 side


def head_deadline_protocol(seconds: float) -> type[HeadDeadlineProtocol]:
    """The protocol class with its deadline: uvicorn builds protocols from a class alone."""

    class Configured(HeadDeadlineProtocol):
        header_deadline_seconds = seconds

    return Configured


def run_api(
    settings: Settings,
    *,
    host: str | None = None,
    port: int | None = None,
    log_level: str = "warning",
    access_log: bool = False,
) -> None:
    """Serve the API until SIGINT or SIGTERM (uvicorn's own handling)."""
    uvicorn.run(
        create_app(settings),
        host=host if host is not None else settings.api.host,
        port=port if port is not None else settings.api.port,
        http=head_deadline_protocol(settings.api.header_deadline_seconds),
        log_level=log_level,
        access_log=access_log,
    )


if __name__ == "__main__":
    run_api(Settings())
