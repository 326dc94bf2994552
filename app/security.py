"""Who is calling: API keys (stored hashed), job ownership, and per-client rate limits.

Failed key attempts are counted per client address (``AuthFailures``); an address over the
limit is refused before its key is looked at, so guessing keys stalls.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from app.services import ServicesDep
from core.errors import Forbidden, RateLimited, Unauthorized
from core.jobs import JobRecord
from core.limits import AuthFailures, retry_after_header
from core.settings import ApiSettings


@dataclass(frozen=True)
class Principal:
    name: str
    admin: bool
    authenticated: bool

    def may_access(self, record: JobRecord) -> bool:
        return self.admin or record.owner is None or record.owner == self.name


ANONYMOUS = Principal(name="anonymous", admin=True, authenticated=False)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _presented_key(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return request.headers.get("x-api-key") or None


def identify(api: ApiSettings, presented: str | None) -> Principal:
    if presented is None:
        if api.auth_required:
            raise Unauthorized("Send an API key as 'Authorization: Bearer <key>' or 'X-API-Key'.")
        return ANONYMOUS
    digest = hash_key(presented)
    match = None
    for key in api.keys:  # compare every key in constant time: no early exit on a match
        if hmac.compare_digest(key.sha256, digest):
            match = key
    if match is None:
        raise Unauthorized("The API key is not valid.")
    return Principal(name=match.name, admin=match.admin, authenticated=True)


def client_address(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def _auth_failures(request: Request) -> AuthFailures:
    """The process's failure counter, built with the services in the lifespan."""
    failures: AuthFailures = request.app.state.auth_failures
    return failures


def _principal(request: Request, services: ServicesDep) -> Principal:
    presented = _presented_key(request)
    if presented is None:  # nothing to guess with: not throttled, not counted
        return identify(services.settings.api, None)
    failures = _auth_failures(request)
    address = client_address(request)
    wait = failures.blocked_for(address)
    if wait > 0:
        raise RateLimited(
            "Too many failed API-key attempts from this address; retry later.",
            retry_after_seconds=retry_after_header(wait),
        )
    try:
        return identify(services.settings.api, presented)
    except Unauthorized:
        failures.record_failure(address)
        raise


PrincipalDep = Annotated[Principal, Depends(_principal)]


def ensure_access(principal: Principal, record: JobRecord) -> None:
    if not principal.may_access(record):
        raise Forbidden("This job belongs to another API key.")


def client_identity(principal: Principal, request: Request) -> str:
    """Rate limits apply per API key, or per client address when there is none."""
    if principal.authenticated:
        return f"key:{principal.name}"
    return f"addr:{client_address(request)}"


def enforce_rate_limit(request: Request, services: ServicesDep, principal: PrincipalDep) -> None:
    wait = services.limiter.try_acquire(client_identity(principal, request))
    if wait > 0:
        raise RateLimited(
            "Too many jobs submitted; slow down.", retry_after_seconds=retry_after_header(wait)
        )


RateLimitDep = Depends(enforce_rate_limit)
