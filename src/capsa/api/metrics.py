"""What a sandbox uses, as its agent reports it (``await sb.metrics()``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from capsa.errors import AgentProtocolError

_COUNTERS = (
    "cpu_seconds",
    "idle_seconds",
    "cpus",
    "memory_total",
    "memory_available",
    "disk_total",
    "disk_used",
    "net_rx_bytes",
    "net_tx_bytes",
    "uptime",
)


@dataclass(frozen=True)
class Metrics:
    """A sample of the guest's use. ``cpu_percent`` is over the time since the previous
    sample of the same sandbox (since boot for the first), 100 per busy vCPU; memory in
    bytes (``memory_used`` = total - available); ``disk_*`` is the writable layer; network
    bytes are the guest's interfaces' counters."""

    cpu_seconds: float
    cpu_percent: float
    cpus: int
    memory_total: int
    memory_available: int
    disk_total: int
    disk_used: int
    net_rx_bytes: int
    net_tx_bytes: int
    uptime: float

    @property
    def memory_used(self) -> int:
        return self.memory_total - self.memory_available


@dataclass(frozen=True)
class Sample:
    busy: float
    idle: float


def parse_usage(header: dict[str, Any], previous: Sample | None) -> tuple[Metrics, Sample]:
    """Checked metrics from the agent's answer, and the sample for the next call."""
    values: dict[str, float] = {}
    for name in _COUNTERS:
        value = header.get(name)
        if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
            raise AgentProtocolError(f"the agent reported {name} = {value!r}")
        values[name] = value
    if values["disk_used"] > values["disk_total"] or values["cpus"] < 1:
        raise AgentProtocolError("the agent reported inconsistent metrics")
    sample = Sample(values["cpu_seconds"], values["idle_seconds"])
    base = previous or Sample(0.0, 0.0)
    busy, idle = sample.busy - base.busy, sample.idle - base.idle
    elapsed = busy + idle
    percent = 100.0 * values["cpus"] * busy / elapsed if elapsed > 0 and busy >= 0 else 0.0
    metrics = Metrics(
        cpu_seconds=values["cpu_seconds"],
        cpu_percent=min(percent, 100.0 * values["cpus"]),
        cpus=int(values["cpus"]),
        memory_total=int(values["memory_total"]),
        memory_available=int(min(values["memory_available"], values["memory_total"])),
        disk_total=int(values["disk_total"]),
        disk_used=int(values["disk_used"]),
        net_rx_bytes=int(values["net_rx_bytes"]),
        net_tx_bytes=int(values["net_tx_bytes"]),
        uptime=values["uptime"],
    )
    return metrics, sample
