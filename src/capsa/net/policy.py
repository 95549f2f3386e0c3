"""Egress policy: ordered rules over a flow's destination, first terminal match wins.

A flow is judged once, when it starts (a TCP SYN, the first UDP datagram of a binding),
so a long download never dies because a DNS TTL expired. Domain rules match only
addresses this VM resolved for that name through the gateway (``Flow.domains``), never a
name the guest merely claims. Loopback, link-local and private ranges stay unreachable
even under ``allow_all()`` unless an allowing rule names the address explicitly.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network

from capsa.errors import InvalidConfig

log = logging.getLogger("capsa.net.policy")

MAX_DOMAIN = 253
# Never reached unless an allowing rule or a host alias names the address: "this"
# network, private ranges, shared address space (CGNAT: tailnets, the host's own 100.x),
# loopback, link-local (cloud metadata), IETF protocol assignments, benchmarking,
# multicast, reserved, broadcast.
PROTECTED_NETWORKS = tuple(
    IPv4Network(n)
    for n in (
        "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16",
        "172.16.0.0/12", "192.0.0.0/24", "192.168.0.0/16", "198.18.0.0/15", "224.0.0.0/4",
        "240.0.0.0/4", "255.255.255.255/32",
    )
)  # fmt: skip
# What a domain rule admits when it names no protocol or port: the web, inspected.
DOMAIN_DEFAULT_PORTS = (80, 443)


class IpProtocol(enum.Enum):
    """The transport a flow or a port forward uses (``capsa.Protocol`` in the seeds' API)."""

    TCP = "tcp"
    UDP = "udp"
    ICMP = "icmp"


Protocol = IpProtocol  # the seeds' name, kept public; capsa's own code says IpProtocol


class PolicyAction(enum.Enum):
    ALLOW = "allow"
    DENY = "deny"
    LOG = "log"  # not terminal: record the flow and keep looking


def normalize_domain(name: str) -> str:
    return name.strip().rstrip(".").lower()


@dataclass(frozen=True)
class DomainPattern:
    """``api.example.com`` (exactly that name) or ``*.github.com`` (subdomains, not the apex)."""

    suffix: str
    wildcard: bool

    @classmethod
    def parse(cls, pattern: str) -> DomainPattern:
        text = normalize_domain(pattern)
        wildcard = text.startswith("*.")
        name = text[2:] if wildcard else text
        labels = name.split(".")
        if not name or len(name) > MAX_DOMAIN or "*" in name or any(not lab for lab in labels):
            raise InvalidConfig(f"invalid domain pattern {pattern!r}")
        return cls(name, wildcard)

    def matches(self, domain: str) -> bool:
        name = normalize_domain(domain)
        if not name or len(name) > MAX_DOMAIN:
            return False
        if self.wildcard:
            return name.endswith("." + self.suffix)
        return name == self.suffix

    def __str__(self) -> str:
        return f"*.{self.suffix}" if self.wildcard else self.suffix


@dataclass(frozen=True)
class Flow:
    """The destination side of a new connection or datagram flow."""

    protocol: IpProtocol
    dst_ip: IPv4Address
    dst_port: int | None = None
    domains: frozenset[str] = frozenset()
    src_ip: IPv4Address | None = None


class MatchCriteria:
    """What a rule matches; build with the class methods (``MatchCriteria.port(443)``)."""

    ANY: MatchCriteria

    def matches(self, flow: Flow) -> bool:
        raise NotImplementedError

    def names_address(self, ip: IPv4Address) -> bool:
        """True when this criterion explicitly selects ``ip`` (so it may reach private ranges)."""
        return False

    def to_json(self) -> dict[str, object]:
        raise NotImplementedError

    @staticmethod
    def from_json(data: object) -> MatchCriteria:
        """Rebuild a criterion from :meth:`to_json` output (the network helper gets it so)."""
        if not isinstance(data, dict) or len(data) != 1:
            raise InvalidConfig(f"bad match criteria {data!r}")
        ((kind, value),) = data.items()
        if kind == "any":
            return MatchCriteria.ANY
        if kind == "ip":
            return MatchCriteria.ip(str(value))
        if kind == "ip_range":
            return MatchCriteria.ip_range(str(value))
        if kind == "ports" and isinstance(value, list) and len(value) == 2:
            return MatchCriteria.port_range(int(value[0]), int(value[1]))
        if kind == "port_set" and isinstance(value, list):
            return MatchCriteria.ports(*(int(v) for v in value))
        if kind == "gateway_dns":
            return MatchCriteria.gateway_dns()
        if kind == "protocol":
            return MatchCriteria.protocol(IpProtocol(value))
        if kind == "domain":
            return MatchCriteria.domain(str(value))
        if kind == "all" and isinstance(value, list):
            return MatchCriteria.all(*map(MatchCriteria.from_json, value))
        raise InvalidConfig(f"bad match criteria {data!r}")

    @staticmethod
    def ip(address: str | IPv4Address) -> MatchCriteria:
        return _Ip(_parse_ip(address))

    @staticmethod
    def ip_range(network: str | IPv4Address, prefix: int | None = None) -> MatchCriteria:
        text = f"{network}/{prefix}" if prefix is not None else str(network)
        try:
            return _IpRange(IPv4Network(text, strict=False))
        except ValueError:
            raise InvalidConfig(f"invalid IPv4 range {text!r}") from None

    @staticmethod
    def port(port: int) -> MatchCriteria:
        return _PortRange(_check_port(port), port)

    @staticmethod
    def port_range(start: int, end: int) -> MatchCriteria:
        if _check_port(start) > _check_port(end):
            raise InvalidConfig(f"port range {start}-{end} is empty")
        return _PortRange(start, end)

    @staticmethod
    def ports(*ports: int) -> MatchCriteria:
        """Any of these destination ports (``MatchCriteria.ports(80, 443)``)."""
        if not ports:
            raise InvalidConfig("a port set needs at least one port")
        return _PortSet(tuple(sorted({_check_port(p) for p in ports})))

    @staticmethod
    def protocol(protocol: Protocol) -> MatchCriteria:
        return _Protocol(protocol)

    @staticmethod
    def gateway_dns() -> MatchCriteria:
        """The gateway's own DNS proxy (what ``allow_dns()`` allows); no outside flow."""
        return _GatewayDns()

    @staticmethod
    def domain(pattern: str | DomainPattern) -> MatchCriteria:
        return _Domain(
            pattern if isinstance(pattern, DomainPattern) else DomainPattern.parse(pattern)
        )

    @staticmethod
    def all(*criteria: MatchCriteria) -> MatchCriteria:
        return _All(tuple(criteria))


def _parse_ip(address: str | IPv4Address) -> IPv4Address:
    try:
        return IPv4Address(address)
    except ValueError:
        raise InvalidConfig(f"invalid IPv4 address {address!r}") from None


def _check_port(port: int) -> int:
    if not isinstance(port, int) or not 0 < port <= 65535:
        raise InvalidConfig(f"port must be 1-65535, got {port!r}")
    return port


@dataclass(frozen=True)
class _Any(MatchCriteria):
    def matches(self, flow: Flow) -> bool:
        return True

    def to_json(self) -> dict[str, object]:
        return {"any": True}


@dataclass(frozen=True)
class _Ip(MatchCriteria):
    address: IPv4Address

    def matches(self, flow: Flow) -> bool:
        return flow.dst_ip == self.address

    def to_json(self) -> dict[str, object]:
        return {"ip": str(self.address)}

    def names_address(self, ip: IPv4Address) -> bool:
        return ip == self.address


@dataclass(frozen=True)
class _IpRange(MatchCriteria):
    network: IPv4Network

    def matches(self, flow: Flow) -> bool:
        return flow.dst_ip in self.network

    def to_json(self) -> dict[str, object]:
        return {"ip_range": str(self.network)}

    def names_address(self, ip: IPv4Address) -> bool:
        # Only a range that lies inside protected space names a protected address: a
        # catch-all or a broad public range (128.0.0.0/1) was not written to reach
        # 169.254.169.254.
        return ip in self.network and any(self.network.subnet_of(n) for n in PROTECTED_NETWORKS)


@dataclass(frozen=True)
class _PortRange(MatchCriteria):
    start: int
    end: int

    def matches(self, flow: Flow) -> bool:
        return flow.dst_port is not None and self.start <= flow.dst_port <= self.end

    def to_json(self) -> dict[str, object]:
        return {"ports": [self.start, self.end]}


@dataclass(frozen=True)
class _PortSet(MatchCriteria):
    numbers: tuple[int, ...]

    def matches(self, flow: Flow) -> bool:
        return flow.dst_port in self.numbers

    def to_json(self) -> dict[str, object]:
        return {"port_set": list(self.numbers)}


@dataclass(frozen=True)
class _GatewayDns(MatchCriteria):
    def matches(self, flow: Flow) -> bool:
        return False  # queries to the gateway's proxy are not flows; nothing else is DNS

    def to_json(self) -> dict[str, object]:
        return {"gateway_dns": True}


@dataclass(frozen=True)
class _Protocol(MatchCriteria):
    proto: IpProtocol

    def matches(self, flow: Flow) -> bool:
        return flow.protocol is self.proto

    def to_json(self) -> dict[str, object]:
        return {"protocol": self.proto.value}


@dataclass(frozen=True)
class _Domain(MatchCriteria):
    pattern: DomainPattern

    def matches(self, flow: Flow) -> bool:
        return any(self.pattern.matches(d) for d in flow.domains)

    def to_json(self) -> dict[str, object]:
        return {"domain": str(self.pattern)}


@dataclass(frozen=True)
class _All(MatchCriteria):
    criteria: tuple[MatchCriteria, ...]

    def matches(self, flow: Flow) -> bool:
        return all(c.matches(flow) for c in self.criteria)

    def names_address(self, ip: IPv4Address) -> bool:
        return any(c.names_address(ip) for c in self.criteria)

    def to_json(self) -> dict[str, object]:
        return {"all": [c.to_json() for c in self.criteria]}


MatchCriteria.ANY = _Any()


@dataclass(frozen=True)
class PolicyRule:
    action: PolicyAction
    criteria: MatchCriteria
    opaque: bool = False
    """A domain rule's TCP flows are relayed without checking their TLS SNI / HTTP Host."""


@dataclass(frozen=True)
class Decision:
    allowed: bool
    rule: int | None
    """Index of the deciding rule; None when the default action decided."""
    reason: str
    by_domain: bool = False
    """Allowed by a rule that names a domain."""
    inspect: bool = False
    """A TCP flow the client's TLS SNI / HTTP Host must name an allowed host for."""


@dataclass(frozen=True)
class NetworkPolicy:
    """``NetworkPolicy.deny_all().allow_dns().allow_domain("*.github.com")``."""

    default: PolicyAction = PolicyAction.ALLOW
    rules: tuple[PolicyRule, ...] = field(default=())

    @classmethod
    def allow_all(cls) -> NetworkPolicy:
        return cls(PolicyAction.ALLOW)

    @classmethod
    def deny_all(cls) -> NetworkPolicy:
        return cls(PolicyAction.DENY)

    def rule(
        self, action: PolicyAction, criteria: MatchCriteria, *, opaque: bool = False
    ) -> NetworkPolicy:
        """Append a rule. An ALLOW rule with a domain admits only the protocol and ports it
        names (none named: TCP 80 and 443), TCP after the SNI / Host check unless
        ``opaque``."""
        if opaque and (action is not PolicyAction.ALLOW or not _has_domain(criteria)):
            raise InvalidConfig("opaque applies to ALLOW rules that name a domain")
        return NetworkPolicy(self.default, (*self.rules, PolicyRule(action, criteria, opaque)))

    def _with(self, action: PolicyAction, items: Iterable[MatchCriteria]) -> NetworkPolicy:
        out = self
        for c in items:
            out = out.rule(action, c)
        return out

    def allow_dns(self) -> NetworkPolicy:
        """Let the guest use the gateway's resolver: the DNS proxy, whose every name is
        still judged by this policy (``deny_domain`` names are refused; once domain rules
        exist under a deny default, only the names they allow resolve). Port 53 anywhere
        else stays closed, so no name reaches another resolver."""
        return self.rule(PolicyAction.ALLOW, MatchCriteria.gateway_dns())

    def allow_https(self) -> NetworkPolicy:
        return self.rule(
            PolicyAction.ALLOW,
            MatchCriteria.all(MatchCriteria.port(443), MatchCriteria.protocol(IpProtocol.TCP)),
        )

    def allow_port(self, port: int) -> NetworkPolicy:
        return self.rule(PolicyAction.ALLOW, MatchCriteria.port(port))

    def deny_port(self, port: int) -> NetworkPolicy:
        return self.rule(PolicyAction.DENY, MatchCriteria.port(port))

    def allow_ip(self, address: str | IPv4Address) -> NetworkPolicy:
        return self.rule(PolicyAction.ALLOW, MatchCriteria.ip(address))

    def deny_ip(self, address: str | IPv4Address) -> NetworkPolicy:
        return self.rule(PolicyAction.DENY, MatchCriteria.ip(address))

    def allow_ip_range(self, network: str, prefix: int | None = None) -> NetworkPolicy:
        return self.rule(PolicyAction.ALLOW, MatchCriteria.ip_range(network, prefix))

    def allow_domain(
        self,
        *patterns: str,
        ports: Iterable[int] = DOMAIN_DEFAULT_PORTS,
        protocol: IpProtocol = IpProtocol.TCP,
        opaque: bool = False,
    ) -> NetworkPolicy:
        """Admit flows to addresses the gateway resolved for these names.

        ``ports``/``protocol``: what the rule admits (default: TCP to 80 and 443). A TCP
        connection is relayed only once its first bytes, a TLS ClientHello or an HTTP/1.x
        request, name an allowed host pinned to that address. ``opaque=True`` admits any
        bytes to addresses this name resolved to (TCP only: for protocols without a name
        to check). UDP (``protocol=IpProtocol.UDP``, e.g. QUIC on 443) and ICMP
        (``protocol=IpProtocol.ICMP``, ports ignored) carry no name, so naming them is
        the opt-in.
        """
        if opaque and protocol is not IpProtocol.TCP:
            raise InvalidConfig("opaque applies to TCP; UDP and ICMP carry no name to check")
        scope = [MatchCriteria.protocol(protocol)]
        if protocol is not IpProtocol.ICMP:
            scope.append(MatchCriteria.ports(*ports))
        out = self
        for pattern in patterns:
            criteria = MatchCriteria.all(MatchCriteria.domain(pattern), *scope)
            out = out.rule(PolicyAction.ALLOW, criteria, opaque=opaque)
        return out

    def deny_domain(self, *patterns: str) -> NetworkPolicy:
        return self._with(PolicyAction.DENY, map(MatchCriteria.domain, patterns))

    def log_domain(self, *patterns: str) -> NetworkPolicy:
        return self._with(PolicyAction.LOG, map(MatchCriteria.domain, patterns))

    def to_json(self) -> dict[str, object]:
        return {
            "default": self.default.value,
            "rules": [_rule_to_json(r) for r in self.rules],
        }

    @classmethod
    def from_json(cls, data: object) -> NetworkPolicy:
        if not isinstance(data, dict) or not isinstance(data.get("rules"), list):
            raise InvalidConfig(f"bad network policy {data!r}")
        rules = tuple(
            PolicyRule(
                PolicyAction(r["action"]),
                MatchCriteria.from_json(r["match"]),
                opaque=bool(r.get("opaque", False)),
            )
            for r in data["rules"]
        )
        return cls(PolicyAction(data["default"]), rules)

    def decide(self, flow: Flow) -> Decision:
        """Judge a new flow: the first matching ALLOW/DENY rule, else the default action."""
        for index, rule in enumerate(self.rules):
            if not rule.criteria.matches(flow):
                continue
            if rule.action is PolicyAction.ALLOW and not _within_domain_scope(rule.criteria, flow):
                continue
            if rule.action is PolicyAction.LOG:
                log.info(
                    "flow matched log rule",
                    extra={
                        "capsa_rule": index,
                        "capsa_protocol": flow.protocol.value,
                        "capsa_dst": str(flow.dst_ip),
                        "capsa_port": flow.dst_port,
                        "capsa_domains": sorted(flow.domains),
                    },
                )
                continue
            if rule.action is PolicyAction.DENY:
                return Decision(False, index, f"denied by rule {index}")
            if is_protected(flow.dst_ip) and not rule.criteria.names_address(flow.dst_ip):
                return Decision(
                    False, index, f"{flow.dst_ip} is protected; rule {index} does not name it"
                )
            by_domain = _has_domain(rule.criteria)
            inspect = by_domain and flow.protocol is IpProtocol.TCP and not rule.opaque
            return Decision(
                True, index, f"allowed by rule {index}", by_domain=by_domain, inspect=inspect
            )
        if self.default is PolicyAction.DENY:
            return Decision(False, None, "denied by default")
        if is_protected(flow.dst_ip):
            return Decision(
                False, None, f"{flow.dst_ip} is protected (loopback, private or link-local)"
            )
        return Decision(True, None, "allowed by default")

    def allows_domain_query(self, name: str) -> bool:
        """Whether the gateway may resolve ``name`` at all (denied names never go upstream).

        Under a deny default a name resolves only when a rule allows it: a domain rule
        matching it, or ``allow_dns()`` while no domain rule exists. So ``deny_all()``
        alone answers every name REFUSED, and no DNS tunnel works through it."""
        for rule in self.rules:
            if rule.action is PolicyAction.LOG or not _domain_rule_matches(rule.criteria, name):
                continue
            return rule.action is PolicyAction.ALLOW
        if self.default is PolicyAction.ALLOW:
            return True
        if any(r.action is PolicyAction.ALLOW and _has_domain(r.criteria) for r in self.rules):
            return False  # the policy speaks of domains: only the names it allows resolve
        return self.allows_gateway_dns()

    def allows_gateway_dns(self) -> bool:
        """Whether ``allow_dns()`` (or an allow-all default) opens the gateway's resolver."""
        if self.default is PolicyAction.ALLOW:
            return True
        return any(
            r.action is PolicyAction.ALLOW and isinstance(r.criteria, _GatewayDns)
            for r in self.rules
        )

    def names_address(self, ip: IPv4Address) -> bool:
        """Whether an allowing rule names ``ip`` itself (so it may reach a protected range)."""
        return any(
            r.action is PolicyAction.ALLOW and r.criteria.names_address(ip) for r in self.rules
        )


def is_protected(ip: IPv4Address) -> bool:
    """In a range no guest reaches unless a rule or a host alias names the address."""
    return any(ip in net for net in PROTECTED_NETWORKS)


def _rule_to_json(rule: PolicyRule) -> dict[str, object]:
    out: dict[str, object] = {"action": rule.action.value, "match": rule.criteria.to_json()}
    if rule.opaque:
        out["opaque"] = True
    return out


def _within_domain_scope(criteria: MatchCriteria, flow: Flow) -> bool:
    """A domain rule admits only what it names: the protocol (none named: TCP) and, for
    TCP and UDP, the ports (none named: 80 and 443). Rules without a domain are unchanged."""
    if not _has_domain(criteria):
        return True
    if not _names(criteria, _Protocol) and flow.protocol is not IpProtocol.TCP:
        return False
    if flow.protocol is IpProtocol.ICMP or _names(criteria, _PortRange, _PortSet):
        return True
    return flow.dst_port in DOMAIN_DEFAULT_PORTS


def _names(criteria: MatchCriteria, *kinds: type[MatchCriteria]) -> bool:
    if isinstance(criteria, kinds):
        return True
    return isinstance(criteria, _All) and any(_names(c, *kinds) for c in criteria.criteria)


def _domain_rule_matches(criteria: MatchCriteria, name: str) -> bool:
    if isinstance(criteria, _Domain):
        return criteria.pattern.matches(name)
    if isinstance(criteria, _All):
        return any(_domain_rule_matches(c, name) for c in criteria.criteria)
    return False


def _has_domain(criteria: MatchCriteria) -> bool:
    if isinstance(criteria, _Domain):
        return True
    return isinstance(criteria, _All) and any(_has_domain(c) for c in criteria.criteria)
