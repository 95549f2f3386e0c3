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
PROTECTED_NETWORKS = tuple(
    IPv4Network(n)
    for n in (
        "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16",
        "172.16.0.0/12", "192.168.0.0/16", "224.0.0.0/4", "240.0.0.0/4",
    )
)  # fmt: skip


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
    def protocol(protocol: Protocol) -> MatchCriteria:
        return _Protocol(protocol)

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
        # A catch-all range is not "naming" anything private.
        return self.network.prefixlen > 0 and ip in self.network


@dataclass(frozen=True)
class _PortRange(MatchCriteria):
    start: int
    end: int

    def matches(self, flow: Flow) -> bool:
        return flow.dst_port is not None and self.start <= flow.dst_port <= self.end

    def to_json(self) -> dict[str, object]:
        return {"ports": [self.start, self.end]}


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


@dataclass(frozen=True)
class Decision:
    allowed: bool
    rule: int | None
    """Index of the deciding rule; None when the default action decided."""
    reason: str
    by_domain: bool = False
    """Allowed by a rule that names a domain: the client's TLS SNI / HTTP Host must agree."""


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

    def rule(self, action: PolicyAction, criteria: MatchCriteria) -> NetworkPolicy:
        return NetworkPolicy(self.default, (*self.rules, PolicyRule(action, criteria)))

    def _with(self, action: PolicyAction, items: Iterable[MatchCriteria]) -> NetworkPolicy:
        out = self
        for c in items:
            out = out.rule(action, c)
        return out

    def allow_dns(self) -> NetworkPolicy:
        return self.rule(
            PolicyAction.ALLOW,
            MatchCriteria.all(MatchCriteria.port(53), MatchCriteria.protocol(IpProtocol.UDP)),
        )

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

    def allow_domain(self, *patterns: str) -> NetworkPolicy:
        return self._with(PolicyAction.ALLOW, map(MatchCriteria.domain, patterns))

    def deny_domain(self, *patterns: str) -> NetworkPolicy:
        return self._with(PolicyAction.DENY, map(MatchCriteria.domain, patterns))

    def log_domain(self, *patterns: str) -> NetworkPolicy:
        return self._with(PolicyAction.LOG, map(MatchCriteria.domain, patterns))

    def to_json(self) -> dict[str, object]:
        return {
            "default": self.default.value,
            "rules": [
                {"action": r.action.value, "match": r.criteria.to_json()} for r in self.rules
            ],
        }

    @classmethod
    def from_json(cls, data: object) -> NetworkPolicy:
        if not isinstance(data, dict) or not isinstance(data.get("rules"), list):
            raise InvalidConfig(f"bad network policy {data!r}")
        rules = tuple(
            PolicyRule(PolicyAction(r["action"]), MatchCriteria.from_json(r["match"]))
            for r in data["rules"]
        )
        return cls(PolicyAction(data["default"]), rules)

    def decide(self, flow: Flow) -> Decision:
        """Judge a new flow: the first matching ALLOW/DENY rule, else the default action."""
        for index, rule in enumerate(self.rules):
            if not rule.criteria.matches(flow):
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
            if _is_protected(flow.dst_ip) and not rule.criteria.names_address(flow.dst_ip):
                return Decision(
                    False, index, f"{flow.dst_ip} is protected; rule {index} does not name it"
                )
            return Decision(
                True, index, f"allowed by rule {index}", by_domain=_has_domain(rule.criteria)
            )
        if self.default is PolicyAction.DENY:
            return Decision(False, None, "denied by default")
        if _is_protected(flow.dst_ip):
            return Decision(
                False, None, f"{flow.dst_ip} is protected (loopback, private or link-local)"
            )
        return Decision(True, None, "allowed by default")

    def allows_domain_query(self, name: str) -> bool:
        """Whether the gateway may resolve ``name`` at all (denied names never go upstream)."""
        for rule in self.rules:
            if rule.action is PolicyAction.DENY and _domain_rule_matches(rule.criteria, name):
                return False
            if rule.action is PolicyAction.ALLOW and _domain_rule_matches(rule.criteria, name):
                return True
        if self.default is PolicyAction.ALLOW:
            return True
        # Deny by default: once the policy speaks of domains, only names it allows resolve.
        return not any(_has_domain(r.criteria) for r in self.rules)


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


def _is_protected(ip: IPv4Address) -> bool:
    return any(ip in net for net in PROTECTED_NETWORKS)
