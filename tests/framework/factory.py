"""The VM factory: every VM and sandbox a test builds goes through one, which owns it.

- at teardown every one of them is killed, whatever the test did (a test cannot leak a
  VM into the next one);
- when a test using them fails, each one's console tail is attached to its report (and,
  with ``CAPSA_TEST_ARTIFACTS=DIR``, written to ``DIR/<test>/<n>-<kind>.console``), so a
  failure in CI shows what the guest printed;
- ``restored()`` gives a copy of a sandbox made the way clones are (snapshot, restore),
  so tests can run on a booted and on a restored sandbox alike.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import capsa


@dataclass
class VmFactory:
    name: str
    scratch: Path
    owned: list[tuple[str, capsa.VmHandle]] = field(default_factory=list)

    def _own(self, kind: str, vm: capsa.VmHandle) -> None:
        self.owned.append((kind, vm))

    async def vm(self, builder: capsa.VmBuilder) -> capsa.VmHandle:
        vm = await builder.build()
        self._own("vm", vm)
        return vm

    async def sandbox(self, builder: capsa.SandboxBuilder | None = None) -> capsa.Sandbox:
        sandbox = await (builder or capsa.sandbox()).build()
        self._own("sandbox", sandbox.vm)
        return sandbox

    async def restored(self, source: capsa.Sandbox) -> capsa.Sandbox:
        """A running copy of ``source`` as it is now (a snapshot, restored)."""
        path = self.scratch / f"snapshot-{len(self.owned)}"
        snap = await source.snapshot(path)
        clone = await capsa.restore(snap.path)
        assert isinstance(clone, capsa.Sandbox)
        self._own("restored", clone.vm)
        return clone

    def keep_console_tails(self) -> dict[str, str]:
        """Each owned VM's console tail, by name (and, with ``CAPSA_TEST_ARTIFACTS=DIR``,
        written to ``DIR/<owner>/<name>.console``)."""
        tails = {f"{i}-{kind}": vm.console_tail(4000) for i, (kind, vm) in enumerate(self.owned)}
        artifacts = os.environ.get("CAPSA_TEST_ARTIFACTS")
        if tails and artifacts:
            folder = Path(artifacts) / re.sub(r"[^\w.-]+", "_", self.name)
            folder.mkdir(parents=True, exist_ok=True)
            for name, text in tails.items():
                (folder / f"{name}.console").write_text(text)
        return tails

    async def close(self) -> None:
        """Kill everything this factory built (idempotent)."""
        owned, self.owned = self.owned, []
        for _, vm in owned:
            await vm.kill()
