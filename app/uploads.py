"""Upload checks, cheapest first: byte cap (while the body streams in), format sniffed from
the bytes, pixel cap from the header, and only then a full decode to catch damaged files.

The client's content type is never trusted.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import warnings
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

from PIL import Image, UnidentifiedImageError

from app.errors import problem_for
from core.errors import (
    ClientError,
    CorruptImage,
    TooManyPixels,
    UnsupportedImage,
    UploadTimeout,
    UploadTooLarge,
)
from core.jobs import ImageFormat

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

MULTIPART_SLACK_BYTES = 64 * 1024
"""Room for the form fields and part headers on top of the image bytes."""

_EXIF_ORIENTATION = 0x0112
_TRANSPOSING_ORIENTATIONS = frozenset({5, 6, 7, 8})
_PIL_FORMAT = {ImageFormat.PNG: "PNG", ImageFormat.JPEG: "JPEG", ImageFormat.WEBP: "WEBP"}


def sniff_format(head: bytes) -> ImageFormat:
    """The format by its magic bytes (PNG, JPEG, WebP), whatever the client claimed."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return ImageFormat.PNG
    if head.startswith(b"\xff\xd8\xff"):
        return ImageFormat.JPEG
    if len(head) >= 12 and head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return ImageFormat.WEBP
    if not head:
        raise UnsupportedImage("The upload is empty.")
    raise UnsupportedImage("The upload is not a PNG, JPEG or WebP image.")


@dataclass(frozen=True)
class CheckedImage:
    format: ImageFormat
    width: int
    height: int


def check_image(data: bytes, *, max_bytes: int, max_pixels: int) -> CheckedImage:
    """Validate an upload completely; raise a typed client error at the first problem."""
    if len(data) > max_bytes:
        raise UploadTooLarge(f"The image is {len(data)} bytes; the limit is {max_bytes}.")
    image_format = sniff_format(data[:16])
    width, height = _header_size(data, image_format)
    if width * height > max_pixels:
        raise TooManyPixels(
            f"The image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}."
        )
    _decode_fully(data, image_format)
    return CheckedImage(format=image_format, width=width, height=height)


def _header_size(data: bytes, image_format: ImageFormat) -> tuple[int, int]:
    try:
        with warnings.catch_warnings():
            # Our own pixel cap decides, not Pillow's decompression-bomb heuristics.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=[_PIL_FORMAT[image_format]]) as image:
                width, height = image.size
                if image.getexif().get(_EXIF_ORIENTATION) in _TRANSPOSING_ORIENTATIONS:
                    width, height = height, width  # the worker applies the orientation
    except Image.DecompressionBombError as exc:
        raise TooManyPixels("The image header declares far too many pixels.") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise CorruptImage(f"The {image_format.value.upper()} header cannot be read.") from exc
    if width < 1 or height < 1:
        raise CorruptImage("The image has no pixels.")
    return width, height


def _decode_fully(data: bytes, image_format: ImageFormat) -> None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=[_PIL_FORMAT[image_format]]) as image:
                image.load()
    except Image.DecompressionBombError as exc:
        raise TooManyPixels("The image declares far too many pixels.") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise CorruptImage(
            f"The {image_format.value.upper()} data is truncated or damaged."
        ) from exc


class UploadLimitMiddleware:
    """Guards request bodies while they stream in: a byte cap, an idle timeout and a deadline.

    A declared ``Content-Length`` over the cap is refused before reading anything; a body
    that grows past the cap (chunked, or lying about its length) is cut off as soon as it
    does; a client that stops sending mid-body for ``idle_timeout_seconds``, or has not sent
    the whole body ``deadline_seconds`` after its headers (one byte now and then defeats an
    idle timeout), gets a 408, so a slow upload cannot hold a connection forever.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_body_bytes: int,
        idle_timeout_seconds: float = 30.0,
        deadline_seconds: float = 120.0,
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.idle_timeout_seconds = idle_timeout_seconds
        self.deadline_seconds = deadline_seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in {"POST", "PUT", "PATCH"}:
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_body_bytes:
            await self._answer(UploadTooLarge(self._too_large()), scope, receive, send)
            return

        received = 0
        body_done = False
        failure: ClientError | None = None
        response_started = False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.deadline_seconds

        async def guarded_receive() -> Message:
            nonlocal received, body_done, failure
            if body_done:  # after the body, receive() waits for a disconnect: no timeout
                return await receive()
            left = deadline - loop.time()
            try:
                message = await asyncio.wait_for(receive(), min(self.idle_timeout_seconds, left))
            except TimeoutError:
                failure = self._too_slow(overall=left <= self.idle_timeout_seconds)
                raise failure from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                body_done = not message.get("more_body", False)
                if received > self.max_body_bytes:
                    failure = UploadTooLarge(self._too_large())
                    raise failure
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal response_started
            # Once the body is refused, whatever the app answers (the form parser turns the
            # interruption into a generic 400) is replaced by the error it really is.
            if failure is not None:
                return
            response_started = True
            await send(message)

        with contextlib.suppress(UploadTooLarge, UploadTimeout):
            await self.app(scope, guarded_receive, guarded_send)
        if failure is not None and not response_started:
            await self._answer(failure, scope, receive, send)

    def _too_slow(self, *, overall: bool) -> UploadTimeout:
        if overall:
            return UploadTimeout(
                f"The request body was not complete {self.deadline_seconds:g} s after its headers."
            )
        return UploadTimeout(
            f"No data for {self.idle_timeout_seconds:.0f} s in the middle of the upload."
        )

    def _too_large(self) -> str:
        return f"The request body is larger than the limit of {self.max_body_bytes} bytes."

    async def _answer(self, error: ClientError, scope: Scope, receive: Receive, send: Send) -> None:
        response = problem_for(error, scope.get("path"))
        response.headers["Connection"] = "close"
        await response(scope, receive, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
