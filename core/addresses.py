"""Which IP addresses the service may connect to on a user's behalf (the SSRF rules).

``refused_reason`` is the single predicate: the webhook checks use it at submission and at
every delivery, and anything else that fetches a user-supplied URL should use it too, on every
address the host name resolves to, and then connect to the very address it checked.

An address is refused when it is not globally reachable: private, loopback, link-local (cloud
metadata), shared (CGNAT), documentation, benchmarking, IETF protocol assignments
(192.0.0.0/24, 2001::/23), multicast, reserved or deprecated ranges. The ranges are listed
here rather than left to ``ipaddress.is_global``, whose answers change between Python
releases and which, on 3.11, calls 192.0.0.8, fec0::/10, 3fff::/20, ::/96 and 64:ff9b::/96
global; ``is_global`` and the other ``ipaddress`` flags are consulted as well, so whatever
either source refuses stays refused.

IPv6 addresses that carry an IPv4 address are judged by that IPv4 address:

* IPv4-mapped ``::ffff:0:0/96`` *is* the IPv4 address on a dual-stack socket; it is unwrapped
  and judged (``allow_networks`` included) exactly as the IPv4 address.
* NAT64 well-known prefix ``64:ff9b::/96`` (RFC 6052) and 6to4 ``2002::/16`` (RFC 3056) are
  allowed when the embedded IPv4 address is public (DNS64 gives IPv6-only hosts such
  addresses for ordinary public sites) and refused otherwise.
* ISATAP interface identifiers (``…:0:5efe:a.b.c.d``, RFC 5214) are refused when the embedded
  IPv4 address is not public.
* IPv4-compatible ``::/96`` (deprecated, RFC 4291), IPv4-translated ``::ffff:0:0:0/96``
  (RFC 2765, withdrawn), the NAT64 local-use prefix ``64:ff9b:1::/48`` (RFC 8215: not global,
  and where the IPv4 address sits depends on the operator's prefix length) and Teredo
  ``2001::/32`` (RFC 4380) are refused whatever they embed.

``allow_networks`` (operator CIDRs such as ``10.0.0.0/8``) allows an address that lies in one
of them as written, or, for an IPv4-mapped address, whose IPv4 address does. An IPv4 network
does not open the other embedded forms: ``10.0.0.0/8`` allows ``10.0.0.1`` and
``::ffff:10.0.0.1`` but not ``64:ff9b::a00:1`` or ``2002:a00:1::``, which reach the IPv4
address through a translator or a tunnel; an operator who wants those lists the IPv6 prefix.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Callable, Iterable
from urllib.parse import SplitResult, urlsplit

logger = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def _table(*rows: tuple[str, str]) -> tuple[tuple[IPNetwork, str], ...]:
    return tuple((ipaddress.ip_network(cidr), label) for cidr, label in rows)


# IANA IPv4/IPv6 special-purpose registries: the blocks that are not globally reachable, plus
# the deprecated ones; checked before the ipaddress flags so the reason names the block.
_REFUSED_V4 = _table(
    ("0.0.0.0/8", "'this network' (0.0.0.0/8)"),
    ("10.0.0.0/8", "private (10.0.0.0/8)"),
    ("100.64.0.0/10", "shared address space (CGNAT, 100.64.0.0/10)"),
    ("127.0.0.0/8", "loopback (127.0.0.0/8)"),
    ("169.254.0.0/16", "link-local, cloud metadata (169.254.0.0/16)"),
    ("172.16.0.0/12", "private (172.16.0.0/12)"),
    ("192.0.0.0/24", "IETF protocol assignments (192.0.0.0/24)"),
    ("192.0.2.0/24", "documentation (192.0.2.0/24)"),
    ("192.88.99.0/24", "deprecated 6to4 relay anycast (192.88.99.0/24)"),
    ("192.168.0.0/16", "private (192.168.0.0/16)"),
    ("198.18.0.0/15", "benchmarking (198.18.0.0/15)"),
    ("198.51.100.0/24", "documentation (198.51.100.0/24)"),
    ("203.0.113.0/24", "documentation (203.0.113.0/24)"),
    ("224.0.0.0/4", "multicast (224.0.0.0/4)"),
    ("240.0.0.0/4", "reserved or broadcast (240.0.0.0/4)"),
)
_REFUSED_V6 = _table(
    ("::/128", "unspecified (::)"),
    ("::1/128", "loopback (::1)"),
    ("::/96", "deprecated IPv4-compatible (::/96)"),
    ("::ffff:0:0:0/96", "withdrawn IPv4-translated (::ffff:0:0:0/96)"),
    ("64:ff9b:1::/48", "NAT64 local-use (64:ff9b:1::/48)"),
    ("100::/64", "discard-only (100::/64)"),
    ("2001::/32", "Teredo (2001::/32)"),
    ("2001::/23", "IETF protocol assignments (2001::/23)"),
    ("2001:db8::/32", "documentation (2001:db8::/32)"),
    ("3fff::/20", "documentation (3fff::/20)"),
    ("5f00::/16", "segment routing (5f00::/16)"),
    ("fc00::/7", "unique local (fc00::/7)"),
    ("fe80::/10", "link-local (fe80::/10)"),
    ("fec0::/10", "deprecated site-local (fec0::/10)"),
    ("ff00::/8", "multicast (ff00::/8)"),
)
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_ISATAP_IID = 0x0000_5EFE  # the upper half of the interface identifier, u/g bits cleared
_UG_BITS_CLEARED = 0xFCFF_FFFF


def _in_allowed(address: IPAddress, networks: Iterable[IPNetwork]) -> bool:
    # ``in`` is False across IP versions, so IPv4 networks never match IPv6 addresses.
    return any(address in network for network in networks)


def _plain_reason(address: IPAddress) -> str | None:
    """Why an address, taken as written, is not globally reachable unicast; None if it is."""
    table = _REFUSED_V4 if address.version == 4 else _REFUSED_V6
    for network, label in table:
        if address in network:
            return f"{address} is {label}"
    if (
        not address.is_global
        or address.is_private
        or address.is_multicast
        or address.is_reserved
        or address.is_loopback
        or address.is_link_local
        or address.is_unspecified
        or (isinstance(address, ipaddress.IPv6Address) and address.is_site_local)
    ):
        return f"{address} is not a globally reachable address"
    return None


def _embedded_reason(address: ipaddress.IPv6Address) -> str | None:
    """Why an IPv6 address that carries an IPv4 address is refused for it; None otherwise."""
    low32 = ipaddress.IPv4Address(int(address) & 0xFFFF_FFFF)
    embedded: list[tuple[str, ipaddress.IPv4Address]] = []
    if address in _NAT64:
        embedded.append(("a NAT64 address (64:ff9b::/96)", low32))
    if address.sixtofour is not None:
        embedded.append(("a 6to4 address (2002::/16)", address.sixtofour))
    if (int(address) >> 32) & _UG_BITS_CLEARED == _ISATAP_IID:
        embedded.append(("an ISATAP address", low32))
    for form, ipv4 in embedded:
        reason = _plain_reason(ipv4)
        if reason is not None:
            return f"{address} is {form} for {reason}"
    return None


def refused_reason(
    address: IPAddress | str, *, allow_networks: Iterable[str | IPNetwork] = ()
) -> str | None:
    """Why the service must not connect to ``address``; None when it may.

    ``allow_networks`` are operator CIDRs that are allowed although not public (see the
    module documentation for how they apply to IPv6 forms that carry an IPv4 address). An
    invalid CIDR raises ``ValueError``.
    """
    if isinstance(address, str):
        address = ipaddress.ip_address(address)
    networks = [ipaddress.ip_network(network, strict=False) for network in allow_networks]
    if _in_allowed(address, networks):
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        ipv4 = address.ipv4_mapped
        if _in_allowed(ipv4, networks):
            return None
        reason = _plain_reason(ipv4)
        return None if reason is None else f"{address} is IPv4-mapped for {reason}"
    if isinstance(address, ipaddress.IPv6Address):
        reason = _embedded_reason(address)
        if reason is not None:
            return reason
        if address.teredo is not None:
            server, client = address.teredo
            return f"{address} is Teredo (2001::/32), tunnelled to {client} via {server}"
        if address in _NAT64:  # public IPv4 behind the well-known prefix: allowed
            return None
    return _plain_reason(address)


MAX_URL_LENGTH = 2048
Resolver = Callable[[str, int], list[str]]


def resolve(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({str(info[4][0]) for info in infos})


def check_outbound_url(
    url: str,
    *,
    what: str,
    refused: Callable[[str], Exception],
    scheme_hint: str,
    allow_networks: Iterable[str] = (),
    resolver: Resolver = resolve,
) -> tuple[SplitResult, str]:
    """A URL the service will connect to (a webhook, an image input), parsed, and the address
    to connect to: every address its host resolves to must pass ``refused_reason``, and an
    IPv4-mapped answer is returned as its IPv4 address, the one that was judged. ``refused``
    builds the error (``what`` names the URL in its messages)."""
    if len(url) > MAX_URL_LENGTH:
        raise refused(f"The {what} URL is longer than {MAX_URL_LENGTH} characters.")
    try:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:  # a bad port, or brackets around something not an IPv6 address
        raise refused(f"The {what} URL is malformed.") from exc
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise refused(scheme_hint)
    if parts.username or parts.password:
        raise refused(f"The {what} URL must not carry credentials.")
    try:
        addresses = [ipaddress.ip_address(text) for text in resolver(parts.hostname, port)]
    except (OSError, UnicodeError, ValueError) as exc:
        raise refused(f"The {what} host {parts.hostname!r} does not resolve.") from exc
    if not addresses:
        raise refused(f"The {what} host {parts.hostname!r} does not resolve.")
    networks = [ipaddress.ip_network(network, strict=False) for network in allow_networks]
    for address in addresses:
        reason = refused_reason(address, allow_networks=networks)
        if reason is not None:
            # The reason stays in the log: it may name an internal address of the host.
            logger.info("%s URL refused for host %r: %s", what, parts.hostname, reason)
            raise refused(
                f"The {what} URL points at a private, loopback, link-local or reserved address."
            )
    first = addresses[0]
    if isinstance(first, ipaddress.IPv6Address) and first.ipv4_mapped is not None:
        first = first.ipv4_mapped
    return parts, str(first)
