"""Job-completion webhooks: HMAC-signed, retried with backoff, never sent to internal addresses.

A webhook URL is checked when the job is submitted and again, after a fresh DNS resolution,
at every delivery attempt; the request then goes to the very address that was checked (the
``Host`` header and TLS server name keep the original host name), so a DNS answer that
changes between the check and the connection cannot redirect it inside the network.
Private, loopback, link-local (cloud metadata), multicast and reserved addresses, and IPv6
forms that carry such an IPv4 address (NAT64, 6to4, ...), are refused unless an operator
allowlists them; the rules are ``core.addresses.refused_reason``.

Signature header: ``X-SpaSemSR-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of
"<t>.<body>" with the shared secret>``; receivers should also reject stale timestamps.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import time
from collections.abc import Iterable
from typing import Any
from urllib.parse import SplitResult, urlunsplit

import httpx

from core.addresses import Resolver, check_outbound_url, resolve
from core.errors import InvalidParameters

logger = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-SpaSemSR-Signature"


class WebhookRefused(InvalidParameters):
    title = "Webhook URL not allowed"


def check_url(
    url: str, *, allow_networks: Iterable[str] = (), resolver: Resolver = resolve
) -> tuple[SplitResult, str]:
    """Validate a webhook URL; returns it parsed and the address to connect to (the rules of
    ``core.addresses.check_outbound_url``)."""
    return check_outbound_url(
        url,
        what="webhook",
        refused=WebhookRefused,
        scheme_hint="The webhook URL must be an absolute http or https URL.",
        allow_networks=allow_networks,
        resolver=resolver,
    )


def sign(secret: str, body: bytes, timestamp: int) -> str:
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={digest.hexdigest()}"


def verify(secret: str, body: bytes, header: str, *, tolerance_seconds: int = 300) -> bool:
    """What a receiver does; used by the tests and offered to Python users."""
    fields = dict(part.split("=", 1) for part in header.split(",") if "=" in part)
    try:
        timestamp = int(fields["t"])
    except (KeyError, ValueError):
        return False
    if abs(time.time() - timestamp) > tolerance_seconds:
        return False
    return hmac.compare_digest(sign(secret, body, timestamp), header)


def deliver(
    url: str,
    payload: dict[str, Any],
    *,
    secret: str,
    allow_networks: Iterable[str] = (),
    timeout_seconds: float = 5.0,
    resolver: Resolver = resolve,
) -> int:
    """One delivery attempt; raises on a refused URL, a network error or a non-2xx answer."""
    parts, address = check_url(url, allow_networks=allow_networks, resolver=resolver)
    body = json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()
    pinned = ipaddress.ip_address(address)
    host = f"[{pinned}]" if pinned.version == 6 else str(pinned)
    netloc = f"{host}:{parts.port}" if parts.port else host
    target = urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, ""))
    headers = {
        "Host": parts.netloc,
        "Content-Type": "application/json",
        "User-Agent": "spasemsr-serve-webhook/1",
        SIGNATURE_HEADER: sign(secret, body, int(time.time())),
    }
    extensions = {"sni_hostname": parts.hostname} if parts.scheme == "https" else {}
    with httpx.Client(timeout=timeout_seconds, follow_redirects=False) as client:
        response = client.post(target, content=body, headers=headers, extensions=extensions)
    if not response.is_success:
        raise httpx.HTTPStatusError(
            f"webhook answered {response.status_code}", request=response.request, response=response
        )
    return response.status_code
