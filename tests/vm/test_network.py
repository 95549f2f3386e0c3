"""The userspace gateway so far: DHCP leases and ping to the gateway (NAT is issue 4)."""

from __future__ import annotations

import asyncio

import pytest

import capsa

pytestmark = pytest.mark.vm


async def _address(agent: capsa.AgentClient) -> str:
    for _ in range(100):
        out = (await agent.exec("ip -4 -o addr show eth0")).stdout.decode().split()
        if "inet" in out:
            return out[out.index("inet") + 1]
        await asyncio.sleep(0.1)
    raise AssertionError("eth0 never got an address")


@pytest.mark.parametrize(("subnet", "lease", "gateway"), [
    ("10.0.2.0/24", "10.0.2.15/24", "10.0.2.2"),
    ("192.168.77.0/24", "192.168.77.15/24", "192.168.77.2"),
])  # fmt: skip
async def test_dhcp_lease_and_ping_the_gateway(subnet: str, lease: str, gateway: str) -> None:
    mode = capsa.NetworkMode.user_nat().subnet(subnet).build()
    async with await capsa.sandbox().network(mode).build() as sb:
        agent = await sb.agent()
        assert await _address(agent) == lease
        route = (await agent.exec("ip route show default")).stdout.decode().split()
        assert route[:3] == ["default", "via", gateway]
        r = await agent.exec(f"ping -c 3 -W 3 {gateway}", timeout=30)
        assert r.exit_code == 0 and b"3 packets received" in r.stdout


def test_bad_subnets_are_rejected() -> None:
    with pytest.raises(capsa.InvalidConfig, match="invalid subnet"):
        capsa.NetworkMode.user_nat().subnet("10.0.2.1/24")
    with pytest.raises(capsa.InvalidConfig, match="too small"):
        capsa.NetworkMode.user_nat().subnet("10.0.2.0/30")
