"""The ``capsa`` command line."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import re
import shutil
import signal
import sys
import termios
import tty
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import click

import capsa
from capsa.backends.qemu.accel import SlowAccelWarning
from capsa.errors import CapsaError, InvalidConfig

T = TypeVar("T")
DETACH_KEY = b"\x1d"  # Ctrl+]


def _run(coro: Coroutine[Any, Any, T]) -> T:
    try:
        return asyncio.run(coro)
    except CapsaError as e:
        raise click.ClickException(str(e)) from None


def parse_memory(value: str) -> int:
    """``512``, ``512M``, ``2G`` → megabytes."""
    m = re.fullmatch(r"\s*(\d+)\s*([mMgG]?)[iI]?[bB]?\s*", value)
    if not m:
        raise InvalidConfig(f"invalid memory size {value!r}: use e.g. 512, 512M or 2G")
    n = int(m.group(1))
    return n * 1024 if m.group(2).lower() == "g" else n


def parse_disk(spec: str) -> capsa.DiskImage:
    """``PATH`` or ``PATH:ro``."""
    path, _, flag = spec.rpartition(":") if spec.endswith((":ro", ":rw")) else (spec, "", "")
    disk = capsa.DiskImage(path)
    return disk.read_only() if flag == "ro" else disk


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="Show debug logs.")
def main(verbose: bool) -> None:
    """Run Linux micro-VMs as sandboxes."""
    import logging

    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING)
    if not verbose:
        # Making a template or the Debian image takes a while: say so rather than look stuck.
        said = logging.StreamHandler()
        said.setFormatter(logging.Formatter("capsa: %(message)s"))
        for name in ("capsa.template", "capsa.image"):
            first_use = logging.getLogger(name)
            first_use.addHandler(said)
            first_use.setLevel(logging.INFO)
            first_use.propagate = False
    # The CLI reports the accelerator in `capsa backends`; don't repeat it on every run.
    warnings.simplefilter("ignore", SlowAccelWarning)


@main.command()
def version() -> None:
    """Print capsa's version."""
    click.echo(f"capsa {capsa.__version__}")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def backends(as_json: bool) -> None:
    """Show the hypervisor backends, their capabilities and the chosen accelerator."""
    from capsa.backends.registry import all_capabilities, select_backend

    every = all_capabilities()
    chosen = select_backend().name
    if as_json:
        rows = [{**dataclasses.asdict(c), "default": c.name == chosen} for c in every]
        click.echo(json.dumps(rows, indent=2))
        return
    for caps in every:
        state = "available" if caps.available else "UNAVAILABLE"
        default = " [default]" if caps.name == chosen else ""
        click.echo(f"{caps.name}{default}: {state} ({caps.reason})")
        click.echo(f"  accelerator: {caps.accelerator} ({caps.accelerator_reason})")
        click.echo(f"  boot methods: {', '.join(caps.boot_methods)}")
        click.echo(f"  image formats: {', '.join(caps.image_formats)}")
        click.echo(f"  network modes: {', '.join(caps.network_modes)}")
        click.echo(f"  devices: {', '.join(caps.devices)}")
        for feature, why in caps.unavailable.items():
            click.echo(f"  unavailable: {feature}: {why}")
        for layer, state in caps.confinement.items():
            click.echo(f"  confinement: {layer}: {state}")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def doctor(as_json: bool) -> None:
    """Check that this machine can run capsa VMs, and say how to fix what is missing."""
    from capsa.doctor import Level, examine, has_failures

    findings = examine()
    if as_json:
        rows = [{"level": f.level.value, "what": f.what, "fix": f.fix} for f in findings]
        click.echo(json.dumps(rows, indent=2))
    else:
        colors = {Level.OK: "green", Level.INFO: "blue", Level.WARN: "yellow", Level.FAIL: "red"}
        for f in findings:
            mark = click.style(f"{f.level.value:4}", fg=colors[f.level])
            click.echo(f"[{mark}] {f.what}")
            if f.fix and f.level in (Level.WARN, Level.FAIL):
                click.echo(f"       fix: {f.fix}")
    if has_failures(findings):
        raise SystemExit(1)


