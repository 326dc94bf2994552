"""Image inputs given by reference: a ``data:`` URI, one of our own ``/v1/files``, or an
external http(s) URL, turned into bytes under the upload byte cap.

External URLs follow the webhook SSRF rules (``core.addresses.refused_reason``): the host is
resolved, every address must be allowed, and the connection goes to the very address that was
checked (the ``Host`` header and TLS server name keep the host name), so a DNS answer that
changes between the check and the connection cannot point it inside the network. Redirects are
followed by hand, each target checked the same way. The body is read in chunks and refused at
the first byte past the cap, within a deadline for the whole fetch.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import logging
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import SplitResult, unquote_to_bytes, urljoin, urlsplit, urlunsplit

import httpx

from core.addresses import Resolver, check_outbound_url, resolve
from core.errors import InvalidParameters, UploadTooLarge
from core.files import FileStore, is_file_id

logger = logging.getLogger(__name__)

MAX_REDIRECTS = 3
_OWN_FILE_PATH = re.compile(r"^/v1/files/([0-9a-f]{32})(?:/download)?/?$")


class ImageUrlRefused(InvalidParameters):
    title = "Image URL not allowed"


class ImageUrlUnreachable(InvalidParameters):
    title = "Image URL could not be fetched"


@dataclass(frozen=True)
class InputContext:
    """What resolving one input needs to know about the request and the service."""

    files: FileStore
    owner: str
    admin: bool
    own_hosts: frozenset[str]
    """``host[:port]`` of this service as clients reach it (its file URLs point there)."""
    max_bytes: int
    allow_networks: tuple[str, ...] = ()
    timeout_seconds: float = 10.0
    deadline_seconds: float = 30.0
    resolver: Resolver = resolve


def image_bytes(value: object, context: InputContext) -> bytes:
    """The bytes of an ``image`` input; at most one past the cap (enough to refuse them)."""
    if not isinstance(value, str) or not value:
        raise InvalidParameters("input.image: give a file URL, a data: URI or an http(s) URL.")
    if value.startswith("data:"):
        return _data_uri(value, context.max_bytes)
    own = _own_file_id(value, context.own_hosts)
    if own is not None:
        stored = context.files.get(own, owner=context.owner, admin=context.admin)
        return context.files.read(stored)
    return fetch(value, context)


def _own_file_id(value: str, own_hosts: frozenset[str]) -> str | None:
    if is_file_id(value):
        return value
    try:
        parts = urlsplit(value)
    except ValueError:
        return None
    match = _OWN_FILE_PATH.match(parts.path)
    if match is None or parts.netloc.lower() not in own_hosts:
        return None
    return match.group(1)


def _data_uri(value: str, max_bytes: int) -> bytes:
    header, comma, payload = value[len("data:") :].partition(",")
    if not comma:
        raise InvalidParameters("input.image: the data: URI has no ',' before its data.")
    # Refused before decoding: base64 is 4 characters per 3 bytes.
    if len(payload) * 3 // 4 > max_bytes + 3:
        raise UploadTooLarge(f"The image is larger than the limit of {max_bytes} bytes.")
    if header.endswith(";base64"):
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise InvalidParameters("input.image: the data: URI is not valid base64.") from exc
    return unquote_to_bytes(payload)


def check_fetch_url(
    url: str, *, allow_networks: Iterable[str] = (), resolver: Resolver = resolve
) -> tuple[SplitResult, str]:
    """The URL parsed and the checked address to connect to, or ``ImageUrlRefused`` (the
    webhooks' rules: ``core.addresses.check_outbound_url``)."""
    return check_outbound_url(
        url,
        what="image",
        refused=ImageUrlRefused,
        scheme_hint="input.image: give a file URL, a data: URI or an http(s) URL.",
        allow_networks=allow_networks,
        resolver=resolver,
    )


def fetch(url: str, context: InputContext) -> bytes:
    """GET an external image, pinned to checked addresses, each redirect checked again."""
    deadline = time.monotonic() + context.deadline_seconds
    timeout = httpx.Timeout(context.timeout_seconds)
    with httpx.Client(timeout=timeout, follow_redirects=False, trust_env=False) as client:
        for _ in range(MAX_REDIRECTS + 1):
            parts, address = check_fetch_url(
                url, allow_networks=context.allow_networks, resolver=context.resolver
            )
            target, headers, extensions = _pinned(parts, address)
            try:
                with client.stream("GET", target, headers=headers, extensions=extensions) as got:
                    if got.is_redirect and "location" in got.headers:
                        url = urljoin(url, got.headers["location"])
                        continue
                    if not got.is_success:
                        raise ImageUrlUnreachable(f"The image URL answered {got.status_code}.")
                    return _capped_body(got, context.max_bytes, deadline)
            except httpx.HTTPError as exc:
                raise ImageUrlUnreachable(
                    f"The image URL could not be fetched ({type(exc).__name__})."
                ) from exc
    raise ImageUrlUnreachable(f"The image URL redirected more than {MAX_REDIRECTS} times.")


def _pinned(parts: SplitResult, address: str) -> tuple[str, dict[str, str], dict[str, str]]:
    pinned = ipaddress.ip_address(address)
    host = f"[{pinned}]" if pinned.version == 6 else str(pinned)
    netloc = f"{host}:{parts.port}" if parts.port else host
    target = urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, ""))
    headers = {"Host": parts.netloc.rpartition("@")[2], "User-Agent": "spasemsr-serve-fetch/1"}
    extensions = {"sni_hostname": parts.hostname or ""} if parts.scheme == "https" else {}
    return target, headers, extensions


def _capped_body(response: httpx.Response, max_bytes: int, deadline: float) -> bytes:
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise UploadTooLarge(f"The image is larger than the limit of {max_bytes} bytes.")
    chunks: list[bytes] = []
    size = 0
    for chunk in response.iter_bytes():
        size += len(chunk)
        if size > max_bytes:
            raise UploadTooLarge(f"The image is larger than the limit of {max_bytes} bytes.")
        if time.monotonic() > deadline:
            raise ImageUrlUnreachable("The image URL sent its body too slowly.")
        chunks.append(chunk)
    return b"".join(chunks)
