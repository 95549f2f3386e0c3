"""The gateway's DNS proxy: guest queries go to one upstream resolver, answers come back,
and every A record is remembered (address -> names) so domain rules can be pinned to what
this VM actually resolved. Wire format by dnspython; UDP first, TCP when truncated.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable
from ipaddress import IPv4Address
from pathlib import Path

import dns.exception
import dns.flags
import dns.message
import dns.opcode
import dns.query
import dns.rcode
import dns.rdatatype

QUERY_TIMEOUT = 5.0
MAX_PINNED = 4096
MIN_TTL = 60


def host_resolver(resolv_conf: Path = Path("/etc/resolv.conf")) -> tuple[str, int] | None:
    """The host's first nameserver, as the default upstream."""
    try:
        for line in resolv_conf.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0] == "nameserver":
                return parts[1], 53
    except OSError:
        pass
    return None


class DnsProxy:
    def __init__(self, upstream: tuple[str, int] | None) -> None:
        self.upstream = upstream
        # address -> (names, expiry); bounded, oldest first out.
        self.pinned: OrderedDict[IPv4Address, tuple[set[str], float]] = OrderedDict()

    def names_for(self, address: IPv4Address) -> frozenset[str]:
        entry = self.pinned.get(address)
        if entry is None or entry[1] < time.monotonic():
            return frozenset()
        return frozenset(entry[0])

    async def resolve(
        self, query_wire: bytes, allow: Callable[[str], bool] | None = None
    ) -> bytes | None:
        """The answer to send back to the guest, or None to stay silent.

        A name ``allow`` rejects is answered REFUSED and never sent upstream, so a guest
        cannot smuggle data out through the names it asks for.
        """
        try:
            query = dns.message.from_wire(query_wire)
        except dns.exception.DNSException:
            return None
        if query.flags & dns.flags.QR or query.opcode() != dns.opcode.QUERY:
            return None  # a response or an update posing as a question: nothing to answer
        if self.upstream is None or not query.question:
            return self._refused(query)
        if allow is not None:
            for question in query.question:
                if not allow(question.name.to_text(omit_final_dot=True)):
                    return self._refused(query)
        host, port = self.upstream
        try:
            answer = await asyncio.to_thread(
                dns.query.udp_with_fallback, query, host, QUERY_TIMEOUT, port
            )
        except (dns.exception.DNSException, OSError):
            reply = dns.message.make_response(query)
            reply.set_rcode(dns.rcode.SERVFAIL)
            return reply.to_wire()
        response = answer[0]
        self._pin(response)
        return response.to_wire()

    def _refused(self, query: dns.message.Message) -> bytes:
        reply = dns.message.make_response(query)
        reply.set_rcode(dns.rcode.REFUSED)
        return reply.to_wire()

    def _pin(self, response: dns.message.Message) -> None:
        now = time.monotonic()
        for rrset in response.answer:
            if rrset.rdtype != dns.rdatatype.A:
                continue
            name = rrset.name.to_text(omit_final_dot=True).lower()
            expiry = now + max(MIN_TTL, rrset.ttl)
            for rdata in rrset:
                address = IPv4Address(rdata.address)
                names, _ = self.pinned.pop(address, (set(), 0.0))
                names.add(name)
                self.pinned[address] = (names, expiry)
        while len(self.pinned) > MAX_PINNED:
            self.pinned.popitem(last=False)
