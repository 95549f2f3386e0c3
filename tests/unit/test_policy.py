from ipaddress import IPv4Address

import pytest

import capsa
from capsa.net.policy import (
    DomainPattern,
    Flow,
    MatchCriteria,
    NetworkPolicy,
    PolicyAction,
    Protocol,
)

TEST_NET = IPv4Address("198.51.100.7")


def flow(
    proto: Protocol = Protocol.TCP,
    ip: str = "198.51.100.7",
    port: int | None = 443,
    domains: tuple[str, ...] = (),
) -> Flow:
    return Flow(proto, IPv4Address(ip), port, frozenset(domains))


def test_domain_patterns() -> None:
    exact, wild = DomainPattern.parse("API.Example.com."), DomainPattern.parse("*.github.com")
    assert exact.matches("api.example.com") and not exact.matches("x.api.example.com")
    assert wild.matches("api.github.com") and wild.matches("a.b.github.com")
    assert not wild.matches("github.com") and not wild.matches("evil-github.com")
    assert not wild.matches("a" * 250 + ".github.com")
    for bad in ("", "*.", "a..b", "*.*.x"):
        with pytest.raises(capsa.InvalidConfig):
            DomainPattern.parse(bad)


def test_deny_all_allow_dns() -> None:
    p = NetworkPolicy.deny_all().allow_dns()
    # The gateway's resolver only: port 53 elsewhere stays closed (no other resolver, no
    # tunnel over UDP 53).
    assert p.allows_gateway_dns() and not NetworkPolicy.deny_all().allows_gateway_dns()
    assert not p.decide(flow(Protocol.UDP, port=53)).allowed
    assert not p.decide(flow(Protocol.TCP, port=53)).allowed
    assert not p.decide(flow(port=443)).allowed


def test_https_only() -> None:
    p = NetworkPolicy.deny_all().allow_https()
    assert p.decide(flow(port=443)).allowed
    assert not p.decide(flow(port=80)).allowed
    assert not p.decide(flow(Protocol.UDP, port=443)).allowed


def test_allow_ip_and_range() -> None:
    p = NetworkPolicy.deny_all().allow_ip("203.0.113.5").allow_ip_range("198.51.100.0", 24)
    assert p.decide(flow(ip="203.0.113.5", port=80)).allowed
    assert not p.decide(flow(ip="203.0.113.6", port=80)).allowed
    assert p.decide(flow(ip="198.51.100.200", port=None, proto=Protocol.ICMP)).allowed


def test_domain_rules_match_only_pinned_resolutions() -> None:
    p = NetworkPolicy.deny_all().allow_domain("api.example.com", "*.github.com")
    assert p.decide(flow(domains=("api.example.com",))).allowed
    assert p.decide(flow(domains=("raw.github.com",))).allowed
    assert not p.decide(flow(domains=("github.com",))).allowed  # apex is not a subdomain
    assert not p.decide(flow()).allowed  # a hard-coded IP resolved by nobody


def test_domain_and_port() -> None:
    p = NetworkPolicy.deny_all().rule(
        PolicyAction.ALLOW,
        MatchCriteria.all(MatchCriteria.domain("api.example.com"), MatchCriteria.port(443)),
    )
    assert p.decide(flow(domains=("api.example.com",))).allowed
    assert not p.decide(flow(port=80, domains=("api.example.com",))).allowed


def test_log_is_not_terminal_and_emits_a_record(caplog: pytest.LogCaptureFixture) -> None:
    p = NetworkPolicy.deny_all().log_domain("*.example.com").allow_port(443)
    with caplog.at_level("INFO", logger="capsa.net.policy"):
        d = p.decide(flow(domains=("www.example.com",)))
    assert d.allowed and d.rule == 1
    (record,) = caplog.records
    assert record.capsa_dst == "198.51.100.7" and record.capsa_domains == ["www.example.com"]  # type: ignore[attr-defined]


def test_first_match_wins_and_deny_port() -> None:
    p = NetworkPolicy.allow_all().deny_port(25).allow_port(25)
    assert not p.decide(flow(port=25)).allowed
    assert p.decide(flow(port=26)).allowed


def test_protected_ranges_need_an_explicit_rule() -> None:
    p = NetworkPolicy.allow_all()
    for ip in ("127.0.0.1", "169.254.169.254", "10.1.2.3", "192.168.1.1", "172.20.0.1"):
        assert not p.decide(flow(ip=ip)).allowed, ip
    assert not NetworkPolicy.deny_all().allow_port(443).decide(flow(ip="10.0.0.1")).allowed
    assert (
        not NetworkPolicy.deny_all().allow_ip_range("0.0.0.0/0").decide(flow(ip="10.0.0.1")).allowed
    )
    assert NetworkPolicy.deny_all().allow_ip("10.0.0.1").decide(flow(ip="10.0.0.1")).allowed
    assert (
        NetworkPolicy.allow_all().allow_ip_range("10.0.0.0/8").decide(flow(ip="10.9.9.9")).allowed
    )


def test_dns_queries_for_denied_names_never_go_upstream() -> None:
    p = NetworkPolicy.deny_all().allow_dns().allow_domain("*.example.com")
    assert p.allows_domain_query("api.example.com")
    assert not p.allows_domain_query("secret-data.attacker.test")
    assert (
        not NetworkPolicy.allow_all().deny_domain("*.evil.test").allows_domain_query("x.evil.test")
    )
    assert NetworkPolicy.deny_all().allow_dns().allows_domain_query("anything.test")


def test_bad_inputs_are_clear_errors() -> None:
    for make in (
        lambda: MatchCriteria.port(0),
        lambda: MatchCriteria.port_range(10, 5),
        lambda: MatchCriteria.ip("300.1.1.1"),
        lambda: MatchCriteria.ip_range("10.0.0.0", 40),
    ):
        with pytest.raises(capsa.InvalidConfig):
            make()


def test_policy_json_round_trip() -> None:
    p = (
        NetworkPolicy.deny_all()
        .allow_dns()
        .allow_https()
        .allow_ip("203.0.113.5")
        .allow_ip_range("198.51.100.0/24")
        .allow_domain("*.github.com")
        .rule(PolicyAction.LOG, MatchCriteria.ANY)
        .rule(PolicyAction.ALLOW, MatchCriteria.port_range(8000, 8100))
    )
    assert NetworkPolicy.from_json(p.to_json()) == p
    with pytest.raises(capsa.InvalidConfig):
        NetworkPolicy.from_json({"default": "deny", "rules": [{"action": "allow", "match": {}}]})
