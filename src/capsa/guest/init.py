"""PID 1 of a capsa sandbox (stdlib only): set the guest up, serve the agent, run the main
process, reap every orphan, and power the VM off when the work is done.

Init brings up only what every sandbox has (file systems, drivers, the agent), so that a
template snapshot taken at the agent's hello fits any sandbox of its kind. What makes a
sandbox itself arrives later in the agent's ``setup`` request (hostname, environment,
machine id, shares, network, the main process). The kernel command line says only:
  capsa.agent=hvc1                  the agent's channel is this console (vfkit)

PID 1 must never exit (that is a kernel panic), so every step is guarded and a fatal
error powers the VM off after printing what happened.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import struct
import sys
import threading
import time

from .agent import Agent, Channel, ChildWatcher, Container, exit_code_of
from .protocol import AGENT_PORT_NAME

# Guest start-up time matters under emulation: `typing` is only imported by type checkers.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import subprocess
    from typing import Any

_libc = ctypes.CDLL(None, use_errno=True)
_DEVNULL = -3  # subprocess.DEVNULL
_SYS_FINIT_MODULE = {"x86_64": 313, "aarch64": 273}
_RB_POWER_OFF = 0x4321FEDC
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 1, 2, 4, 8
_MS_BIND, _MS_REC = 4096, 16384
OCI_BASE = "/run/capsa/oci"
_KEY_POWER, _EV_KEY = 116, 1
_EVENT = struct.Struct("llHHi")

_console = None


def _uptime() -> str:
    try:
        with open("/proc/uptime") as f:
            return f.read().split()[0]
    except OSError:
        return "?"


def log(msg: str) -> None:
    global _console
    try:
        if _console is None:
            _console = open("/dev/console", "w", buffering=1)  # noqa: SIM115 - lives forever
        _console.write(f"capsa-init: [{_uptime()}] {msg}\n")
    except OSError:
        pass


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def mount(source: str, target: str, fstype: str, flags: int = 0, data: str = "") -> None:
    os.makedirs(target, exist_ok=True)
    ret = _libc.mount(source.encode(), target.encode(), fstype.encode(), flags, data.encode())
    _check(ret, f"mount {fstype} on {target}")


def mount_basics() -> None:
    for src, target, fstype, flags, data in (
        ("proc", "/proc", "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, ""),
        ("sysfs", "/sys", "sysfs", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, ""),
        ("devtmpfs", "/dev", "devtmpfs", _MS_NOSUID, "mode=0755"),
        ("devpts", "/dev/pts", "devpts", _MS_NOSUID | _MS_NOEXEC, "gid=5,mode=620,ptmxmode=666"),
        ("tmpfs", "/dev/shm", "tmpfs", _MS_NOSUID | _MS_NODEV, "mode=1777"),
        ("tmpfs", "/tmp", "tmpfs", _MS_NOSUID | _MS_NODEV, "mode=1777"),
        ("tmpfs", "/run", "tmpfs", _MS_NOSUID | _MS_NODEV, "mode=0755"),
    ):
        try:
            mount(src, target, fstype, flags, data)
        except OSError as e:
            if target in ("/proc", "/sys", "/dev"):
                raise
            log(f"warning: {e}")
    if not os.path.exists("/dev/ptmx"):
        os.symlink("pts/ptmx", "/dev/ptmx")


def load_modules(listing: str = "/etc/capsa/modules") -> None:
    """Load the base drivers, then only those for virtio devices this VM actually has."""
    groups: dict[str, list[str]] = {}
    try:
        with open(listing) as f:
            for line in f:
                group, _, path = line.strip().partition(" ")
                if path:
                    groups.setdefault(group, []).append(path)
    except OSError:
        return
    loaded: set[str] = set()
    _load(groups.get("base", []), loaded)
    for device_id in _virtio_device_ids():
        _load(groups.get(str(device_id), []), loaded)


def load_group(group: str, listing: str = "/etc/capsa/modules") -> None:
    """Load one named group of drivers on demand (e.g. overlayfs for OCI roots)."""
    paths = []
    with contextlib.suppress(OSError), open(listing) as f:
        for line in f:
            name, _, path = line.strip().partition(" ")
            if name == group and path:
                paths.append(path)
    _load(paths, set())


def lookup_user(root: str, user: str) -> tuple[int, int, list[int]]:
    """``user`` as an OCI image config gives it (name, uid, name:group, uid:gid) resolved
    against the image's own /etc/passwd and /etc/group."""
    name, _, group = user.partition(":")

    def table(path: str) -> list[list[str]]:
        try:
            with open(os.path.join(root, path)) as f:
                return [line.rstrip("\n").split(":") for line in f if ":" in line]
        except OSError:
            return []

    passwd, groups = table("etc/passwd"), table("etc/group")
    uid = gid = 0
    if name.isdigit():
        uid = int(name)
        gid = next((int(p[3]) for p in passwd if len(p) > 3 and p[2] == name), uid)
    elif name:
        entry = next((p for p in passwd if p[0] == name and len(p) > 3), None)
        if entry is None:
            raise ValueError(f"user {name!r} is not in the image's /etc/passwd")
        uid, gid = int(entry[2]), int(entry[3])
    if group.isdigit():
        gid = int(group)
    elif group:
        entry = next((g for g in groups if g[0] == group and len(g) > 2), None)
        if entry is None:
            raise ValueError(f"group {group!r} is not in the image's /etc/group")
        gid = int(entry[2])
    return uid, gid, [gid]