@main.command()
@click.option("--kernel", type=click.Path(dir_okay=False), help="Kernel (default: capsa's).")
@click.option(
    "--initrd",
    type=click.Path(dir_okay=False),
    help="Initial ramdisk (default with the default kernel: a busybox shell).",
)
@click.option("--disk", "disks", multiple=True, help="Disk image, PATH or PATH:ro (repeatable).")
@click.option("--cpus", type=int, default=1, show_default=True)
@click.option("--memory", default="512", show_default=True, help="e.g. 512, 512M, 2G.")
@click.option("--cmdline", "cmdline", default=None, help="Extra kernel arguments.")
@click.option("--no-console", is_flag=True, help="Do not attach the terminal; wait for exit.")
def run(
    kernel: str | None,
    initrd: str | None,
    disks: tuple[str, ...],
    cpus: int,
    memory: str,
    cmdline: str | None,
    no_console: bool,
) -> None:
    """Boot a VM and attach this terminal to its serial console (Ctrl+] stops it)."""
    code = _run(_run_vm(kernel, initrd, disks, cpus, memory, cmdline, no_console))
    sys.exit(code)


async def _run_vm(
    kernel: str | None,
    initrd: str | None,
    disks: tuple[str, ...],
    cpus: int,
    memory: str,
    cmdline: str | None,
    no_console: bool,
) -> int:
    if kernel is None:
        from capsa.images.kernel import default_kernel
        from capsa.images.shell import cached_shell_initramfs

        default = default_kernel()
        kernel = str(default.path)
        if initrd is None:
            # No arguments at all: a busybox root shell on capsa's default kernel.
            initrd = str(cached_shell_initramfs(default))
    builder = capsa.vm(capsa.LinuxDirectBoot(kernel, initrd)).cpus(cpus)
    builder.memory_mb(parse_memory(memory)).console_enabled()
    for spec in disks:
        builder.disk(parse_disk(spec))
    for token in (cmdline or "").split():
        key, sep, value = token.partition("=")
        if sep:
            builder.cmdline_arg(key, value)
        else:
            builder.cmdline_flag(key)
    async with await builder.build() as vm:
        if no_console:
            status = await vm.wait()
        else:
            await _attach_terminal(vm)
            status = await vm.kill() if not vm.status().is_finished else vm.status()
    if status.state is capsa.VmState.FAILED:
        click.echo(f"capsa: VM failed: {status.message}", err=True)
        return 1
    return status.exit_code or 0


