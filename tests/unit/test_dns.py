from ipaddress import IPv4Address
from pathlib import Path

import dns.message
import dns.rrset

from capsa.net.dns import DnsProxy, host_resolver


def test_a_records_are_pinned_to_their_names() -> None:
    proxy = DnsProxy(None)
    query = dns.message.make_query("api.example.com", "A")
    reply = dns.message.make_response(query)
    reply.answer.append(dns.rrset.from_text("api.example.com.", 30, "IN", "A", "203.0.113.9"))
    proxy._pin(reply)
    assert proxy.names_for(IPv4Address("203.0.113.9")) == {"api.example.com"}
    assert proxy.names_for(IPv4Address("203.0.113.10")) == frozenset()


async def test_without_upstream_queries_are_refused_and_garbage_ignored() -> None:
    proxy = DnsProxy(None)
    answer = await proxy.resolve(dns.message.make_query("x.test", "A").to_wire())
    assert answer is not None and dns.message.from_wire(answer).rcode() == 5  # REFUSED
    assert await proxy.resolve(b"\x00garbage") is None


def test_host_resolver_reads_the_first_nameserver(tmp_path: Path) -> None:
    conf = tmp_path / "resolv.conf"
    conf.write_text("# comment\nsearch x\nnameserver 192.0.2.53\nnameserver 192.0.2.54\n")
    assert host_resolver(conf) == ("192.0.2.53", 53)
    assert host_resolver(tmp_path / "missing") is None