def _virtio_device_ids() -> set[int]:
    ids = set()
    try:
        for dev in os.listdir("/sys/bus/virtio/devices"):
            with open(f"/sys/bus/virtio/devices/{dev}/device") as f:
                ids.add(int(f.read().strip(), 16))
    except (OSError, ValueError):
        pass
    return ids


def _load(paths: list[str], loaded: set[str]) -> None:
    nr = _SYS_FINIT_MODULE.get(os.uname().machine)
    for path in paths:
        if path in loaded:
            continue
        loaded.add(path)
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            if nr is not None and _libc.syscall(nr, fd, b"", 0) != 0:
                err = ctypes.get_errno()
                if err != 17:  # EEXIST: built in or already loaded
                    log(f"warning: loading {path}: {os.strerror(err)}")
        finally:
            os.close(fd)


def parse_cmdline(text: str) -> dict[str, Any]:
    config: dict[str, Any] = {"agent": None}
    for token in text.split():
        key, _, value = token.partition("=")
        if key == "capsa.agent" and value.isalnum():
            config["agent"] = f"/dev/{value}"
    return config


def _strings(value: object) -> list[str]:
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    return []


def loopback_up() -> None:
    """``ip link set lo up`` without a process (SIOCGIFFLAGS / SIOCSIFFLAGS)."""
    import fcntl
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        ifreq = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(s.fileno(), 0x8913, ifreq))[1]
        fcntl.ioctl(s.fileno(), 0x8914, struct.pack("16sH14x", b"lo", flags | 1))


def write_machine_id(value: object) -> None:
    """``/etc/machine-id``: 32 lowercase hex digits, one per sandbox."""
    text = value if isinstance(value, str) else os.urandom(16).hex()
    if len(text) != 32 or not all(c in "0123456789abcdef" for c in text):
        raise ValueError(f"bad machine id {text!r}")
    with open("/etc/machine-id", "w") as f:
        f.write(text + "\n")


def _raw_tty(fd: int) -> None:
    """A console used as a byte channel: no echo, no line editing, no CR/LF mangling."""
    import termios
    import tty

    with contextlib.suppress(termios.error):
        tty.setraw(fd, termios.TCSANOW)  # TCSAFLUSH would drop what the host already sent


def find_port(name: str, attempts: int = 200) -> str:
    """The /dev node of the virtio-serial port called ``name`` (there is no udev)."""
    for _ in range(attempts):
        try:
            for entry in os.listdir("/sys/class/virtio-ports"):
                with open(f"/sys/class/virtio-ports/{entry}/name") as f:
                    if f.read().strip() == name:
                        return f"/dev/{entry}"
        except OSError:
            pass
        time.sleep(0.01)
    raise OSError(f"virtio-serial port {name} not found; {describe_virtio()}")