async def _attach_terminal(vm: capsa.VmHandle) -> None:
    """Pump bytes between this terminal (raw mode) and the serial console until exit or Ctrl+]."""
    console = await vm.console()
    reader, writer = await console.split()
    loop = asyncio.get_running_loop()
    detached = asyncio.Event()
    pending: set[asyncio.Future[None]] = set()
    stdin_fd = sys.stdin.fileno()
    is_tty = os.isatty(stdin_fd)
    saved = termios.tcgetattr(stdin_fd) if is_tty else None

    def on_stdin() -> None:
        data = os.read(stdin_fd, 4096)
        if not data:
            loop.remove_reader(stdin_fd)
            return
        if DETACH_KEY in data:
            data = data.split(DETACH_KEY, 1)[0]
            detached.set()
        if data:
            writer.write(data)
            pending.add(asyncio.ensure_future(writer.drain()))
            pending.difference_update({t for t in pending if t.done()})

    async def pump_output() -> None:
        while chunk := await reader.read(65536):
            os.write(sys.stdout.fileno(), chunk)

    if is_tty:
        tty.setraw(stdin_fd)
    loop.add_reader(stdin_fd, on_stdin)
    try:
        out = asyncio.ensure_future(pump_output())
        stop = asyncio.ensure_future(detached.wait())
        await asyncio.wait({out, stop}, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        out.cancel()
    finally:
        loop.remove_reader(stdin_fd)
        if saved is not None:
            termios.tcsetattr(stdin_fd, termios.TCSADRAIN, saved)
    if detached.is_set():
        click.echo("\r\ncapsa: detached, stopping the VM", err=True)


def _sandbox_builder(
    cpus: int, memory: str, env: tuple[str, ...], image: str
) -> capsa.SandboxBuilder:
    builder = capsa.sandbox().cpus(cpus).memory_mb(parse_memory(memory)).image(image)
    for item in env:
        key, sep, value = item.partition("=")
        if not sep:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--env")
        builder.env(key, value)
    return builder


_server_option = click.option(
    "--socket",
    "socket_path",
    type=click.Path(path_type=Path),
    default=None,
    help="the server's socket (default: $XDG_RUNTIME_DIR/capsa/capsa.sock)",
)


_sandbox_options = [
    click.option("--cpus", type=int, default=1, show_default=True),
    click.option("--memory", default="512", show_default=True, help="e.g. 512, 1G."),
    click.option("--env", "-e", "env", multiple=True, help="KEY=VALUE (repeatable)."),
    click.option(
        "--image",
        type=click.Choice(["debian", "minimal"]),
        default=lambda: os.environ.get("CAPSA_SANDBOX_IMAGE") or "debian",
        show_default="debian",
        help="the userland: Debian (python3, pip, git, curl...) or busybox only",
    ),
]


def sandbox_options(f: Any) -> Any:
    for option in reversed(_sandbox_options):
        f = option(f)
    return f


@main.command(name="exec", context_settings={"ignore_unknown_options": True})
@sandbox_options
@click.option("--cwd", default=None, help="Working directory in the guest.")
@click.option("--timeout", type=float, default=None, help="Kill the command after N seconds.")
@click.option("--in", "in_name", default=None, help="run in the server's sandbox NAME")
@_server_option
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def exec_command(
    cpus: int,
    memory: str,
    env: tuple[str, ...],
    image: str,
    cwd: str | None,
    timeout: float | None,
    in_name: str | None,
    socket_path: Path | None,
    command: tuple[str, ...],
) -> None:
    """Run COMMAND in a throwaway sandbox (or, with --in, in a server's named one), print
    its output, exit with its exit code."""
    if in_name is not None:
        sys.exit(_exec_remote(in_name, socket_path, env, cwd, timeout, command))
    builder = _sandbox_builder(cpus, memory, env, image)
    sys.exit(_run(_exec_in_sandbox(builder, list(command), cwd, timeout)))


async def _exec_in_sandbox(
    builder: capsa.SandboxBuilder, argv: list[str], cwd: str | None, timeout: float | None
) -> int:
    async with await builder.build() as sb:
        agent = await sb.agent()
        proc = await agent.start(argv, cwd=cwd, timeout=timeout)

        async def copy(stream: Any, fd: int) -> None:
            async for chunk in stream:
                os.write(fd, chunk)

        await asyncio.gather(copy(proc.stdout, 1), copy(proc.stderr, 2))
        code = await proc.wait()
        if proc.timed_out:
            click.echo(f"capsa: command timed out after {timeout}s", err=True)
        return code


@main.command()
@sandbox_options
@click.option("--command", "shell_cmd", default=None, help="default: bash, else sh")
@click.option("--in", "in_name", default=None, help="a shell in the server's sandbox NAME")
@_server_option
def shell(
    cpus: int,
    memory: str,
    env: tuple[str, ...],
    image: str,
    shell_cmd: str | None,
    in_name: str | None,
    socket_path: Path | None,
) -> None:
    """An interactive shell in a throwaway sandbox (exit the shell to stop it)."""
    if in_name is not None:
        sys.exit(_run(_shell_remote(in_name, socket_path)))
    sys.exit(_run(_shell(_sandbox_builder(cpus, memory, env, image), shell_cmd)))


LOGIN_SHELL = "command -v bash >/dev/null && exec bash; exec sh"


async def _shell(builder: capsa.SandboxBuilder, shell_cmd: str | None) -> int:
    rows, cols = shutil.get_terminal_size((80, 24)).lines, shutil.get_terminal_size().columns
    async with await builder.build() as sb:
        agent = await sb.agent()
        proc = await agent.start(
            ["/bin/sh", "-c", f"exec {shell_cmd}" if shell_cmd else LOGIN_SHELL],
            pty=True,
            rows=rows,
            cols=cols,
        )
        await _terminal(proc.write_stdin, proc.resize, proc.close_stdin, proc.stdout)
        return await proc.wait()


async def _shell_remote(name: str, socket_path: Path | None) -> int:
    """``capsa shell --in NAME``: the server's terminal WebSocket, on this terminal."""
    from websockets.asyncio.client import unix_connect

    from capsa.server.paths import default_socket

    rows, cols = shutil.get_terminal_size((80, 24)).lines, shutil.get_terminal_size().columns
    path = socket_path or default_socket()
    uri = f"ws://capsa/sandboxes/{name}/shell?rows={rows}&cols={cols}"
    end: dict[str, Any] = {}
    try:
        async with unix_connect(str(path), uri) as ws:

            async def resize(r: int, c: int) -> None:
                await ws.send(json.dumps({"resize": [r, c]}))

            async def eof() -> None:
                await ws.send(b"\x04")

            async def screen() -> AsyncIterator[bytes]:
                async for message in ws:
                    if isinstance(message, bytes):
                        yield message
                    else:
                        end.update(json.loads(message))

            await _terminal(ws.send, resize, eof, screen())
    except OSError as e:
        message = f"no capsa server at {path}: {e} (start one: capsa serve)"
        raise click.ClickException(message) from None
    except Exception as e:  # the server refused the upgrade: no such sandbox
        raise click.ClickException(f"cannot open a shell in {name!r}: {e}") from None
    return int(end.get("exit_code", 1))


async def _terminal(
    send: Callable[[bytes], Awaitable[None]],
    resize: Callable[[int, int], Awaitable[None]],
    eof: Callable[[], Awaitable[None]],
    output: AsyncIterator[bytes],
) -> None:
    """This terminal, raw, wired to a remote one until its output ends."""
    stdin_fd = sys.stdin.fileno()
    is_tty = os.isatty(stdin_fd)
    loop = asyncio.get_running_loop()
    pending: set[asyncio.Future[None]] = set()

    def on_stdin() -> None:
        data = os.read(stdin_fd, 4096)
        if not data:
            loop.remove_reader(stdin_fd)
            pending.add(asyncio.ensure_future(eof()))
            return
        pending.add(asyncio.ensure_future(send(data)))
        pending.difference_update({t for t in pending if t.done()})

    def on_resize() -> None:
        size = shutil.get_terminal_size()
        pending.add(asyncio.ensure_future(resize(size.lines, size.columns)))

    saved = termios.tcgetattr(stdin_fd) if is_tty else None
    if is_tty:
        tty.setraw(stdin_fd)
        loop.add_signal_handler(signal.SIGWINCH, on_resize)
    loop.add_reader(stdin_fd, on_stdin)
    try:
        async for chunk in output:
            os.write(sys.stdout.fileno(), chunk)
    finally:
        loop.remove_reader(stdin_fd)
        if saved is not None:
            loop.remove_signal_handler(signal.SIGWINCH)
            termios.tcsetattr(stdin_fd, termios.TCSADRAIN, saved)


@main.group()
def image() -> None:
    """Guest kernel and sandbox image (build/info/clean); OCI images (pull/ls/rm/prune)."""


def _progress_runner() -> Any:
    from rich.progress import Progress, SpinnerColumn, TextColumn

    return Progress(SpinnerColumn(), TextColumn("{task.description}"), transient=False)


@image.command(name="build")
@click.option(
    "--packages", default="", metavar="A,B", help="Debian packages on top of the default ones"
)
@click.option("--minimal", is_flag=True, help="only the busybox image, not the Debian userland")
def image_build(packages: str, minimal: bool) -> None:
    """Fetch the default kernel and build the sandbox images: the initramfs and the Debian
    userland (with --packages: a derived one). A no-op for what is cached."""
    from capsa.images.debian import debian_image
    from capsa.images.kernel import default_kernel
    from capsa.images.sandbox import sandbox_image

    extra = [p.strip() for p in packages.split(",") if p.strip()]
    if minimal and extra:
        raise click.UsageError("--packages builds a Debian image; it cannot go with --minimal")

    with _progress_runner() as progress:
        task = progress.add_task("checking the cache", total=None)

        def report(message: str, fraction: float | None) -> None:
            progress.update(task, description=message)

        try:
            kernel = default_kernel(report)
            img = sandbox_image(kernel, report)
            debian = None if minimal else debian_image(extra, progress=report)
        except CapsaError as e:
            raise click.ClickException(str(e)) from None
        progress.update(task, description=f"sandbox image {img.key} ({img.size >> 20} MiB)")
    click.echo(f"kernel: {kernel.path} ({kernel.version})")
    click.echo(f"initrd: {img.initrd}")
    if debian is not None:
        size = debian.path.stat().st_size >> 20
        click.echo(f"userland: {debian.path} (Debian {debian.suite}, {size} MiB)")


@image.command(name="info")
def image_info_cmd() -> None:
    """List cached kernels and images."""
    from capsa.images.kernel import cached_kernel
    from capsa.images.sandbox import image_info

    k = cached_kernel()
    click.echo(f"kernel: {k.path} ({k.version})" if k else "kernel: not cached")
    infos = image_info()
    if not infos:
        click.echo("images: none")
    for i in infos:
        click.echo(
            f"image: {i['path']}  {int(str(i['size'])) >> 20} MiB  kernel {i.get('kernel', '?')}"
        )


@image.command(name="clean")
def image_clean() -> None:
    """Remove cached images and kernels."""
    from capsa.images.kernel import clean_kernels
    from capsa.images.sandbox import clean_images

    freed = clean_images() + clean_kernels()
    click.echo(f"removed {freed >> 20} MiB")


@image.command(name="pull")
@click.argument("reference")
@click.option("--insecure", is_flag=True, help="the registry speaks plain HTTP (a local one)")
@click.option("--refresh", is_flag=True, help="ask the registry even when the image is cached")
def image_pull(reference: str, insecure: bool, refresh: bool) -> None:
    """Pull an OCI image into the local store and build its root file system."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn

    from capsa.oci.store import default_store

    store = default_store()
    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn()) as progress:
        tasks: dict[str, Any] = {}

        def report(digest: str, done: int, total: int | None) -> None:
            if digest not in tasks:
                tasks[digest] = progress.add_task(digest[7:19], total=total)
            progress.update(tasks[digest], completed=done)

        async def pull() -> Any:
            img = await store.pull(reference, insecure=insecure, refresh=refresh, progress=report)
            task = progress.add_task("root file system", total=None)
            await store.rootfs(img)
            progress.update(task, total=1, completed=1)
            return img

        try:
            img = asyncio.run(pull())
        except CapsaError as e:
            raise click.ClickException(str(e)) from None
    click.echo(f"{img.name} {img.digest} ({img.size >> 20} MiB compressed)")


@image.command(name="ls")
def image_ls() -> None:
    """List pulled OCI images."""
    from capsa.oci.store import default_store

    for img in default_store().images():
        built = "rootfs built" if img.rootfs.exists() else "rootfs not built"
        click.echo(f"{img.name}  {img.digest[:19]}  {img.size >> 20} MiB  {built}")


@image.command(name="rm")
@click.argument("reference")
def image_rm(reference: str) -> None:
    """Forget a pulled image (its blobs go at the next prune)."""
    from capsa.oci.store import default_store

    try:
        removed = default_store().remove(reference)
    except CapsaError as e:
        raise click.ClickException(str(e)) from None
    if not removed:
        raise click.ClickException(f"no pulled image {reference}")
    click.echo(f"removed {reference}")


@image.command(name="prune")
def image_prune() -> None:
    """Delete blobs and root file systems no pulled image uses."""
    from capsa.oci.store import default_store

    click.echo(f"freed {default_store().prune() >> 20} MiB")


@main.group()
def template() -> None:
    """Sandbox templates: the snapshots new sandboxes start from (ls/rm/prune)."""


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit} ago"
    return "just now"


@template.command(name="ls")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def template_ls(as_json: bool) -> None:
    """List templates: key, size, last use, what they are."""
    import time

    from capsa.api.templates import TemplateStore

    infos = TemplateStore().templates()
    if as_json:
        rows = [
            {**dataclasses.asdict(i), "path": str(i.path), "size_bytes": i.size_bytes}
            for i in infos
        ]
        click.echo(json.dumps(rows, indent=2))
        return
    now = time.time()
    for i in infos:
        used = _age(now - i.last_used)
        click.echo(f"{i.key}  {i.size_bytes >> 20:>5} MiB  used {used:<10}  {i.description}")


@template.command(name="rm")
@click.argument("keys", nargs=-1)
@click.option("--all", "remove_all", is_flag=True, help="Remove every template.")
def template_rm(keys: tuple[str, ...], remove_all: bool) -> None:
    """Remove templates (they are made again on next use)."""
    from capsa.api.templates import TemplateStore

    store = TemplateStore()
    if remove_all:
        keys = tuple(i.key for i in store.templates())
    elif not keys:
        raise click.UsageError("name the templates to remove (KEY...) or give --all")
    missing = [k for k in keys if not store.remove(k)]
    if missing:
        raise click.ClickException(f"no template {', '.join(missing)}")
    click.echo(f"removed {len(keys)} template(s)")


@template.command(name="prune")
@click.option("--days", type=float, default=30.0, show_default=True, help="Unused for longer.")
def template_prune(days: float) -> None:
    """Remove templates unused for DAYS, made by another capsa or QEMU, or damaged."""
    from capsa.api.templates import TemplateStore

    removed = TemplateStore().prune(unused_days=days)
    freed = sum(i.size_bytes for i in removed)
    click.echo(f"removed {len(removed)} template(s), freed {freed >> 20} MiB")


@main.command()
@click.option(
    "--socket",
    "socket_path",
    type=click.Path(path_type=Path),
    default=None,
    help="Unix socket (default: $XDG_RUNTIME_DIR/capsa/capsa.sock)",
)
@click.option("--port", type=int, default=None, help="listen on 127.0.0.1:PORT instead")
@click.option(
    "--token",
    envvar="CAPSA_SERVER_TOKEN",
    default=None,
    help="bearer token for TCP (default: a new one, printed)",
)
@click.option(
    "--allow-share",
    "share_roots",
    multiple=True,
    type=click.Path(path_type=Path, exists=True, file_okay=False),
    help="host folder clients may share from (repeatable; default: none)",
)
@click.option("--max-sandboxes", type=int, default=64, show_default=True)
@click.option(
    "--mcp", "mcp_endpoint", is_flag=True, help="also serve MCP at /mcp (limits: see capsa mcp)"
)
@click.option("--mcp-image", type=click.Choice(["debian", "minimal"]), default="debian")
@click.option("--mcp-max-sandboxes", type=int, default=4, show_default=True)
@click.option("--mcp-max-lifetime", type=float, default=3600.0, show_default=True)
@click.option(
    "--ray",
    "ray_address",
    default=None,
    metavar="ADDRESS",
    help="run the sandboxes on this Ray cluster (auto: the one this machine is in)",
)
@click.option(
    "--ray-resource",
    default=None,
    metavar="NAME",
    help="with --ray: only on nodes that offer this custom Ray resource",
)
def serve(
    socket_path: Path | None,
    port: int | None,
    token: str | None,
    share_roots: tuple[Path, ...],
    max_sandboxes: int,
    mcp_endpoint: bool,
    mcp_image: str,
    mcp_max_sandboxes: int,
    mcp_max_lifetime: float,
    ray_address: str | None,
    ray_resource: str | None,
) -> None:
    """Own sandboxes for clients over HTTP+JSON (OpenAPI at /openapi.json). Sandboxes die
    with the server; a server restarted after a crash lists the ones it lost at /."""
    from capsa.server.app import ServerOptions
    from capsa.server.mcp import McpPolicy
    from capsa.server.run import (
        default_socket,
        new_token,
        runtime_folder,
        tcp_listener,
        unix_listener,
    )
    from capsa.server.run import (
        serve as run_server,
    )

    if port is not None:
        token = token or new_token()
        sock = tcp_listener("127.0.0.1", port)
        where = f"http://127.0.0.1:{sock.getsockname()[1]}"
        click.echo(f"capsa: serving on {where} (Authorization: Bearer {token})", err=True)
    else:
        path = socket_path or default_socket()
        sock = unix_listener(path)
        token = None
        click.echo(f"capsa: serving on unix socket {path}", err=True)
    options = ServerOptions(
        token=token,
        share_roots=tuple(p.resolve() for p in share_roots),
        max_sandboxes=max_sandboxes,
        # One per address: a restarted server finds what the last one at it left behind.
        state_file=runtime_folder() / f"server-{_address_key(port, socket_path)}.json",
        socket_path=None if port is not None else path,
        mcp=McpPolicy(
            image=mcp_image, max_sandboxes=mcp_max_sandboxes, max_lifetime=mcp_max_lifetime
        )
        if mcp_endpoint
        else None,
        ray_address=ray_address,
        ray_resource=ray_resource,
    )
    runtime_folder().mkdir(mode=0o700, parents=True, exist_ok=True)
    _run(run_server(sock, options))


@main.command(name="mcp")
@click.option(
    "--image", type=click.Choice(["debian", "minimal"]), default="debian", show_default=True
)
@click.option("--cpus", type=int, default=1, show_default=True)
@click.option("--memory", default="512", show_default=True, help="e.g. 512, 1G.")
@click.option("--network", is_flag=True, help="give sandboxes user NAT behind --allow-domain")
@click.option("--allow-domain", "domains", multiple=True, help="a domain sandboxes may reach")
@click.option("--max-sandboxes", type=int, default=4, show_default=True)
@click.option("--max-lifetime", type=float, default=3600.0, show_default=True)
@click.option("--idle-timeout", type=float, default=600.0, show_default=True)
def mcp_command(
    image: str,
    cpus: int,
    memory: str,
    network: bool,
    domains: tuple[str, ...],
    max_sandboxes: int,
    max_lifetime: float,
    idle_timeout: float,
) -> None:
    """A Model Context Protocol server on stdio: sandboxes as tools for AI assistants,
    within the limits given here."""
    from capsa.server.mcp import McpPolicy, create_mcp

    policy = McpPolicy(
        image=image,
        cpus=cpus,
        memory_mb=parse_memory(memory),
        network=network,
        allow_domains=domains,
        max_sandboxes=max_sandboxes,
        max_lifetime=max_lifetime,
        idle_timeout=idle_timeout,
    )
    create_mcp(policy).run("stdio")


def _exec_remote(
    name: str,
    socket_path: Path | None,
    env: tuple[str, ...],
    cwd: str | None,
    timeout: float | None,
    command: tuple[str, ...],
) -> int:
    server = _server(socket_path)
    try:
        variables = dict(item.partition("=")[::2] for item in env)
        agent = server.get(name).agent()
        result = agent.exec(command[0], env=variables, cwd=cwd, timeout=timeout)
        result = result.args(list(command[1:])).run()
    except CapsaError as e:
        raise click.ClickException(str(e)) from None
    finally:
        server.close()
    sys.stdout.buffer.write(result.stdout)
    sys.stderr.buffer.write(result.stderr)
    return int(result.exit_code)


def _server(socket_path: Path | None) -> Any:
    """The server's sync client (``capsa serve`` must run; the error says so)."""
    import capsa.sync

    try:
        return capsa.sync.remote_connect(socket_path)
    except CapsaError as e:
        raise click.ClickException(str(e)) from None


@main.command()
@click.option("--name", default=None, help="default: a generated one")
@click.option("--image", type=click.Choice(["debian", "minimal"]), default=None)
@click.option("--label", "labels", multiple=True, help="KEY=VALUE (repeatable)")
@click.option("--lifetime", type=float, default=None, help="seconds")
@click.option("--idle-timeout", type=float, default=None, help="seconds")
@click.option("--network", is_flag=True, help="user NAT (no egress policy)")
@_server_option
def create(
    name: str | None,
    image: str | None,
    labels: tuple[str, ...],
    lifetime: float | None,
    idle_timeout: float | None,
    network: bool,
    socket_path: Path | None,
) -> None:
    """Create a named sandbox on the server (`capsa serve`); print its name."""
    label_map = dict(item.partition("=")[::2] for item in labels)
    server = _server(socket_path)
    try:
        sandbox = server.create(
            name=name,
            image=image,
            labels=label_map,
            lifetime=lifetime,
            idle_timeout=idle_timeout,
            network="user_nat" if network else "none",
        )
        click.echo(sandbox.name)
    except CapsaError as e:
        raise click.ClickException(str(e)) from None
    finally:
        server.close()


@main.command()
@click.option("--label", default=None, help="only those with KEY=VALUE")
@_server_option
def ps(label: str | None, socket_path: Path | None) -> None:
    """The server's sandboxes."""
    server = _server(socket_path)
    try:
        for item in server.list(label=label):
            labels = ",".join(f"{k}={v}" for k, v in item["labels"].items())
            click.echo(f"{item['name']:24} {item['status']:10} {item['image']:8} {labels}")
    finally:
        server.close()


@main.command()
@click.argument("names", nargs=-1, required=True)
@_server_option
def rm(names: tuple[str, ...], socket_path: Path | None) -> None:
    """Destroy sandboxes on the server."""
    server = _server(socket_path)
    try:
        for name in names:
            try:
                server.get(name).kill()
            except CapsaError as e:
                raise click.ClickException(f"{name}: {e}") from None
    finally:
        server.close()


@main.command()
@click.argument("name")
@click.option("--tail", type=int, default=65536, show_default=True, help="bytes")
@_server_option
def logs(name: str, tail: int, socket_path: Path | None) -> None:
    """The end of a server sandbox's console."""
    server = _server(socket_path)
    try:
        click.echo(server.get(name).logs(tail), nl=False)
    except CapsaError as e:
        raise click.ClickException(str(e)) from None
    finally:
        server.close()


@main.command()
@click.argument("source")
@click.argument("dest")
@_server_option
def cp(source: str, dest: str, socket_path: Path | None) -> None:
    """Copy a file to or from a server sandbox: `capsa cp a.txt N:/root/a.txt` or
    `capsa cp N:/root/out.txt .`"""
    server = _server(socket_path)
    try:
        if ":" in source and not Path(source).exists():
            name, _, path = source.partition(":")
            data = server.get(name).agent().read_file(path)
            target = Path(dest)
            if target.is_dir():
                target = target / Path(path).name
            target.write_bytes(data)
        elif ":" in dest:
            name, _, path = dest.partition(":")
            server.get(name).agent().write_file(path, Path(source).read_bytes())
        else:
            raise click.UsageError("one side must be NAME:/path in a server sandbox")
    except CapsaError as e:
        raise click.ClickException(str(e)) from None
    finally:
        server.close()


def _address_key(port: int | None, socket_path: Path | None) -> str:
    import hashlib

    address = f"tcp:{port}" if port is not None else f"unix:{socket_path or 'default'}"
    return hashlib.sha256(address.encode()).hexdigest()[:12]


if __name__ == "__main__":
    main()
