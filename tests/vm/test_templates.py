"""Templates with real VMs: made once on first use, restored by every later sandbox, never
shared identity, one maker across processes, damaged templates made again."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import capsa
from capsa.api.templates import GUEST_MARK, TemplateStore
from tests.framework.factory import VmFactory
from tests.vm.netkit import guest_address

pytestmark = pytest.mark.vm


@pytest.fixture
def templates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> TemplateStore:
    """An empty template directory of the test's own."""
    monkeypatch.setenv("CAPSA_TEMPLATE_DIR", str(tmp_path / "templates"))
    return TemplateStore(tmp_path / "templates")


def _only_template(store: TemplateStore) -> tuple[Path, dict[str, object]]:
    (info,) = store.templates()
    return info.path, json.loads((info.path / "template.json").read_text())


async def _mark(sb: capsa.Sandbox) -> str | None:
    """The nonce the template maker left in the guest before saving it (None: no mark)."""
    agent = await sb.agent()
    if not await agent.exists(GUEST_MARK):
        return None
    return (await agent.read_file(GUEST_MARK)).decode().strip()


async def test_first_sandbox_makes_the_template_and_later_ones_restore_it(
    templates: TemplateStore, vm_factory: VmFactory
) -> None:
    first = await vm_factory.sandbox(capsa.sandbox().hostname("first"))
    await first.agent()  # ready: saved at its hello, then set up
    assert first.template is None  # it booted
    path, meta = _only_template(templates)
    assert await _mark(first) == meta["nonce"]
    await first.kill()

    second = await vm_factory.sandbox(capsa.sandbox().hostname("second").env("WHO", "second"))
    assert second.template == path
    # Its memory came from the template: the maker's nonce is there, though this sandbox
    # never ran the command that wrote it.
    assert await _mark(second) == meta["nonce"]
    agent = await second.agent()
    r = await agent.exec('test "$(hostname)" = second && test "$WHO" = second')
    assert r.exit_code == 0  # and it was set up as itself
    assert [i.path for i in templates.templates()] == [path]  # nothing new was made

    cold = await vm_factory.sandbox(capsa.sandbox().template(False))
    assert cold.template is None and await _mark(cold) is None


async def test_clones_of_one_template_never_share_identity(
    templates: TemplateStore, vm_factory: VmFactory
) -> None:
    cluster = f"tmpl-{os.getpid()}"
    capsa.NetworkCluster.create(cluster, subnet="10.0.11.0/24")
    clones: list[capsa.Sandbox] = []
    try:
        builder = capsa.sandbox().network(capsa.NetworkMode.cluster(cluster))
        maker = await vm_factory.sandbox(builder)
        await maker.agent()
        await maker.kill()
        clones += [await vm_factory.sandbox(builder) for _ in range(2)]
        assert all(c.template is not None for c in clones)
        seen = []
        for clone in clones:
            agent = await clone.agent()
            ip = await guest_address(agent)
            script = (
                "cat /sys/class/net/eth0/address /etc/machine-id "
                "/proc/sys/kernel/random/boot_id; head -c 16 /dev/urandom | od -An -tx1"
            )
            r = await agent.exec(script)
            assert r.exit_code == 0
            mac, machine_id, boot_id, *random = r.stdout.decode().split("\n")
            assert mac == clone.vm.mac  # the guest took the MAC its port was made for
            seen.append((ip, mac, machine_id, boot_id, "".join(random).replace(" ", "")))
        one, two = seen
        for name, a, b in zip(
            ("ip", "mac", "machine-id", "boot id", "random"), one, two, strict=True
        ):
            assert a != b, f"two clones share their {name}: {a}"
    finally:
        for clone in clones:
            await clone.kill()
        capsa.NetworkCluster.remove(cluster)


MAKE_ONE = textwrap.dedent(
    """
    import asyncio, json, capsa
    from capsa.api.templates import GUEST_MARK

    async def main():
        async with await capsa.sandbox().build() as sb:
            agent = await sb.agent()
            mark = (await agent.read_file(GUEST_MARK)).decode().strip()
            print(json.dumps({"template": str(sb.template), "mark": mark}))

    asyncio.run(main())
    """
)


async def test_concurrent_first_use_makes_one_template(templates: TemplateStore) -> None:
    env = {**os.environ, "CAPSA_TEMPLATE_DIR": str(templates.root)}
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-c", MAKE_ONE, env=env, stdout=subprocess.PIPE
        )
        for _ in range(2)
    ]
    outputs = [await p.communicate() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    results = sorted((json.loads(out) for out, _ in outputs), key=lambda r: r["template"])
    path, meta = _only_template(templates)
    # One made it (and runs on as the first sandbox), the other waited and restored it.
    assert [r["template"] for r in results] == sorted([str(path), "None"])
    assert [r["mark"] for r in results] == [meta["nonce"]] * 2


def _truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


async def test_a_damaged_template_is_made_again(
    templates: TemplateStore, vm_factory: VmFactory, caplog: pytest.LogCaptureFixture
) -> None:
    made = await vm_factory.sandbox()
    await made.agent()
    await made.kill()
    path, meta = _only_template(templates)

    # A file that no longer matches its checksum: found before anything starts.
    _truncate(path / "ram")
    remade = await vm_factory.sandbox()
    assert (await (await remade.agent()).exec("true")).exit_code == 0
    assert remade.template is None  # booted, and saved a new template
    await remade.kill()
    path, fresh = _only_template(templates)
    assert fresh["nonce"] != meta["nonce"] and "unusable" in caplog.text

    # A state QEMU refuses although the checksums were made to match: the restore fails
    # before the guest runs, and the template is made again.
    _truncate(path / "state")
    files = json.loads((path / "template.json").read_text())
    files["files"]["state"]["sha256"] = hashlib.sha256((path / "state").read_bytes()).hexdigest()
    (path / "template.json").write_text(json.dumps(files))
    again = await vm_factory.sandbox()
    assert (await (await again.agent()).exec("true")).exit_code == 0
    _, last = _only_template(templates)
    assert last["nonce"] not in (meta["nonce"], fresh["nonce"])
    assert "could not be restored" in caplog.text
