"""The gateway of a virtual network: the guest's router, NAT, DHCP and DNS server.

Frames arrive one at a time from the switch; replies go out through ``emit``. ARP, ICMP
echo and DHCP are answered here; DNS goes through the proxy (with the policy's say on
every name); UDP, TCP and ICMP echo to the outside are relayed through host sockets, each
new flow judged once by the policy. Port forwards open host listeners whose clients
become connections (or datagrams) towards a guest.

A frame's source MAC is its switch port's (the switch drops any other), so the MAC is
the VM: each IP address is bound to one MAC (its DHCP lease or reserved static address,
else the first MAC to use a free one), frames claiming another VM's address are dropped,
and connections, UDP flows, buffered bytes and DNS queries are counted per MAC.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from typing import cast

from capsa.net.dhcp import ACK, RELEASE, DhcpMessage, DhcpServer
from capsa.net.dns import DnsProxy
from capsa.net.frames import (
    ETHERTYPE_ARP,
    ETHERTYPE_IPV4,
    PROTO_ICMP,
    PROTO_TCP,
    PROTO_UDP,
    TCP_ACK,
    TCP_RST,
    TCP_SYN,
    Arp,
    Ethernet,
    FrameError,
    IcmpEcho,
    IPv4,
    Tcp,
    Udp,
)
from capsa.net.icmp import IcmpRelay
from capsa.net.policy import Flow, IpProtocol, NetworkPolicy, is_protected
from capsa.net.sniff import INSPECT_LIMIT, INSPECT_WAIT, Inspector, Kind
from capsa.net.spec import PortForward
from capsa.net.tcp import CONNECT_TIMEOUT, Budget, Key, TcpConnection, TcpState

log = logging.getLogger("capsa.net")
BROADCAST_MAC = b"\xff" * 6
BROADCAST_IP = IPv4Address("255.255.255.255")
UNSPECIFIED_IP = IPv4Address(0)
# Host sockets one network process relays at once (file descriptors, memory).
MAX_UDP_FLOWS = 256
MAX_TCP_CONNECTIONS = 1024
# One VM's share of those: room for a busy build or browser, while a quarter of the
# network's connections (and flows) always stays for the other VMs.
MAX_TCP_PER_VM = 256
MAX_UDP_PER_VM = 64
# Bytes one VM's connections may hold in the gateway (both directions, all of them): eight
# connections' full windows (tcp.RECV_BUFFER/SEND_BUFFER are 4 MiB each).
VM_BUFFER_BYTES = 32 << 20
# ... and all VMs of one network together: the network process's memory stays bounded
# (about 256 MiB of buffers) however many VMs and connections there are.
NETWORK_BUFFER_BYTES = 256 << 20
# Datagrams kept for a UDP flow while its host socket opens (a few milliseconds).
UDP_BACKLOG = 64
UDP_IDLE_SECONDS = 60.0
GATEWAY_MAC = bytes.fromhex("525400000001")
EPHEMERAL_PORTS = range(49152, 65536)


class Verdict(enum.Enum):
    DENY = "deny"
    ALLOW = "allow"
    INSPECT = "inspect"  # allowed by a domain rule: the client's SNI / Host must agree first


@dataclass
class Router:
    network: IPv4Network
    address: IPv4Address
    dhcp: DhcpServer
    mac: bytes = GATEWAY_MAC
    mtu: int = 1500
    nat: bool = True  # relay traffic to the outside (clusters may be internal only)
    dropped: int = 0
    denied: int = 0
    malformed: int = 0
    spoofed: int = 0  # frames claiming an address (or a DHCP client) that is another VM's
    # Each guest address and the one MAC allowed to use it.
    neighbours: dict[IPv4Address, bytes] = field(default_factory=dict)
    # Guest-visible address -> host address (tests map documentation ranges to loopback).
    aliases: dict[IPv4Address, str] = field(default_factory=dict)
    # Frames produced later (replies from host sockets) go out through this.
    emit: Callable[[bytes], None] = lambda frame: None
    udp_flows: dict[tuple[IPv4Address, int, IPv4Address, int], UdpFlow] = field(
        default_factory=dict
    )
    tcp: dict[Key, TcpConnection] = field(default_factory=dict)
    tcp_per_vm: Counter[bytes] = field(default_factory=Counter)
    udp_per_vm: Counter[bytes] = field(default_factory=Counter)
    buffers: Budget = field(default_factory=lambda: Budget(NETWORK_BUFFER_BYTES))
    vm_buffers: dict[bytes, Budget] = field(default_factory=dict)
    forwards: dict[tuple[IpProtocol, str, int], asyncio.AbstractServer | UdpForward] = field(
        default_factory=dict
    )
    udp_forward_ports: dict[int, UdpForward] = field(default_factory=dict)
    icmp: IcmpRelay | None = None
    dns: DnsProxy | None = None
    policy: NetworkPolicy | None = None
    _next_port: int = EPHEMERAL_PORTS.start
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    @classmethod
    def for_subnet(
        cls,
        subnet: str,
        mtu: int | None = None,
        aliases: dict[IPv4Address, str] | None = None,
        dns_upstream: tuple[str, int] | None = None,
        policy: NetworkPolicy | None = None,
        gateway_host: int = 2,
        nat: bool = True,
    ) -> Router:
        net = IPv4Network(subnet)
        gateway = net.network_address + gateway_host
        first, last = net.network_address + 15, net.broadcast_address - 1
        dns = gateway if nat else None
        dhcp = DhcpServer(net, gateway, first, last, dns=dns, mtu=mtu)
        proxy = DnsProxy(dns_upstream) if nat else None
        return cls(
            network=net,
            address=gateway,
            dhcp=dhcp,
            mtu=mtu or 1500,
            nat=nat,
            aliases=dict(aliases or {}),
            dns=proxy,
            policy=policy,
        )

    def handle(self, frame: bytes) -> list[bytes]:
        """Replies to one guest frame (possibly none). Malformed input is counted, not fatal."""
        try:
            eth = Ethernet.parse(frame)
            if eth.ethertype == ETHERTYPE_ARP:
                return self._arp(eth)
            if eth.ethertype == ETHERTYPE_IPV4 and eth.dst in (self.mac, BROADCAST_MAC):
                return self._ipv4(eth)
        except FrameError:
            self.malformed += 1
            return []
        self.dropped += 1
        return []

    # -- who is who -------------------------------------------------------------------------

    def arp_allowed(self, frame: bytes) -> bool:
        """Whether an ARP frame from a port may go anywhere: it must speak for its own MAC
        and an address that MAC may use (an ARP probe's 0.0.0.0 included)."""
        try:
            eth = Ethernet.parse(frame)
            arp = Arp.parse(eth.payload)
        except FrameError:
            return False
        return self._arp_claim_ok(eth, arp)

    def _arp_claim_ok(self, eth: Ethernet, arp: Arp) -> bool:
        if arp.sender_mac == eth.src and (
            arp.sender_ip == UNSPECIFIED_IP or self._may_use(eth.src, arp.sender_ip)
        ):
            return True
        self.spoofed += 1
        log.debug("arp from %s claiming %s dropped", eth.src.hex(":"), arp.sender_ip)
        return False

    def _may_use(self, mac: bytes, ip: IPv4Address) -> bool:
        """Whether ``mac`` may send from ``ip``; binds a free address to it on first use."""
        if self.neighbours.get(ip) == mac:
            return True
        net = self.network
        if ip not in net or ip in (self.address, net.network_address, net.broadcast_address):
            return False
        assigned = self.dhcp.assigned(mac)
        if assigned is not None:
            if ip != assigned:
                return False
        elif self.dhcp.owner(ip) not in (None, mac) or ip in self.neighbours:
            return False  # another VM's lease, reservation or address in use
        self._bind(mac, ip)
        return True

    def _bind(self, mac: bytes, ip: IPv4Address) -> None:
        """``ip`` is ``mac``'s (its only one): a lease or reservation overrides whoever
        used the address before."""
        self._unbind(mac)
        self.neighbours[ip] = mac

    def _unbind(self, mac: bytes) -> None:
        for ip in [ip for ip, known in self.neighbours.items() if known == mac]:
            del self.neighbours[ip]

    def reserve(self, mac: bytes, ip: IPv4Address) -> None:
        """A VM's static address: only that MAC may use it from now on."""
        self.dhcp.reserved[mac] = ip
        if self.neighbours.get(ip) not in (None, mac):
            del self.neighbours[ip]

    def forget(self, mac: bytes) -> None:
        """A VM left the network: its lease, address, connections and flows go with it."""
        self.dhcp.reserved.pop(mac, None)
        self.dhcp.leases.pop(mac, None)
        self._unbind(mac)
        for conn in [c for c in self.tcp.values() if c.guest_mac == mac]:
            conn.reset()
        for flow in [f for f in self.udp_flows.values() if f.mac == mac]:
            flow.close()
        self.vm_buffers.pop(mac, None)

    # -- frames for the gateway itself ----------------------------------------------------

    def _arp(self, eth: Ethernet) -> list[bytes]:
        arp = Arp.parse(eth.payload)
        if not self._arp_claim_ok(eth, arp):
            return []
        if arp.op != 1 or arp.target_ip != self.address or arp.sender_ip == UNSPECIFIED_IP:
            return []
        reply = Arp(2, self.mac, self.address, arp.sender_mac, arp.sender_ip)
        return [Ethernet(eth.src, self.mac, ETHERTYPE_ARP, reply.build()).build()]

    def _ipv4(self, eth: Ethernet) -> list[bytes]:
        ip = IPv4.parse(eth.payload)
        if ip.protocol == PROTO_UDP:
            udp = Udp.parse(ip)
            if udp.dst_port == 67:
                return self._dhcp(eth, udp)
        if not self._may_use(eth.src, ip.src):
            self.spoofed += 1
            return []
        if ip.protocol == PROTO_TCP:
            # Guest segments come over a local socket from QEMU, so nothing can corrupt
            # them in transit; a checksum check would only catch a guest's own deliberate
            # garbage (which gains it nothing) and costs half the CPU of a bulk upload.
            self._tcp(eth, ip, Tcp.parse(ip, verify=False))
            return []
        if ip.protocol == PROTO_UDP:
            if ip.dst == self.address and udp.dst_port == 53 and self.dns is not None:
                self._dns(eth, ip, udp)
                return []
            if ip.dst == self.address and udp.dst_port in self.udp_forward_ports:
                self.udp_forward_ports[udp.dst_port].reply(udp.dst_port, udp.payload)
                return []
            if self._outside(ip.dst):
                self._udp_out(eth, ip, udp)
                return []
        if ip.protocol == PROTO_ICMP:
            echo = IcmpEcho.parse(ip)
            if echo.kind == 8 and ip.dst == self.address:
                reply = IcmpEcho(0, echo.ident, echo.seq, echo.payload).build()
                packet = IPv4(self.address, ip.src, PROTO_ICMP, reply).build()
                return [Ethernet(eth.src, self.mac, ETHERTYPE_IPV4, packet).build()]
            if echo.kind == 8 and self._outside(ip.dst):
                self._icmp_out(eth, ip, echo)
                return []
        self.dropped += 1
        return []

    def _outside(self, dst: IPv4Address) -> bool:
        """Addressed beyond this network (so NAT applies), as opposed to on the segment."""
        if dst in self.network or dst.is_multicast or dst == BROADCAST_IP:
            return dst in self.aliases
        return True

    def _dhcp(self, eth: Ethernet, udp: Udp) -> list[bytes]:
        msg = DhcpMessage.parse(udp.payload)
        if msg.chaddr != eth.src:
            self.spoofed += 1
            log.debug("dhcp for %s from port %s ignored", msg.chaddr.hex(":"), eth.src.hex(":"))
            return []
        busy = {ip for ip, mac in self.neighbours.items() if mac != eth.src}
        decision = self.dhcp.handle(msg, busy)
        if msg.msg_type == RELEASE:
            self._unbind(eth.src)
        if decision is None:
            return []
        kind, ip = decision
        if kind == ACK:
            self._bind(eth.src, ip)
        payload = Udp(67, 68, self.dhcp.reply(msg, kind, ip))
        packet = IPv4(
            self.address, BROADCAST_IP, PROTO_UDP, payload.build(self.address, BROADCAST_IP)
        ).build()
        # To the client's own port: another VM has no business reading its lease.
        return [Ethernet(eth.src, self.mac, ETHERTYPE_IPV4, packet).build()]

    # -- the policy -------------------------------------------------------------------------

    def _decide(self, protocol: IpProtocol, dst: IPv4Address, port: int | None) -> Verdict:
        """The policy's verdict on a new flow."""
        if self.policy is None:
            return Verdict.ALLOW
        domains = self.dns.names_for(dst) if self.dns is not None else frozenset()
        decision = self.policy.decide(Flow(protocol, dst, port, domains))
        if not decision.allowed:
            self.denied += 1
            _log_refusal("flow denied", protocol, dst, port, decision.reason)
            return Verdict.DENY
        return Verdict.INSPECT if decision.inspect else Verdict.ALLOW

    def _dns(self, eth: Ethernet, ip: IPv4, udp: Udp) -> None:
        assert self.dns is not None
        key = (ip.src, udp.src_port, self.address, 53)
        mac = eth.src
        allow = self.policy.allows_domain_query if self.policy is not None else None
        self.dns.submit(
            mac,
            udp.payload,
            lambda answer: self.udp_reply(key, answer, mac),
            allow=allow,
            answerable=self.reachable,
        )

    def reachable(self, dst: IPv4Address) -> bool:
        """Whether a guest may be handed ``dst`` at all: not in a protected range, unless a
        host alias or an allowing rule names it (what a DNS answer may contain)."""
        return dst in self.aliases or not is_protected(dst) or self._named(dst)

    def _named(self, dst: IPv4Address) -> bool:
        return self.policy is not None and self.policy.names_address(dst)

    def host_address(self, dst: IPv4Address) -> str | None:
        """Where a guest destination really goes; None when it must stay unreachable."""
        if dst in self.aliases:
            return self.aliases[dst]
        if not self.nat or dst in self.network:
            return None
        unroutable = (
            is_protected(dst)
            or dst.is_loopback
            or dst.is_link_local
            or dst.is_private
            or dst.is_multicast
            or dst.is_reserved
        )
        if unroutable and not self._named(dst):
            return None  # the host's own and private networks need an alias or a rule
        return str(dst)

    def _budget(self, mac: bytes) -> Budget:
        budget = self.vm_buffers.get(mac)
        if budget is None:
            budget = self.vm_buffers[mac] = Budget(VM_BUFFER_BYTES, parent=self.buffers)
        return budget

    # -- UDP --------------------------------------------------------------------------------

    def _udp_out(self, eth: Ethernet, ip: IPv4, udp: Udp) -> None:
        key = (ip.src, udp.src_port, ip.dst, udp.dst_port)
        flow = self.udp_flows.get(key)
        if flow is None:
            flow = self._new_udp_flow(eth.src, key)
            if flow is None:
                return
        flow.send(udp.payload)

    def _new_udp_flow(
        self, mac: bytes, key: tuple[IPv4Address, int, IPv4Address, int]
    ) -> UdpFlow | None:
        _, _, dst, port = key
        target = self.host_address(dst)
        if target is None:
            self.dropped += 1
            _log_refusal("flow refused", IpProtocol.UDP, dst, port, "unreachable address")
            return None
        if len(self.udp_flows) >= MAX_UDP_FLOWS or self.udp_per_vm[mac] >= MAX_UDP_PER_VM:
            self.dropped += 1
            _log_refusal("flow refused", IpProtocol.UDP, dst, port, "too many UDP flows")
            return None
        if self._decide(IpProtocol.UDP, dst, port) is Verdict.DENY:
            return None
        flow = UdpFlow(self, key, (target, port), mac)
        self.udp_flows[key] = flow
        self.udp_per_vm[mac] += 1
        return flow

    def udp_flow_closed(self, flow: UdpFlow) -> None:
        if self.udp_flows.get(flow.key) is flow:
            del self.udp_flows[flow.key]
            self.udp_per_vm[flow.mac] -= 1
            if self.udp_per_vm[flow.mac] <= 0:
                del self.udp_per_vm[flow.mac]

    def udp_reply(
        self,
        key: tuple[IPv4Address, int, IPv4Address, int],
        data: bytes,
        mac: bytes | None = None,
    ) -> None:
        guest_ip, guest_port, remote_ip, remote_port = key
        if mac is None:
            mac = self.neighbours.get(guest_ip, BROADCAST_MAC)
        self.send_udp(mac, (remote_ip, remote_port), (guest_ip, guest_port), data)

    def send_udp(
        self,
        mac: bytes,
        src: tuple[IPv4Address, int],
        dst: tuple[IPv4Address, int],
        data: bytes,
    ) -> None:
        payload = Udp(src[1], dst[1], data).build(src[0], dst[0])
        packet = IPv4(src[0], dst[0], PROTO_UDP, payload).build()
        self.emit(Ethernet(mac, self.mac, ETHERTYPE_IPV4, packet).build())

    # -- ICMP -------------------------------------------------------------------------------

    def _icmp_out(self, eth: Ethernet, ip: IPv4, echo: IcmpEcho) -> None:
        target = self.host_address(ip.dst)
        if target is None or self.icmp is None:
            self.dropped += 1
            return
        known = self.icmp.knows(ip.src, echo.ident, ip.dst)
        if not known and self._decide(IpProtocol.ICMP, ip.dst, None) is Verdict.DENY:
            return
        self.icmp.send(ip.src, ip.dst, target, echo)

    def icmp_reply(self, guest: IPv4Address, remote: IPv4Address, echo: IcmpEcho) -> None:
        mac = self.neighbours.get(guest, BROADCAST_MAC)
        packet = IPv4(remote, guest, PROTO_ICMP, echo.build()).build()
        self.emit(Ethernet(mac, self.mac, ETHERTYPE_IPV4, packet).build())

    # -- TCP --------------------------------------------------------------------------------

    def _tcp(self, eth: Ethernet, ip: IPv4, tcp: Tcp) -> None:
        key = (ip.src, tcp.src_port, ip.dst, tcp.dst_port)
        conn = self.tcp.get(key)
        if conn is not None:
            if conn.guest_mac == eth.src:  # another VM on a cluster must not inject
                conn.segment(tcp)
            return
        if tcp.flags & TCP_RST:
            return
        if tcp.flags & (TCP_SYN | TCP_ACK) != TCP_SYN:
            self._refuse(eth, ip, tcp)  # a segment for no connection we know
            return
        target = self.host_address(ip.dst) if self._outside(ip.dst) else None
        refusal = "unreachable address" if target is None else self._tcp_refusal(eth.src)
        if target is None or refusal:
            _log_refusal("connection refused", IpProtocol.TCP, ip.dst, tcp.dst_port, refusal)
            self._refuse(eth, ip, tcp)
            return
        verdict = self._decide(IpProtocol.TCP, ip.dst, tcp.dst_port)
        if verdict is Verdict.DENY:
            self._refuse(eth, ip, tcp)
            return
        conn = self._new_connection(key, eth.src)
        conn.accept_syn(tcp)
        if verdict is Verdict.INSPECT:
            self._inspect_then_connect(conn, target)
        else:
            self._spawn(self._connect(conn, target))

    def _tcp_refusal(self, mac: bytes) -> str:
        """Why ``mac`` can have no new connection now ('' if it can)."""
        if len(self.tcp) >= MAX_TCP_CONNECTIONS:
            return "the network has too many connections"
        if self.tcp_per_vm[mac] >= MAX_TCP_PER_VM:
            return "this VM has too many connections"
        return ""

    def _new_connection(self, key: Key, guest_mac: bytes) -> TcpConnection:
        conn = TcpConnection(
            key,
            guest_mac,
            self._tcp_send,
            self._tcp_closed,
            self.mtu - 40,
            budget=self._budget(guest_mac),
        )
        self.tcp[key] = conn
        self.tcp_per_vm[guest_mac] += 1
        return conn

    def _refuse(self, eth: Ethernet, ip: IPv4, tcp: Tcp) -> None:
        """RST, as a closed port would answer (RFC 793 reset generation)."""
        if tcp.flags & TCP_ACK:
            seq, ack, flags = tcp.ack, 0, TCP_RST
        else:
            length = len(tcp.payload) + (1 if tcp.flags & TCP_SYN else 0)
            seq, ack, flags = 0, tcp.seq + length, TCP_RST | TCP_ACK
        rst = Tcp(tcp.dst_port, tcp.src_port, seq, ack, flags, 0, b"").build(ip.dst, ip.src)
        packet = IPv4(ip.dst, ip.src, PROTO_TCP, rst).build()
        self.emit(Ethernet(eth.src, self.mac, ETHERTYPE_IPV4, packet).build())

    def _tcp_send(self, conn: TcpConnection, tcp: Tcp) -> None:
        guest_ip, _, remote_ip, _ = conn.key
        packet = IPv4(remote_ip, guest_ip, PROTO_TCP, tcp.build(remote_ip, guest_ip)).build()
        self.emit(Ethernet(conn.guest_mac, self.mac, ETHERTYPE_IPV4, packet).build())

    def _tcp_closed(self, conn: TcpConnection) -> None:
        if self.tcp.get(conn.key) is conn:
            del self.tcp[conn.key]
            self.tcp_per_vm[conn.guest_mac] -= 1
            if self.tcp_per_vm[conn.guest_mac] <= 0:
                del self.tcp_per_vm[conn.guest_mac]

    def _spawn(self, coro: Coroutine[object, object, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _connect(self, conn: TcpConnection, target: str) -> None:
        """Open the host side, then let the guest's handshake complete (or refuse it)."""
        port = conn.key[3]
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(
                loop.create_connection(lambda: conn, target, port), CONNECT_TIMEOUT
            )
        except (OSError, TimeoutError) as e:
            log.info("tcp %s:%s unreachable: %s", target, port, e)
            conn.reset()
            return
        if conn.state is TcpState.CLOSED:  # the guest gave up while we connected
            if conn.transport is not None:
                conn.transport.abort()
            return
        if conn.pending is not None:
            conn.flush_pending()
        else:
            conn.host_ready()

    def _inspect_then_connect(self, conn: TcpConnection, target: str) -> None:
        """Complete the handshake locally, read the client's first bytes, check the name
        they ask for, and only then open the host side: a denied name never reaches it.
        No name in time, or first bytes that are neither a TLS ClientHello nor an HTTP/1.x
        request, and the connection is reset."""
        conn.pending = bytearray()
        conn.hold_limit = INSPECT_LIMIT
        inspector = Inspector()
        decided = False

        def decide(refusal: str) -> None:
            nonlocal decided
            if decided or conn.state is TcpState.CLOSED:
                return
            decided = True
            conn.on_pending = None
            timer.cancel()
            if refusal:
                self.denied += 1
                _, _, dst, port = conn.key
                _log_refusal("connection refused", IpProtocol.TCP, dst, port, refusal)
                conn.reset()
                return
            self._spawn(self._connect(conn, target))

        def on_pending(_: TcpConnection, data: bytes) -> None:
            found = inspector.feed(data)
            if found.kind is Kind.INCOMPLETE:
                return
            if found.kind is Kind.OPAQUE:
                decide("its first bytes are neither a TLS ClientHello nor an HTTP/1.x request")
                return
            decide(self._name_check(conn, found.name))

        conn.on_pending = on_pending
        timer = asyncio.get_running_loop().call_later(
            INSPECT_WAIT, lambda: decide(f"no TLS SNI / HTTP Host within {INSPECT_WAIT:g} s")
        )
        conn.host_ready()

    def _name_check(self, conn: TcpConnection, name: str | None) -> str:
        """Why the name the client presented is refused ('' when it is fine)."""
        if name is None:
            return "no single well-formed TLS SNI / HTTP Host to check against the domain rule"
        _, _, dst, port = conn.key
        pinned = self.dns.names_for(dst) if self.dns is not None else frozenset()
        if name not in pinned:
            return f"client asked for {name!r}, but {dst} was resolved for {sorted(pinned)}"
        if self.policy is None:
            return ""
        decision = self.policy.decide(Flow(IpProtocol.TCP, dst, port, frozenset({name})))
        return "" if decision.allowed else f"{name!r}: {decision.reason}"

    # -- port forwarding --------------------------------------------------------------------

    def guest_address(self, mac: bytes | None) -> IPv4Address | None:
        if mac is None:
            leases = list(self.dhcp.leases.values()) or list(self.neighbours)
            return leases[0] if leases else None
        if mac in self.dhcp.leases:
            return self.dhcp.leases[mac]
        for ip, known in self.neighbours.items():
            if known == mac:
                return ip
        return self.dhcp.reserved.get(mac)

    def guest_mac(self, ip: IPv4Address, mac: bytes | None) -> bytes:
        if mac is not None:
            return mac
        for known, lease in self.dhcp.leases.items():
            if lease == ip:
                return known
        return self.neighbours.get(ip, BROADCAST_MAC)

    def ephemeral_port(self) -> int:
        used = {k[3] for k in self.tcp if k[2] == self.address} | set(self.udp_forward_ports)
        for _ in range(len(EPHEMERAL_PORTS)):
            port = self._next_port
            self._next_port = port + 1 if port + 1 < EPHEMERAL_PORTS.stop else EPHEMERAL_PORTS.start
            if port not in used:
                return port
        raise OSError("no free gateway port")

    async def add_forward(self, fwd: PortForward) -> int:
        """Start listening for ``fwd``; returns the host port (useful when asked for 0)."""
        key = (fwd.protocol, fwd.host_addr, fwd.host_port)
        if fwd.host_port and key in self.forwards:
            raise ValueError(f"{fwd.protocol.value} port {fwd.host_port} is already forwarded")
        loop = asyncio.get_running_loop()
        if fwd.protocol is IpProtocol.TCP:
            server = await loop.create_server(
                lambda: self._forwarded_connection(fwd), fwd.host_addr, fwd.host_port
            )
            port = int(server.sockets[0].getsockname()[1])
            self.forwards[(fwd.protocol, fwd.host_addr, port)] = server
            return port
        if fwd.protocol is IpProtocol.UDP:
            forward = UdpForward(self, fwd)
            await loop.create_datagram_endpoint(
                lambda: forward, local_addr=(fwd.host_addr, fwd.host_port)
            )
            port = forward.port
            self.forwards[(fwd.protocol, fwd.host_addr, port)] = forward
            return port
        raise ValueError(f"cannot forward {fwd.protocol.value}")

    async def remove_forward(self, protocol: IpProtocol, host_addr: str, host_port: int) -> None:
        entry = self.forwards.pop((protocol, host_addr, host_port), None)
        if entry is None:
            raise ValueError(f"no {protocol.value} forward on {host_addr}:{host_port}")
        entry.close()
        if isinstance(entry, asyncio.AbstractServer):
            await entry.wait_closed()

    def _forwarded_connection(self, fwd: PortForward) -> asyncio.Protocol:
        guest = self.guest_address(fwd.mac)
        if guest is None:
            return _Refuse()
        mac = self.guest_mac(guest, fwd.mac)
        refusal = self._tcp_refusal(mac)
        if refusal:
            log.info("forwarded connection to %s:%s refused: %s", guest, fwd.guest_port, refusal)
            return _Refuse()
        key = (guest, fwd.guest_port, self.address, self.ephemeral_port())
        conn = self._new_connection(key, mac)

        def connected(c: TcpConnection) -> None:
            assert c.transport is not None
            c.transport.pause_reading()
            c.reading_paused = True
            c.open_to_guest()

        conn.on_connected = connected
        return conn

    def close(self) -> None:
        for conn in list(self.tcp.values()):
            conn.reset()
        for flow in list(self.udp_flows.values()):
            flow.close()
        for entry in self.forwards.values():
            entry.close()
        self.forwards.clear()
        if self.icmp is not None:
            self.icmp.close()
        if self.dns is not None:
            self.dns.close()


class _Refuse(asyncio.Protocol):
    """A forwarded client that arrived before the guest has an address: closed at once."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()


class UdpForward(asyncio.DatagramProtocol):
    """Host datagrams on a forwarded port go to the guest; its answers go back to the sender.

    Each host client gets its own gateway port, so replies find their way back.
    """

    def __init__(self, gateway: Router, fwd: PortForward) -> None:
        self.gateway, self.fwd = gateway, fwd
        self.transport: asyncio.DatagramTransport | None = None
        self.port = fwd.host_port
        self.clients: dict[tuple[str, int], int] = {}
        self.by_port: dict[int, tuple[str, int]] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)
        self.port = int(self.transport.get_extra_info("sockname")[1])

    def datagram_received(self, data: bytes, addr: tuple[str | object, int]) -> None:
        client = (str(addr[0]), int(addr[1]))
        guest = self.gateway.guest_address(self.fwd.mac)
        if guest is None:
            return
        port = self.clients.get(client)
        if port is None:
            port = self.gateway.ephemeral_port()
            self.clients[client], self.by_port[port] = port, client
            self.gateway.udp_forward_ports[port] = self
        mac = self.gateway.guest_mac(guest, self.fwd.mac)
        self.gateway.send_udp(mac, (self.gateway.address, port), (guest, self.fwd.guest_port), data)

    def reply(self, gateway_port: int, data: bytes) -> None:
        client = self.by_port.get(gateway_port)
        if client is not None and self.transport is not None:
            self.transport.sendto(data, client)

    def close(self) -> None:
        for port in self.by_port:
            self.gateway.udp_forward_ports.pop(port, None)
        if self.transport is not None:
            self.transport.close()


class UdpFlow(asyncio.DatagramProtocol):
    """One guest UDP flow relayed through a connected host socket."""

    def __init__(
        self,
        gateway: Router,
        key: tuple[IPv4Address, int, IPv4Address, int],
        target: tuple[str, int],
        mac: bytes,
    ) -> None:
        self.gateway, self.key, self.mac = gateway, key, mac
        self.transport: asyncio.DatagramTransport | None = None
        self.backlog: list[bytes] = []
        self.idle: asyncio.TimerHandle | None = None
        loop = asyncio.get_running_loop()
        self.opening = loop.create_task(
            loop.create_datagram_endpoint(lambda: self, remote_addr=target)
        )
        self.opening.add_done_callback(self._opened)

    def _opened(self, task: asyncio.Task[tuple[asyncio.BaseTransport, object]]) -> None:
        if task.cancelled() or task.exception() is not None:
            log.info("udp flow %s could not open: %s", self.key, task.exception())
            self.close()
            return
        if self.transport is None:
            self.close()
            return
        backlog, self.backlog = self.backlog, []
        for data in backlog:
            self.transport.sendto(data)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | object, int]) -> None:
        self._touch()
        self.gateway.udp_reply(self.key, data, self.mac)

    def error_received(self, exc: Exception) -> None:
        log.debug("udp flow %s: %s", self.key, exc)

    def send(self, data: bytes) -> None:
        self._touch()
        if self.transport is None:
            if len(self.backlog) < UDP_BACKLOG:
                self.backlog.append(data)
        else:
            self.transport.sendto(data)

    def _touch(self) -> None:
        if self.idle is not None:
            self.idle.cancel()
        self.idle = asyncio.get_running_loop().call_later(UDP_IDLE_SECONDS, self.close)

    def close(self) -> None:
        self.gateway.udp_flow_closed(self)
        if self.idle is not None:
            self.idle.cancel()
        if self.transport is not None:
            self.transport.close()


def _log_refusal(
    message: str, protocol: IpProtocol, dst: IPv4Address, port: int | None, reason: str
) -> None:
    log.info(
        "%s: %s %s:%s: %s",
        message,
        protocol.value,
        dst,
        port,
        reason,
        extra={
            "capsa_protocol": protocol.value,
            "capsa_dst": str(dst),
            "capsa_port": port,
            "capsa_reason": reason,
        },
    )
