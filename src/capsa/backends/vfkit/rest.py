"""vfkit's RESTful API (``--restful-uri unix://PATH``): state, state changes, inspect."""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Any

import httpx

from capsa.errors import CapsaError


class VfkitState(enum.Enum):
    RUNNING = "VirtualMachineStateRunning"
    STOPPED = "VirtualMachineStateStopped"
    PAUSED = "VirtualMachineStatePaused"
    ERROR = "VirtualMachineStateError"
    STARTING = "VirtualMachineStateStarting"
    PAUSING = "VirtualMachineStatePausing"
    RESUMING = "VirtualMachineStateResuming"
    STOPPING = "VirtualMachineStateStopping"


class VfkitApiError(CapsaError):
    """vfkit's REST service refused a request or answered something unexpected."""


class VfkitClient:
    def __init__(self, socket_path: Path, timeout: float = 10.0) -> None:
        transport = httpx.AsyncHTTPTransport(uds=str(socket_path))
        # The host part is ignored on a Unix socket; vfkit only looks at the path.
        self.http = httpx.AsyncClient(transport=transport, base_url="http://vfkit", timeout=timeout)

    async def close(self) -> None:
        await self.http.aclose()

    async def _json(self, method: str, path: str, body: Any = None) -> Any:
        try:
            reply = await self.http.request(method, path, json=body)
        except httpx.TransportError as e:
            raise VfkitApiError(f"vfkit REST service unreachable: {e}") from e
        if reply.status_code != 200:
            raise VfkitApiError(f"{method} {path}: HTTP {reply.status_code} {reply.text.strip()}")
        return reply.json() if reply.content else None

    async def state(self) -> tuple[VfkitState, dict[str, bool]]:
        """The VM's state and what it can do next (canStop, canHardStop, ...)."""
        data = await self._json("GET", "/vm/state")
        try:
            state = VfkitState(data["state"])
        except (KeyError, TypeError, ValueError):
            raise VfkitApiError(f"unexpected state reply {data!r}") from None
        return state, {k: bool(v) for k, v in data.items() if k.startswith("can")}

    async def change_state(self, new: str) -> None:
        if new not in ("Stop", "HardStop", "Pause", "Resume"):
            raise ValueError(f"vfkit has no state change {new!r}")
        await self._json("POST", "/vm/state", {"state": new})

    async def stop(self) -> None:
        """Ask the guest to power off (like an ACPI power button)."""
        await self.change_state("Stop")

    async def hard_stop(self) -> None:
        await self.change_state("HardStop")

    async def inspect(self) -> dict[str, Any]:
        data = await self._json("GET", "/vm/inspect")
        if not isinstance(data, dict):
            raise VfkitApiError(f"unexpected inspect reply {data!r}")
        return data
