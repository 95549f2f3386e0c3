"""The gateway's DNS proxy: guest queries go to one upstream resolver, answers come back,
and every A record is remembered (address -> names) so domain rules can be pinned to what
this VM actually resolved. Wire format by dnspython; UDP first, TCP when truncated.

Queries run as asyncio tasks (no thread pool to queue behind), at most
``IN_FLIGHT_PER_VM`` per VM with ``WAITING_PER_VM`` more waiting their turn, taken from
the VMs in turn; beyond that a VM's queries are answered SERVFAIL at once. So one VM
asking thousands of slow names delays no other VM's answer.

An address is pinned under the name the guest asked for and every name of the CNAME
chain that led to it; records outside that chain (an upstream volunteering an address
for another name) are never pinned. Addresses in protected ranges are taken out of
answers unless the gateway says they are reachable (DNS rebinding).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Awaitable, Callable
from ipaddress import IPv4Address
from pathlib import Path

import dns.asyncquery
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

log = logging.getLogger("capsa.net")

QUERY_TIMEOUT = 5.0
MAX_PINNED = 4096
MIN_TTL = 60
MAX_CHAIN = 8  # CNAMEs followed from the asked name; real chains are 1-3 long
# A stub resolver asks a few names at once (A and AAAA, search domains, a browser's
# prefetch): 16 in flight covers that; 64 waiting absorbs a burst; beyond, SERVFAIL.
IN_FLIGHT_PER_VM = 16
WAITING_PER_VM = 64
# Upstream sockets one network process keeps open at once, shared fairly between VMs.
IN_FLIGHT = 128

Allow = Callable[[str], bool]
Answerable = Callable[[IPv4Address], bool]


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


class FairQueue:
    """Jobs per client: at most ``per_client`` running and ``waiting`` queued for each,
    ``total`` running in all, started from the clients in turn."""

    def __init__(self, per_client: int, waiting: int, total: int) -> None:
        self.per_client, self.max_waiting, self.total = per_client, waiting, total
        self.waiting: dict[bytes, deque[Callable[[], Awaitable[None]]]] = {}
        self.running: Counter[bytes] = Counter()
        self.busy = 0  # jobs running in all
        self.turns: deque[bytes] = deque()  # clients with waiting jobs, next first
        self._tasks: set[asyncio.Task[None]] = set()
        self.closed = False

    def offer(self, client: bytes, job: Callable[[], Awaitable[None]]) -> bool:
        """Queue ``job``; False (and not queued) when the client already has its share."""
        queue = self.waiting.setdefault(client, deque())
        if self.closed or len(queue) >= self.max_waiting:
            return False
        if not queue:
            self.turns.append(client)
        queue.append(job)
        self._dispatch()
        return True

    def _dispatch(self) -> None:
        if self.closed:
            return
        passed = 0
        while self.turns and passed < len(self.turns) and self.busy < self.total:
            client = self.turns.popleft()
            if self.running[client] >= self.per_client:
                self.turns.append(client)
                passed += 1
                continue
            passed = 0
            queue = self.waiting[client]
            job = queue.popleft()
            if queue:
                self.turns.append(client)
            else:
                del self.waiting[client]
            self._start(client, job)

    def _start(self, client: bytes, job: Callable[[], Awaitable[None]]) -> None:
        async def run() -> None:
            await job()

        self.running[client] += 1
        self.busy += 1
        task = asyncio.get_running_loop().create_task(run())
        self._tasks.add(task)
        task.add_done_callback(lambda t: self._done(client, t))

    def _done(self, client: bytes, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self.busy -= 1
        self.running[client] -= 1
        if self.running[client] <= 0:
            del self.running[client]
        self._dispatch()

    def close(self) -> None:
        self.closed = True
        self.waiting.clear()
        self.turns.clear()
        for task in self._tasks:
            task.cancel()


class DnsProxy:
    def __init__(self, upstream: tuple[str, int] | None) -> None:
        self.upstream = upstream
        # address -> (names, expiry); bounded, oldest first out.
        self.pinned: OrderedDict[IPv4Address, tuple[set[str], float]] = OrderedDict()
        self.queue = FairQueue(IN_FLIGHT_PER_VM, WAITING_PER_VM, IN_FLIGHT)
        self.shed = 0

    def names_for(self, address: IPv4Address) -> frozenset[str]:
        entry = self.pinned.get(address)
        if entry is None or entry[1] < time.monotonic():
            return frozenset()
        return frozenset(entry[0])

    def submit(
        self,
        client: bytes,
        query_wire: bytes,
        reply: Callable[[bytes], None],
        allow: Allow | None = None,
        answerable: Answerable | None = None,
    ) -> None:
        """Answer a guest's query through ``reply``, in its turn among ``client``'s (its
        MAC); a client over its share is answered SERVFAIL at once."""

        async def job() -> None:
            answer = await self.resolve(query_wire, allow, answerable)
            if answer is not None:
                reply(answer)

        if self.queue.offer(client, job):
            return
        self.shed += 1
        failure = _failure(query_wire, dns.rcode.SERVFAIL)
        if failure is not None:
            reply(failure)

    async def resolve(
        self,
        query_wire: bytes,
        allow: Allow | None = None,
        answerable: Answerable | None = None,
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
            return _refused(query)
        if allow is not None:
            for question in query.question:
                name = question.name.to_text(omit_final_dot=True)
                if not allow(name):
                    log.info(
                        "dns query refused",
                        extra={"capsa_name": name, "capsa_reason": "the policy does not allow it"},
                    )
                    return _refused(query)
        host, port = self.upstream
        try:
            response, _ = await dns.asyncquery.udp_with_fallback(
                query, host, timeout=QUERY_TIMEOUT, port=port
            )
        except (dns.exception.DNSException, OSError):
            reply = dns.message.make_response(query)
            reply.set_rcode(dns.rcode.SERVFAIL)
            return reply.to_wire()
        if answerable is not None:
            _drop_unreachable(response, answerable)
        self._pin(response)
        return response.to_wire()

    def _pin(self, response: dns.message.Message) -> None:
        """Remember each address the answer gives for a question, under the asked name and
        every name of the CNAME chain to it."""
        now = time.monotonic()
        for question in response.question:
            names, addresses = _chain(response, question.name)
            if not addresses:
                continue
            names_text = {n.to_text(omit_final_dot=True).lower() for n in names}
            expiry = now + max(MIN_TTL, addresses.ttl)
            for rdata in addresses:
                address = IPv4Address(rdata.address)
                known, _ = self.pinned.pop(address, (set(), 0.0))
                self.pinned[address] = (known | names_text, expiry)
        while len(self.pinned) > MAX_PINNED:
            self.pinned.popitem(last=False)

    def close(self) -> None:
        self.queue.close()


def _chain(
    response: dns.message.Message, asked: dns.name.Name
) -> tuple[list[dns.name.Name], dns.rrset.RRset | None]:
    """The names from ``asked`` along its CNAMEs, and the A records at the end of them."""
    names, name = [asked], asked
    for _ in range(MAX_CHAIN):
        cname = _answer(response, name, dns.rdatatype.CNAME)
        if cname is None or not len(cname):
            break
        name = cname[0].target
        if name in names:
            break  # a loop: no address at its end
        names.append(name)
    return names, _answer(response, name, dns.rdatatype.A)


def _answer(
    response: dns.message.Message, name: dns.name.Name, rdtype: dns.rdatatype.RdataType
) -> dns.rrset.RRset | None:
    # A scan, not find_rrset: the message's index misses rrsets added or replaced directly.
    for rrset in response.answer:
        if rrset.name == name and rrset.rdclass == dns.rdataclass.IN and rrset.rdtype == rdtype:
            return rrset
    return None


def _drop_unreachable(response: dns.message.Message, answerable: Answerable) -> None:
    """Take addresses the guest may not reach out of the answer, so a name cannot rebind
    to loopback, the metadata service or a private network."""
    for section in (response.answer, response.additional):
        kept = []
        for rrset in section:
            if rrset.rdtype != dns.rdatatype.A:
                kept.append(rrset)
                continue
            good = [r for r in rrset if answerable(IPv4Address(r.address))]
            if len(good) != len(rrset):
                log.info(
                    "dns answer stripped",
                    extra={
                        "capsa_name": rrset.name.to_text(omit_final_dot=True),
                        "capsa_reason": "address in a protected range",
                    },
                )
            if good:
                kept.append(dns.rrset.from_rdata_list(rrset.name, rrset.ttl, good))
        section[:] = kept


def _refused(query: dns.message.Message) -> bytes:
    reply = dns.message.make_response(query)
    reply.set_rcode(dns.rcode.REFUSED)
    return bytes(reply.to_wire())


def _failure(query_wire: bytes, rcode: dns.rcode.Rcode) -> bytes | None:
    try:
        query = dns.message.from_wire(query_wire)
    except dns.exception.DNSException:
        return None
    if query.flags & dns.flags.QR:
        return None
    reply = dns.message.make_response(query)
    reply.set_rcode(rcode)
    return bytes(reply.to_wire())