# Virtio device ids (virtio spec 5) of the devices capsa attaches, to name what was seen.
_VIRTIO_NAMES = {1: "net", 2: "block", 3: "console", 4: "rng", 9: "9p", 19: "vsock", 26: "fs"}


def describe_virtio(sysfs: str = "/sys") -> str:
    """The virtio devices and ports this guest has, to say why something is missing."""
    devices = []
    with contextlib.suppress(OSError):
        for dev in sorted(os.listdir(f"{sysfs}/bus/virtio/devices")):
            try:
                with open(f"{sysfs}/bus/virtio/devices/{dev}/device") as f:
                    ident = int(f.read().strip(), 16)
                devices.append(f"{dev}={_VIRTIO_NAMES.get(ident, ident)}")
            except (OSError, ValueError):
                devices.append(f"{dev}=?")
    ports = []
    with contextlib.suppress(OSError):
        for entry in sorted(os.listdir(f"{sysfs}/class/virtio-ports")):
            try:
                with open(f"{sysfs}/class/virtio-ports/{entry}/name") as f:
                    ports.append(f"{entry}={f.read().strip() or '(unnamed)'}")
            except OSError:
                ports.append(f"{entry}=?")
    seen = f"virtio devices: {', '.join(devices) or 'none'}"
    seen += f"; virtio-serial ports: {', '.join(ports) or 'none'}"
    if not devices:
        seen += " (is the virtio_mmio driver in the kernel or its modules?)"
    return seen


