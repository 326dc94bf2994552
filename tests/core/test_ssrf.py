"""SSRF rules (core.addresses.refused_reason) for IPv6 forms that carry an IPv4 address,
the ranges ipaddress.is_global misses, and IPv4 spellings the resolver accepts.

Basic private/loopback cases and URL syntax are in test_webhooks.py. URLs with a literal
address go through the real resolver (getaddrinfo answers those without the network).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from core.addresses import refused_reason, resolve
from core.webhooks import WebhookRefused, check_url, deliver


def _url(address: str) -> str:
    return f"http://[{address}]/hook" if ":" in address else f"http://{address}/hook"


# (address, words the reason must contain)
REFUSED = [
    ("::7f00:1", "IPv4-compatible"),  # ::127.0.0.1
    ("::a9fe:a9fe", "IPv4-compatible"),  # ::169.254.169.254
    ("::808:808", "IPv4-compatible"),  # deprecated: refused even for a public IPv4 (8.8.8.8)
    ("::ffff:0:7f00:1", "IPv4-translated"),  # RFC 2765 form of 127.0.0.1
    ("::ffff:0:5db8:d70e", "IPv4-translated"),  # withdrawn: refused even for a public IPv4
    ("::ffff:169.254.169.254", "IPv4-mapped for 169.254.169.254"),
    ("::ffff:192.0.0.8", "IPv4-mapped for 192.0.0.8"),
    ("64:ff9b::a9fe:a9fe", "NAT64 address (64:ff9b::/96) for 169.254.169.254"),
    ("64:ff9b::a00:1", "NAT64 address (64:ff9b::/96) for 10.0.0.1"),
    ("64:ff9b::7f00:1", "NAT64 address (64:ff9b::/96) for 127.0.0.1"),
    ("64:ff9b::6440:1", "NAT64 address (64:ff9b::/96) for 100.64.0.1"),
    ("64:ff9b:1::a00:1", "NAT64 local-use"),
    ("64:ff9b:1:a00:1::", "NAT64 local-use"),  # the IPv4 sits where a /48 prefix puts it
    ("64:ff9b:1::5db8:d70e", "NAT64 local-use"),  # refused even for a public IPv4
    ("2002:a9fe:a9fe::", "6to4 address (2002::/16) for 169.254.169.254"),
    ("2002:7f00:1::1", "6to4 address (2002::/16) for 127.0.0.1"),
    ("2002:c0a8:101:1::1", "6to4 address (2002::/16) for 192.168.1.1"),
    ("2002::", "6to4 address (2002::/16) for 0.0.0.0"),
    ("2002:c058:6301::", "6to4 address (2002::/16) for 192.88.99.1"),
    # Teredo: server 10.0.0.1 in bits 32-64, client 10.0.0.1 as the last 32 bits XOR 0xffffffff
    ("2001:0:a00:1::f5ff:fffe", "Teredo (2001::/32), tunnelled to 10.0.0.1 via 10.0.0.1"),
    ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "Teredo"),  # public server and client: still refused
    ("2606:4700::5efe:a00:1", "ISATAP address for 10.0.0.1"),
    ("2606:4700::200:5efe:a9fe:a9fe", "ISATAP address for 169.254.169.254"),
    ("192.0.0.8", "IETF protocol assignments (192.0.0.0/24)"),
    ("192.0.0.9", "IETF protocol assignments"),
    ("192.0.0.170", "IETF protocol assignments"),
    ("192.0.0.255", "IETF protocol assignments"),
    ("192.88.99.1", "6to4 relay anycast"),
    ("198.18.0.1", "benchmarking"),
    ("203.0.113.5", "documentation"),
    ("255.255.255.255", "broadcast"),
    ("fec0::1", "site-local"),
    ("3fff::1", "documentation (3fff::/20)"),
    ("2001:db8::1", "documentation (2001:db8::/32)"),
    ("2001:2::1", "IETF protocol assignments (2001::/23)"),
    ("5f00::1", "segment routing"),
    ("100::1", "discard-only"),
    ("ff02::1", "multicast"),
    ("ff0e::1", "multicast"),
    ("fe80::1%eth0", "link-local"),
    ("4000::1", "not a globally reachable address"),  # outside 2000::/3: unallocated
]

ALLOWED = [
    "93.184.215.14",
    "8.8.8.8",
    "2606:4700::1111",
    "2001:4860:4860::8888",
    "::ffff:93.184.215.14",  # IPv4-mapped: the public IPv4 itself
    "64:ff9b::5db8:d70e",  # NAT64 (DNS64) for 93.184.215.14: allowed
    "2002:5db8:d70e::1",  # 6to4 for 93.184.215.14: allowed
    "2606:4700::200:5efe:808:808",  # ISATAP for 8.8.8.8
]


@pytest.mark.parametrize(("address", "reason"), REFUSED, ids=[row[0] for row in REFUSED])
def test_refused_forms(address: str, reason: str) -> None:
    text = refused_reason(address)
    assert text is not None and reason in text, text


@pytest.mark.parametrize(
    "address", [row[0] for row in REFUSED if "%" not in row[0]], ids=lambda a: str(a)
)
def test_refused_forms_through_check_url(address: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="core.addresses"), pytest.raises(WebhookRefused):
        check_url(_url(address))
    reason = refused_reason(address)
    assert reason is not None and reason in caplog.text  # the same predicate gave the reason


@pytest.mark.parametrize("address", ALLOWED)
def test_public_addresses_and_forms_are_allowed(address: str) -> None:
    assert refused_reason(address) is None
    parts, connect_to = check_url(_url(address))
    assert parts.path == "/hook"
    assert connect_to == address.removeprefix("::ffff:")  # IPv4-mapped: connect over IPv4


@pytest.mark.parametrize(
    ("spelling", "resolves_to"),
    [("2130706433", "127.0.0.1"), ("0x7f000001", "127.0.0.1"), ("0x7f.1", "127.0.0.1"),
     ("0177.0.0.1", "127.0.0.1"), ("127.1", "127.0.0.1"), ("017700000001", "127.0.0.1"),
     ("0xa9.0xfe.0xa9.0xfe", "169.254.169.254"), ("0251.0376.0251.0376", "169.254.169.254"),
     ("2852039166", "169.254.169.254"), ("10.1", "10.0.0.1"), ("0", "0.0.0.0"),
     ("１２７.0.0.1", "127.0.0.1")],  # fullwidth digits: IDNA (NFKC) in getaddrinfo
)  # fmt: skip
def test_numeric_ipv4_spellings_are_judged_by_what_they_resolve_to(
    spelling: str, resolves_to: str
) -> None:
    assert resolve(spelling, 80) == [resolves_to]  # glibc's inet_aton reading
    with pytest.raises(WebhookRefused):
        check_url(f"http://{spelling}/hook")
    with pytest.raises(WebhookRefused):
        check_url(f"https://{spelling}:8443/hook")


def test_a_numeric_spelling_of_a_public_address_passes_and_is_pinned() -> None:
    parts, connect_to = check_url("http://0x5d.0xb8.0xd7.0x0e/")
    assert (parts.hostname, connect_to) == ("0x5d.0xb8.0xd7.0x0e", "93.184.215.14")


@pytest.mark.parametrize(
    "url", ["http://[::ffff:0x7f.1]/", "http://[127.0.0.1]/", "http://h.example.com:99999/",
            "http://h.example.com:-1/"],
)  # fmt: skip
def test_urls_the_parser_rejects_are_refused_not_crashed(url: str) -> None:
    with pytest.raises(WebhookRefused):
        check_url(url, resolver=lambda host, port: ["93.184.215.14"])


@pytest.mark.parametrize(
    ("allow", "address", "allowed"),
    [(["10.0.0.0/8"], "10.0.0.1", True),
     (["10.0.0.0/8"], "::ffff:10.0.0.1", True),  # IPv4-mapped is the IPv4 address itself
     (["10.0.0.0/8"], "64:ff9b::a00:1", False),  # an IPv4 CIDR does not open NAT64 ...
     (["10.0.0.0/8"], "2002:a00:1::", False),  # ... nor 6to4
     (["10.0.0.0/8"], "::a00:1", False),  # ... nor IPv4-compatible
     (["10.0.0.0/8"], "::ffff:0:a00:1", False),  # ... nor IPv4-translated
     (["10.0.0.0/8"], "2001:0:a00:1::f5ff:fffe", False),  # ... nor Teredo
     (["10.0.0.0/8"], "11.0.0.1", True),  # public anyway
     (["10.0.0.0/8"], "172.16.0.1", False),
     (["10.0.0.7/32"], "10.0.0.8", False),
     (["10.0.0.7"], "10.0.0.7", True),  # a bare address is a /32
     (["10.0.0.1/8"], "10.9.9.9", True),  # host bits are tolerated (strict=False)
     (["64:ff9b::/96"], "64:ff9b::a00:1", True),  # the operator names the IPv6 prefix
     (["64:ff9b:1::/48"], "64:ff9b:1::a00:1", True),
     (["fd00::/8"], "fd12::1", True),
     (["fd00::/8"], "fc00::1", False),
     (["192.0.0.0/24"], "192.0.0.8", True),
     (["10.0.0.0/8", "169.254.169.254/32"], "::ffff:169.254.169.254", True),
     ([], "10.0.0.1", False)],
)  # fmt: skip
def test_allow_networks(allow: list[str], address: str, allowed: bool) -> None:
    assert (refused_reason(address, allow_networks=allow) is None) is allowed
    if allowed:
        check_url(_url(address), allow_networks=allow)
    else:
        with pytest.raises(WebhookRefused):
            check_url(_url(address), allow_networks=allow)


def test_an_invalid_allowed_network_is_a_configuration_error() -> None:
    with pytest.raises(ValueError):
        refused_reason("10.0.0.1", allow_networks=["10.0.0.0/33"])


def test_a_dns_answer_that_turns_into_nat64_metadata_is_caught_at_delivery() -> None:
    answers = iter([["2606:4700::1111"], ["2606:4700::1111", "64:ff9b::a9fe:a9fe"]])
    resolver = lambda host, port: next(answers)  # noqa: E731
    check_url("https://rebind.example.com/", resolver=resolver)  # at submission: public
    with pytest.raises(WebhookRefused):
        deliver("https://rebind.example.com/", {}, secret="s", resolver=resolver)


@pytest.fixture
def local_receiver() -> Iterator[tuple[int, list[str]]]:
    hosts: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            hosts.append(self.headers["Host"])
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1], hosts
    server.shutdown()


def test_an_allowed_ipv4_mapped_answer_is_delivered_over_ipv4(
    local_receiver: tuple[int, list[str]],
) -> None:
    port, hosts = local_receiver
    status = deliver(
        f"http://hooks.internal:{port}/h", {"id": "1"}, secret="s",
        allow_networks=["127.0.0.0/8"], resolver=lambda host, p: ["::ffff:127.0.0.1"],
    )  # fmt: skip
    assert status == 204
    assert hosts == [f"hooks.internal:{port}"]


def test_a_mistyped_allowed_network_is_refused_when_the_settings_load() -> None:
    from pydantic import ValidationError

    from core.settings import Settings

    with pytest.raises(ValidationError, match=r"10\.0\.0\.0/33"):
        Settings(webhooks={"allow_networks": ["10.0.0.0/33"]})