class Reaper(ChildWatcher):
    """PID 1 inherits every orphan: reap them all, and hand our own children's status over."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._status: dict[int, int] = {}
        self._ours: set[int] = set()
        threading.Thread(target=self._loop, daemon=True, name="reaper").start()

    def _loop(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, 0)
            except ChildProcessError:
                with self._cond:
                    self._cond.wait(0.5)
                continue
            except InterruptedError:
                continue
            with self._cond:
                self._status[pid] = status
                if pid not in self._ours:
                    self._status.pop(pid)  # an orphan: nobody is waiting for it
                self._cond.notify_all()

    def spawn(self, argv: list[str], **kw: Any) -> subprocess.Popen[bytes]:
        import subprocess  # on first use: it is slow to import under emulation

        with self._cond:
            proc = subprocess.Popen(argv, **kw)
            self._ours.add(proc.pid)
            self._cond.notify_all()
        return proc

    def wait(self, proc: subprocess.Popen[bytes]) -> int:
        with self._cond:
            while proc.pid not in self._status:
                self._cond.wait()
            status = self._status.pop(proc.pid)
            self._ours.discard(proc.pid)
        # Keep Popen from trying to reap the pid itself later.
        proc.returncode = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        return proc.returncode


class Init:
    def __init__(self) -> None:
        self.reaper = Reaper()
        self.agent: Agent | None = None
        self.main: subprocess.Popen[bytes] | None = None
        self._stopping = threading.Lock()
        self._reported = threading.Event()
        self._agent_up = threading.Event()

    def boot(self) -> None:
        mount_basics()
        log("started")
        load_modules()
        log("modules loaded")
        with open("/proc/cmdline") as f:
            self.config = parse_cmdline(f.read())
        self.hostname = "sandbox"
        self.env = {
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": "/root",
            "TERM": "linux",
        }
        self.ip: str | None = None
        self.gateway: str | None = None
        self.mounted: set[tuple[str, str]] = set()
        self.root_mounted = ""  # the disk mounted as the image root ('': none yet)
        loopback_up()
        self._watch_power_button()
        # Under vfkit the agent channel is a plain virtio console (no port names there).
        device = self.config["agent"] or find_port(AGENT_PORT_NAME)
        fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
        if self.config["agent"]:
            _raw_tty(fd)
        self.agent = Agent(
            Channel(fd),
            self.reaper,
            self.env,
            on_shutdown=self.power_off,
            on_ready=lambda: log("agent ready"),
            on_resume=self._after_restore,
            on_setup=self.setup,
            on_mount=self._premount,
        )
        self._agent_up.set()
        threading.Thread(target=self._serve_agent, daemon=True, name="agent").start()

    def setup(self, h: dict[str, Any]) -> tuple[dict[str, str], Container | None]:
        """The agent's ``setup`` request: become this sandbox. The main process starts
        before the answer: once the host sees the sandbox ready, a graceful stop must reach
        it."""
        hostname = str(h.get("hostname") or "sandbox")
        _check(_libc.sethostname(hostname.encode(), len(hostname.encode())), "sethostname")
        self.hostname = hostname
        env = h.get("env")
        if isinstance(env, dict):
            self.env.update({str(k): str(v) for k, v in env.items()})
        self.env["HOSTNAME"] = hostname
        write_machine_id(h.get("machine_id"))
        mac = h.get("mac")
        if isinstance(mac, str) and os.path.exists("/sys/class/net/eth0"):
            self._ip("link", "set", "eth0", "address", mac)
        ip, gateway = h.get("ip"), h.get("gateway")
        self.ip = ip if isinstance(ip, str) else None
        self.gateway = gateway if isinstance(gateway, str) else None
        self._mount_shares(h.get("mounts"))
        if os.path.exists("/sys/class/net/eth0"):
            threading.Thread(target=self._network, daemon=True).start()
        container = h.get("container")
        if isinstance(container, dict):
            return self.env, self._setup_container(container)
        run = _strings(h.get("run"))
        if run:
            self._start_main(run)
        return self.env, None

    def _mount_shares(self, mounts: object) -> None:
        """Mount shares (the template maker's ``mount`` request, then ``setup``): once each."""
        for item in mounts if isinstance(mounts, list) else []:
            tag, path, read_only, kind = [*_strings(item), "", "", ""][:4]
            if not tag or not path.startswith("/") or (tag, path) in self.mounted:
                continue
            self.mounted.add((tag, path))
            fstype = "9p" if kind == "9p" else "virtiofs"
            data = "trans=virtio,version=9p2000.L,msize=262144,cache=loose" if kind == "9p" else ""
            try:
                mount(tag, path, fstype, _MS_RDONLY if read_only == "ro" else 0, data)
            except OSError as e:
                log(f"error: share {tag} at {path}: {e}")

    def _premount(self, h: dict[str, Any]) -> None:
        """A template maker's ``mount`` request: shares, and the image's root, mounted
        before the snapshot so that its copies start with them in place."""
        self._mount_shares(h.get("mounts"))
        root = h.get("root")
        if isinstance(root, dict):
            self._warm_root(self._mount_root(root))

    def _warm_root(self, root: str) -> None:
        """Run the image's shell and Python once, so that the template's page cache holds
        what most first commands load (its copies then read no disk for them)."""

        def enter() -> None:
            os.chroot(root)
            os.chdir("/")

        warm = (
            "cat /etc/passwd /etc/group /etc/nsswitch.conf >/dev/null 2>&1; "
            "command -v python3 >/dev/null && python3 -c 'import json, subprocess'"
        )
        with contextlib.suppress(OSError):
            env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/root"}
            self.reaper.wait(self.reaper.spawn(["/bin/sh", "-c", warm], env=env, preexec_fn=enter))

    def _mount_root(self, h: dict[str, Any]) -> str:
        """The image read-only with a tmpfs overlay on top, once; its mount point."""
        root = f"{OCI_BASE}/root"
        if self.root_mounted:
            return root
        disk = _disk_of_size(h.get("disk_bytes")) or str(h.get("disk") or "/dev/vda")
        load_group("oci")
        lower, rw = f"{OCI_BASE}/lower", f"{OCI_BASE}/rw"
        mount(disk, lower, "ext4", _MS_RDONLY)
        scratch = _disk_of_size(h.get("rw_disk_bytes"))
        if scratch is not None:
            mount(scratch, rw, "ext4", 0)  # the writable layer on a disk of its own
        else:
            mount("tmpfs", rw, "tmpfs", 0, "mode=0755")
        for d in ("upper", "work"):
            os.makedirs(f"{rw}/{d}", exist_ok=True)
        layers = f"lowerdir={lower},upperdir={rw}/upper,workdir={rw}/work"
        mount("overlay", root, "overlay", 0, layers)
        inside = [
            ("proc", "proc", "proc", 0),
            ("sysfs", "sys", "sysfs", 0),
            ("/dev", "dev", "", _MS_BIND | _MS_REC),
            ("tmpfs", "run", "tmpfs", 0),
        ]
        for src, target, fstype, flags in inside:
            with contextlib.suppress(OSError):
                mount(src, f"{root}/{target}", fstype, flags)
        # Name resolution follows the sandbox's network (udhcpc rewrites these in place).
        os.makedirs(f"{root}/etc", exist_ok=True)
        for name in ("resolv.conf", "hosts"):
            target = f"{root}/etc/{name}"
            with contextlib.suppress(OSError):
                if os.path.islink(target):
                    os.unlink(target)
                open(target, "a").close()
                mount(f"/etc/{name}", target, "", _MS_BIND)
        self.root_mounted = disk
        log(f"container root mounted ({disk})")
        return root

    def _setup_container(self, h: dict[str, Any]) -> Container:
        """Make the image's root the place where the main process and every agent command
        run, with the sandbox's name resolution and shares."""
        root = self._mount_root(h)
        # Shares appear at their paths inside the image too.
        for _, path in sorted(self.mounted, key=lambda m: m[1]):
            target = f"{root}{path}"
            try:
                os.makedirs(target, exist_ok=True)
                mount(path, target, "", _MS_BIND | _MS_REC)
            except OSError as e:
                log(f"error: share at {path} inside the image: {e}")
        env = dict(item.split("=", 1) for item in h.get("env", []) if "=" in item)
        env.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
        env.setdefault("HOSTNAME", self.hostname)
        uid, gid, groups = lookup_user(root, str(h.get("user") or "0"))
        container = Container(root, env, str(h.get("workdir") or "/"), uid, gid, groups)
        argv = h.get("argv")
        if isinstance(argv, list) and argv:
            self._start_main(argv, container)
        log("container root ready")
        return container

    def _after_restore(self, mac: str | None) -> None:
        """A restored copy: take the new MAC address and ask for a lease of its own."""
        if mac is None or not os.path.exists("/sys/class/net/eth0"):
            return
        # The link stays up: closing virtio-net waits for its config work, which after a
        # restore needs the RTNL lock the close already holds (to announce the guest). On
        # Linux 6.12 `ip link set eth0 down` then hung for good, now and then. virtio-net
        # takes a new MAC address while up; only a device that refuses is taken down for it
        # (and _network brings it up again).
        self._ip("addr", "flush", "dev", "eth0")
        if self._ip("link", "set", "eth0", "address", mac) != 0:
            self._ip("link", "set", "eth0", "down")
            if self._ip("link", "set", "eth0", "address", mac) != 0:
                log(f"warning: eth0 refused the MAC address {mac}")
                return
        log(f"restored: eth0 is now {mac}")
        threading.Thread(target=self._network, daemon=True).start()

    def _ip(self, *args: str) -> int:
        return self.reaper.wait(self.reaper.spawn(["/sbin/ip", *args]))

    def _serve_agent(self) -> None:
        assert self.agent is not None
        try:
            self.agent.serve()
        except Exception as e:
            log(f"agent stopped: {e!r}")

    def _network(self) -> None:
        try:
            if os.path.exists("/sys/class/net/eth0") and self.ip:
                self._static_address(self.ip, self.gateway)
            elif os.path.exists("/sys/class/net/eth0"):
                dhcp = [
                    "/sbin/udhcpc",
                    "-i",
                    "eth0",
                    "-q",
                    "-f",
                    "-n",
                    "-t",
                    "5",
                    "-T",
                    "1",
                    "-s",
                    "/etc/capsa/udhcpc.sh",
                ]
                code = self.reaper.wait(self.reaper.spawn(dhcp, stdout=_DEVNULL))
                log(f"eth0 configured by DHCP (udhcpc exit {code})")
        except OSError as e:
            log(f"warning: network set-up: {e}")

    def _static_address(self, address: str, gateway: str | None) -> None:
        # The device already carries the host's MTU (virtio-net's host_mtu).
        self._ip("addr", "add", address, "dev", "eth0")
        self._ip("link", "set", "eth0", "up")
        if gateway:
            self._ip("route", "add", "default", "via", gateway)
            with open("/etc/resolv.conf", "w") as f:
                f.write(f"nameserver {gateway}\n")
        log(f"eth0 configured statically: {address} via {gateway}")

    def _start_main(self, argv: list[str], container: Container | None = None) -> None:
        try:
            if container is None:
                self.main = self.reaper.spawn(argv, env=self.env, cwd="/")
            else:
                self.main = self.reaper.spawn(argv, env=container.env, preexec_fn=container.enter)
        except OSError as e:
            log(f"cannot start {argv[0]}: {e}")
            threading.Thread(target=self._finish, args=(127,), daemon=True).start()
            return
        threading.Thread(target=self._wait_main, args=(self.main,), daemon=True).start()

    def _wait_main(self, main: subprocess.Popen[bytes]) -> None:
        code = exit_code_of(self.reaper.wait(main))
        log(f"main process exited with {code}")
        self._finish(code)

    def _finish(self, code: int) -> None:
        self.report_exit(code)
        self.power_off()

    def report_exit(self, code: int) -> None:
        # Only the first outcome counts: processes killed by the power-off don't rewrite it.
        if self._reported.is_set():
            return
        self._reported.set()
        # A main process that exits at once may beat the agent's set-up.
        self._agent_up.wait(10)
        if self.agent is not None:
            self.agent.send_event({"event": "exit", "code": code}, wait_ack=1.0)

    def _watch_power_button(self) -> None:
        """The ACPI power button (QMP system_powerdown) means: shut down cleanly."""
        try:
            names = [d for d in os.listdir("/dev/input") if d.startswith("event")]
        except OSError:
            return
        for name in names:
            try:
                f = open(f"/dev/input/{name}", "rb", buffering=0)  # noqa: SIM115 - thread owns it
            except OSError:
                continue
            threading.Thread(target=self._read_button, args=(f,), daemon=True).start()

    def _read_button(self, f: Any) -> None:
        with f:
            while True:
                try:
                    data = f.read(_EVENT.size * 16)
                except OSError:
                    return
                if not data:
                    return
                for off in range(0, len(data) - _EVENT.size + 1, _EVENT.size):
                    _, _, etype, code, value = _EVENT.unpack_from(data, off)
                    if etype == _EV_KEY and code == _KEY_POWER and value == 1:
                        log("power button pressed")
                        self.graceful_stop()

    def graceful_stop(self) -> None:
        main = self.main
        if main is not None and main.returncode is None:
            with contextlib.suppress(OSError):
                os.kill(main.pid, signal.SIGTERM)
            return  # its exit powers the VM off
        self._finish(0)

    def power_off(self) -> None:
        if not self._stopping.acquire(blocking=False):
            return
        log("powering off")
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(OSError):
                os.kill(-1, sig)
            time.sleep(0.05)
        os.sync()
        _libc.reboot(_RB_POWER_OFF)


def main() -> None:
    if os.getpid() != 1:
        print("capsa init must run as PID 1", file=sys.stderr)
        sys.exit(2)
    init = Init()
    try:
        signal.signal(signal.SIGTERM, lambda *_: init.graceful_stop())
        # A handler, not SIG_IGN: ignored signals survive exec, and every command would
        # then be deaf to Ctrl-C.
        signal.signal(signal.SIGINT, lambda *_: None)
        init.boot()
        while True:
            time.sleep(3600)
    except BaseException as e:
        log(f"fatal: {e!r}")
        init.power_off()
        while True:
            time.sleep(3600)


if __name__ == "__main__":
    main()


def _disk_of_size(size: object) -> str | None:
    """The virtio disk of exactly ``size`` bytes (None: no size given, or no such disk)."""
    if not isinstance(size, int) or size <= 0:
        return None
    with contextlib.suppress(OSError):
        for name in sorted(os.listdir("/sys/block")):
            if not name.startswith("vd"):
                continue
            with open(f"/sys/block/{name}/size") as f:
                if int(f.read()) * 512 == size:
                    return f"/dev/{name}"
    return None
