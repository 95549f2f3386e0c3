"""The guest agent: serves the host's requests over one byte stream (stdlib only).

Threads, not asyncio: a thread per request keeps the agent's import set and start-up
small (it runs under emulation), and one lock serializes writes to the channel. The
agent must survive anything a command does, so every handler turns exceptions into
``err`` replies and never lets them reach the reader loop.

Run standalone (tests on the host): ``python -m capsa.guest.agent --fd N``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import signal
import stat
import struct
import sys
import termios
import threading
import time
from collections import deque

from .executable import ExecChecks, resolve_in_root
from .protocol import CHUNK, VERSION, FrameReader, ProtocolError, frame_prefix

_RNDRESEEDCRNG = 0x5207  # _IO('R', 0x07): reseed the kernel's CRNG from its input pool

# Guest start-up time matters under emulation: `typing` is only imported by type checkers.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import subprocess
    from collections.abc import Callable
    from typing import Any

    Header = dict[str, Any]

_OUTPUT_CHUNK = 64 * 1024
MAX_BACKGROUND = 64  # background processes kept (finished ones make room, oldest first)
RING_BYTES = 1 << 20  # output kept per stream of a background process
MAX_WATCHERS = 32
_PIPE = -1  # subprocess.PIPE, without importing subprocess before the first command
MAX_IDLE_WORKERS = 8
PIPE_GRACE = 5.0  # seconds the exit waits for streams a background child still holds
BUSYBOX = "/bin/busybox"  # static, in the sandbox image (outside any container root)


class ChildWatcher:
    """Waits for children. Standalone: ``Popen.wait``. PID 1 subclasses it to reap everything."""

    def spawn(self, argv: list[str], **kw: Any) -> subprocess.Popen[bytes]:
        # Imported on first use: the agent says hello sooner (subprocess is slow to import).
        import subprocess

        return subprocess.Popen(argv, **kw)

    def wait(self, proc: subprocess.Popen[bytes]) -> int:
        return proc.wait()


def exit_code_of(returncode: int) -> int:
    """A shell-style exit code from Popen's: 128 + signal number for a killed process."""
    return 128 - returncode if returncode < 0 else returncode


class Workers:
    """Threads for requests, kept for the next one: under emulation starting a thread costs
    about a millisecond, a third of a whole ping. Every request gets a thread at once (one
    kept idle, or a new one): requests may wait on each other, so none may queue behind
    another."""

    def __init__(self, keep: int = MAX_IDLE_WORKERS) -> None:
        self._items: deque[tuple[Callable[..., None], tuple[Any, ...]]] = deque()
        self._ready = threading.Condition()
        self._waiting = 0  # workers blocked until an item comes
        self._keep = keep

    def submit(self, fn: Callable[..., None], *args: Any) -> None:
        """Run ``fn(*args)`` on a thread at once; RuntimeError when no thread can start
        (then it will not run either)."""
        item = (fn, args)
        with self._ready:
            self._items.append(item)
            if self._waiting >= len(self._items):
                self._ready.notify()
                return
        try:
            threading.Thread(target=self._work, daemon=True).start()
        except RuntimeError:
            with self._ready:
                for i, queued in enumerate(self._items):
                    if queued is item:
                        del self._items[i]
                        raise
            # A worker that came free took it meanwhile: it runs after all.

    def _work(self) -> None:
        while True:
            with self._ready:
                self._waiting += 1
                while not self._items:
                    self._ready.wait()
                self._waiting -= 1
                fn, args = self._items.popleft()
            fn(*args)
            del fn, args  # an idle thread holds no request body
            with self._ready:
                if self._waiting >= self._keep:
                    return


class Channel:
    """The framed byte stream to the host; writes from any thread."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._lock = threading.Lock()

    def send(self, header: Header, body: bytes | memoryview = b"") -> None:
        # The body is written from where it lies (a file's read buffer, a pipe's): gathered
        # with its header by writev, never copied into one frame first.
        parts = [memoryview(frame_prefix(header, len(body)))]
        if body:
            parts.append(memoryview(body))
        with self._lock:
            while parts:
                try:
                    n = os.writev(self.fd, parts)
                except InterruptedError:
                    continue
                while n:
                    if n >= len(parts[0]):
                        n -= len(parts.pop(0))
                    else:
                        parts[0], n = parts[0][n:], 0


class Agent:
    def __init__(
        self,
        channel: Channel,
        watcher: ChildWatcher | None = None,
        base_env: dict[str, str] | None = None,
        on_shutdown: Callable[[], None] | None = None,
        on_ready: Callable[[], None] | None = None,
        on_resume: Callable[[str | None], None] | None = None,
        on_setup: Callable[[Header], tuple[dict[str, str], Container | None]] | None = None,
        on_mount: Callable[[Header], None] | None = None,
    ) -> None:
        self.ch = channel
        self.watcher = watcher or ChildWatcher()
        self.base_env = dict(base_env if base_env is not None else os.environ)
        self.on_shutdown = on_shutdown
        self.on_ready = on_ready
        self.on_resume = on_resume
        self.on_setup = on_setup
        self.on_mount = on_mount
        self._set_up = False
        self.container: Container | None = None
        self._procs: dict[int, _Started] = {}
        self._background: dict[int, _Background] = {}
        self._watchers: dict[int, Any] = {}
        self._writes: dict[int, _WriteStream] = {}
        self._acks: dict[int, threading.Event] = {}
        self._event_ids = iter(range(1 << 62, 1 << 63))
        self._lock = threading.Lock()
        self._workers = Workers()

    # -- plumbing -------------------------------------------------------------------------

    def serve(self) -> None:
        """Read frames until the channel closes."""
        self.ch.send({"t": "hello", "id": 0, "v": VERSION, "pid": os.getpid()})
        if self.on_ready is not None:
            self.on_ready()
        reader = FrameReader(self.ch.fd)
        while True:
            try:
                # Into one reused buffer: a fresh buffer per read (os.read) is mmapped and
                # faulted in, which under emulation costs more than the data itself.
                size = reader.read()
            except InterruptedError:
                continue
            except OSError as e:
                if e.errno in (errno.EAGAIN, errno.EIO):
                    # The host end is not connected (virtio-serial): try again shortly.
                    time.sleep(0.05)
                    continue
                raise
            if not size:
                return
            try:
                frames = reader.frames()
            except ProtocolError as e:
                self.ch.send({"t": "err", "id": 0, "errno": errno.EPROTO, "msg": str(e)})
                reader.reset()  # resynchronization is impossible; drop the rest
                continue
            for header, body in frames:
                self._dispatch(header, body)

    def _dispatch(self, h: Header, body: memoryview) -> None:
        """One frame. ``body`` is a view of the read buffer: used here or copied."""
        kind, rid = h["t"], h["id"]
        if kind == "req":
            op = h.get("op")
            handler = getattr(self, f"op_{op}", None) if isinstance(op, str) else None
            if handler is None:
                self._fail(rid, errno.ENOSYS, f"unknown operation {op!r}")
            elif op == "write_file":
                self._run(handler, h, b"")  # must register before its data frames arrive
            else:
                try:
                    self._workers.submit(self._run, handler, h, bytes(body))
                except RuntimeError:  # out of threads: this request fails, the agent lives
                    self._fail(rid, errno.EAGAIN, "the agent cannot start a thread")
        elif kind in ("data", "end"):
            with self._lock:
                stream = self._writes.get(rid)
            if stream is not None:
                stream.feed(body if kind == "data" else None)
        elif kind == "ack":
            with self._lock:
                acked = self._acks.pop(rid, None)
            if acked is not None:
                acked.set()
        elif kind == "detach":
            self.detach(rid)
        elif kind in ("stdin", "stdin_close", "kill", "resize"):
            with self._lock:
                started = self._procs.get(rid)
            if started is not None:
                started.control(kind, h, body)

    def _run(
        self, handler: Callable[[Header, bytes], Header | None], h: Header, body: bytes
    ) -> None:
        rid = h["id"]
        try:
            result = handler(h, body)
            if result is not None:
                self.ch.send({"t": "res", "id": rid, **result})
        except OSError as e:
            self._fail(
                rid, e.errno or errno.EIO, f"{e.strerror or e}: {e.filename or ''}".rstrip(": ")
            )
        except Exception as e:  # the agent outlives any bad request
            self._fail(rid, errno.EINVAL, f"{type(e).__name__}: {e}")

    def send_event(self, fields: Header, wait_ack: float = 0.0) -> bool:
        """Send an unsolicited event; optionally wait until the host confirms it read it."""
        done = threading.Event()
        with self._lock:
            rid = next(self._event_ids)
            self._acks[rid] = done
        self.ch.send({"t": "event", "id": rid, **fields})
        return done.wait(wait_ack) if wait_ack else True

    def _fail(self, rid: int, err: int, msg: str) -> None:
        self.ch.send({"t": "err", "id": rid, "errno": err, "msg": msg})

    # -- processes -----------------------------------------------------------------------

    def _argv(self, h: Header) -> list[str]:
        argv = h.get("argv")
        if isinstance(argv, list) and argv and all(isinstance(a, str) for a in argv):
            return argv
        cmd = h.get("cmd")
        if isinstance(cmd, str):
            return ["/bin/sh", "-c", cmd]
        raise ValueError("exec needs 'argv' (list of strings) or 'cmd' (string)")

    def _env(self, h: Header) -> dict[str, str]:
        env = dict(self.container.env if self.container is not None else self.base_env)
        extra = h.get("env") or {}
        if not isinstance(extra, dict):
            raise ValueError("env must be an object")
        env.update({str(k): str(v) for k, v in extra.items()})
        return env

    def _path(self, h: Header) -> str:
        path = _path(h)
        return self.container.path(path) if self.container is not None else path

    def op_ping(self, h: Header, body: bytes) -> Header:
        return {}

    def op_exec(self, h: Header, body: bytes) -> Header:
        # Output travels as `out` frames like a started process's (never one huge frame);
        # the host collects them until this reply.
        started = _Started(self, h, pty=False)
        if body:
            threading.Thread(target=started.feed_stdin_and_close, args=(body,), daemon=True).start()
        else:
            started.close_stdin()
        code, timed_out = started.run()
        return {"code": code, "timed_out": timed_out}

    def op_start(self, h: Header, body: bytes) -> None:
        if h.get("background"):
            self._start_background(h)
            return
        started = _Started(self, h, pty=bool(h.get("pty")))
        with self._lock:
            self._procs[h["id"]] = started
        self.ch.send({"t": "res", "id": h["id"], "pid": started.proc.pid})
        try:
            code, timed_out = started.run()
        finally:
            with self._lock:
                self._procs.pop(h["id"], None)
        self.ch.send({"t": "exit", "id": h["id"], "code": code, "timed_out": timed_out})

    def _start_background(self, h: Header) -> None:
        """A process that outlives its call: output kept in ring buffers, exit code kept,
        listed by ``ps``, followed by ``attach``."""
        with self._lock:
            self._evict_finished()
            if len(self._background) >= MAX_BACKGROUND:
                raise OSError(errno.EAGAIN, f"{MAX_BACKGROUND} background processes run already")
            record = _Background(self, h)
            self._background[record.started.proc.pid] = record
        self.ch.send({"t": "res", "id": h["id"], "pid": record.started.proc.pid})
        threading.Thread(target=record.run, daemon=True).start()

    def _evict_finished(self) -> None:
        finished = [pid for pid, r in self._background.items() if r.code is not None]
        for pid in finished[: max(0, len(self._background) - MAX_BACKGROUND + 1)]:
            del self._background[pid]

    def op_ps(self, h: Header, body: bytes) -> Header:
        with self._lock:
            records = list(self._background.values())
        return {"procs": [r.describe() for r in records]}

    def op_attach(self, h: Header, body: bytes) -> None:
        """Follow a background process: what its buffers hold, then its output as it
        comes, then its exit. stdin/kill/resize on this call go to the process."""
        pid = h.get("pid")
        with self._lock:
            record = self._background.get(pid) if isinstance(pid, int) else None
            if record is not None:
                self._procs[h["id"]] = record.started
        if record is None:
            raise OSError(errno.ESRCH, f"no background process {pid!r}")
        record.attach(h["id"])

    def detach(self, rid: int) -> None:
        with self._lock:
            self._procs.pop(rid, None)
            records = list(self._background.values())
            watcher = self._watchers.pop(rid, None)
        for record in records:
            record.detach(rid)
        if watcher is not None:
            watcher.stop()

    def op_watch(self, h: Header, body: bytes) -> None:
        """File events under a path (inotify) until the host detaches: ``data`` frames
        with ``ev`` (create, modify, delete, move, overflow), ``path``, ``dest``, ``dir``."""
        from .watch import Watcher

        path = self._path(h)
        root = self.container.root if self.container is not None else ""
        watcher = Watcher(self.ch, h["id"], path, bool(h.get("recursive")), strip=root)
        with self._lock:
            if len(self._watchers) >= MAX_WATCHERS:
                watcher.stop()
                raise OSError(errno.EAGAIN, f"{MAX_WATCHERS} watches are open already")
            self._watchers[h["id"]] = watcher
        self.ch.send({"t": "res", "id": h["id"], "watches": watcher.count})
        try:
            watcher.run()
        finally:
            with self._lock:
                self._watchers.pop(h["id"], None)

    # -- files ---------------------------------------------------------------------------

    def op_read_file(self, h: Header, body: bytes) -> Header:
        total = 0
        buffer = memoryview(bytearray(CHUNK))  # one buffer for the whole file
        fd = os.open(self._path(h), os.O_RDONLY | os.O_CLOEXEC)
        try:
            while size := os.readv(fd, [buffer]):
                total += size
                self.ch.send({"t": "data", "id": h["id"]}, buffer[:size])
        finally:
            os.close(fd)
        return {"size": total}

    def op_write_file(self, h: Header, body: bytes) -> None:
        path = self._path(h)
        mode = int(h.get("mode", 0o644)) & 0o7777
        if h.get("make_parents"):
            parent = os.path.dirname(path)
            if parent:
                os.makedirs(parent, exist_ok=True)
        stream = _WriteStream(self, h["id"], path, mode)
        with self._lock:
            self._writes[h["id"]] = stream

    def finish_write(self, stream: _WriteStream) -> None:
        with self._lock:
            self._writes.pop(stream.rid, None)

    def op_exists(self, h: Header, body: bytes) -> Header:
        return {"exists": os.path.exists(self._path(h))}

    def op_stat(self, h: Header, body: bytes) -> Header:
        return _stat_fields(os.lstat(self._path(h)))

    def op_list_dir(self, h: Header, body: bytes) -> Header:
        entries = []
        with os.scandir(self._path(h)) as it:
            for e in it:
                try:
                    st = e.stat(follow_symlinks=False)
                except OSError:
                    continue
                entries.append({"name": e.name, **_stat_fields(st)})
        entries.sort(key=lambda x: str(x["name"]))
        return {"entries": entries}

    def op_mkdir(self, h: Header, body: bytes) -> Header:
        path, mode = self._path(h), int(h.get("mode", 0o755)) & 0o7777
        if h.get("parents", True):
            os.makedirs(path, mode=mode, exist_ok=True)
        else:
            os.mkdir(path, mode)
        return {}

    def op_remove(self, h: Header, body: bytes) -> Header:
        path = self._path(h)
        st = os.lstat(path)
        if stat.S_ISDIR(st.st_mode):
            if h.get("recursive"):
                _rmtree(path)
            else:
                os.rmdir(path)
        else:
            os.unlink(path)
        return {}

    def op_symlink(self, h: Header, body: bytes) -> Header:
        target = h.get("target")
        if not isinstance(target, str) or not target:
            raise ValueError("a non-empty 'target' string is required")
        os.symlink(target, self._path(h))
        return {}

    def op_readlink(self, h: Header, body: bytes) -> Header:
        return {"target": os.readlink(self._path(h))}

    def op_info(self, h: Header, body: bytes) -> Header:
        return system_info()

    def op_metrics(self, h: Header, body: bytes) -> Header:
        return usage(self.container.root if self.container is not None else "/")

    def op_resume(self, h: Header, body: bytes) -> Header:
        """First request to a VM restored from a snapshot: become a distinct machine.

        Every clone of one snapshot starts with the same RNG state and an old clock: mix the
        host's fresh random bytes in and force a reseed, set the time, and let init give
        eth0 its new MAC address and lease."""
        _renew(h, body)
        mac = h.get("mac")
        if self.on_resume is not None:
            self.on_resume(mac if isinstance(mac, str) else None)
        return {"v": VERSION, "pid": os.getpid()}

    def op_setup(self, h: Header, body: bytes) -> Header:
        """What makes this sandbox itself, once: hostname, environment, machine id, shares,
        network, the main process (or an OCI image's root and entrypoint). A sandbox made
        from a template also gets what ``resume`` gives (entropy, the time, its MAC)."""
        with self._lock:
            if self._set_up:
                raise ValueError("this sandbox is already set up")
            self._set_up = True
        _renew(h, body)
        if self.on_setup is None:
            raise ValueError("this guest cannot be set up")
        env, self.container = self.on_setup(h)
        self.base_env.update(env)
        return {"v": VERSION, "pid": os.getpid()}

    def op_mount(self, h: Header, body: bytes) -> Header:
        """Mount shares and the image's root ahead of the set-up (a template maker: its
        copies find them mounted)."""
        if self.on_mount is None:
            raise ValueError("this guest cannot mount shares")
        self.on_mount(h)
        return {}

    def op_shutdown(self, h: Header, body: bytes) -> Header:
        if self.on_shutdown is not None:
            # Reply first: the power-off must not race the answer off the wire.
            threading.Timer(0.05, self.on_shutdown).start()
        return {}


def _renew(h: Header, body: bytes) -> None:
    """Host entropy into the CRNG (with a forced reseed) and the host's time."""
    if body:
        with open("/dev/urandom", "wb") as f:
            f.write(body)
            with contextlib.suppress(OSError):
                fcntl.ioctl(f.fileno(), _RNDRESEEDCRNG)
    now = h.get("time_ns")
    if isinstance(now, int):
        with contextlib.suppress(OSError):
            time.clock_settime_ns(time.CLOCK_REALTIME, now)


def _path(h: Header) -> str:
    path = h.get("path")
    if not isinstance(path, str) or not path or "\0" in path:
        raise ValueError("a non-empty 'path' string is required")
    return path


def _stat_fields(st: os.stat_result) -> Header:
    return {
        "size": st.st_size,
        "mode": st.st_mode,
        "mtime": st.st_mtime,
        "uid": st.st_uid,
        "gid": st.st_gid,
        "is_dir": stat.S_ISDIR(st.st_mode),
        "is_symlink": stat.S_ISLNK(st.st_mode),
    }


def _rmtree(path: str) -> None:
    for root, dirs, files in os.walk(path, topdown=False):
        for name in files:
            os.unlink(os.path.join(root, name))
        for name in dirs:
            full = os.path.join(root, name)
            if os.path.islink(full):
                os.unlink(full)
            else:
                os.rmdir(full)
    os.rmdir(path)


def _read(path: str, default: str = "") -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return default


def usage(writable: str) -> Header:
    """CPU time, memory, the writable layer's use and network bytes, as counters."""
    ticks = [int(v) for v in _read("/proc/stat", "cpu 0").splitlines()[0].split()[1:9]]
    ticks += [0] * (8 - len(ticks))
    user, nice, system, idle, iowait, irq, softirq, steal = ticks
    hz = os.sysconf("SC_CLK_TCK") or 100
    memory = {}
    for line in _read("/proc/meminfo").splitlines():
        name, _, rest = line.partition(":")
        if name in ("MemTotal", "MemAvailable") and rest.split():
            memory[name] = int(rest.split()[0]) * 1024
    try:
        fs = os.statvfs(writable)
        disk_total, disk_free = fs.f_blocks * fs.f_frsize, fs.f_bfree * fs.f_frsize
    except OSError:
        disk_total = disk_free = 0
    rx = tx = 0
    with contextlib.suppress(OSError):
        for name in os.listdir("/sys/class/net"):
            if name != "lo":
                rx += int(_read(f"/sys/class/net/{name}/statistics/rx_bytes", "0") or 0)
                tx += int(_read(f"/sys/class/net/{name}/statistics/tx_bytes", "0") or 0)
    return {
        "cpu_seconds": (user + nice + system + irq + softirq + steal) / hz,
        "idle_seconds": (idle + iowait) / hz,
        "cpus": os.cpu_count() or 1,
        "memory_total": memory.get("MemTotal", 0),
        "memory_available": memory.get("MemAvailable", 0),
        "disk_total": disk_total,
        "disk_used": disk_total - disk_free,
        "net_rx_bytes": rx,
        "net_tx_bytes": tx,
        "uptime": float(_read("/proc/uptime", "0 0").split()[0]),
    }


def system_info() -> Header:
    def read(path: str, default: str = "") -> str:
        try:
            with open(path) as f:
                return f.read()
        except OSError:
            return default

    mem = 0
    for line in read("/proc/meminfo").splitlines():
        if line.startswith("MemTotal:"):
            mem = int(line.split()[1]) * 1024
    mounts = []
    for line in read("/proc/mounts").splitlines():
        parts = line.split()
        if len(parts) >= 3:
            mounts.append({"source": parts[0], "target": parts[1], "fstype": parts[2]})
    return {
        "kernel_version": read("/proc/version").strip(),
        "hostname": os.uname().nodename,
        "cpus": os.cpu_count() or 1,
        "memory_bytes": mem,
        "mounts": mounts,
        "uptime": float(read("/proc/uptime", "0 0").split()[0]),
    }


class _WriteStream:
    """A file being written from ``data`` frames; written in order as frames arrive."""

    def __init__(self, agent: Agent, rid: int, path: str, mode: int) -> None:
        self.agent, self.rid, self.path, self.mode = agent, rid, path, mode
        directory, name = os.path.split(path)
        self.tmp = os.path.join(directory, f".{name}.capsa-{rid}")
        self.fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        self.size = 0
        self.error: OSError | None = None

    def feed(self, data: bytes | memoryview | None) -> None:
        if data is not None:
            if self.error is None:
                try:
                    view = memoryview(data)
                    while view:
                        view = view[os.write(self.fd, view) :]
                    self.size += len(data)
                except OSError as e:
                    self.error = e
            return
        self.agent.finish_write(self)
        try:
            os.fchmod(self.fd, self.mode)
            os.close(self.fd)
            if self.error is not None:
                raise self.error
            # Readers never see a half-written file.
            os.rename(self.tmp, self.path)
            self.agent.ch.send({"t": "res", "id": self.rid, "size": self.size})
        except OSError as e:
            with contextlib.suppress(OSError):
                os.unlink(self.tmp)
            self.agent._fail(self.rid, e.errno or errno.EIO, f"{e.strerror or e}: {self.path}")


class _Started:
    """One child process: run to completion (exec) or streamed (start)."""

    def __init__(self, agent: Agent, h: Header, pty: bool) -> None:
        self.agent, self.rid, self.pty = agent, h["id"], pty
        timeout = h.get("timeout")
        self.timeout = float(timeout) if timeout is not None else None
        cwd = h.get("cwd")
        argv, env = agent._argv(h), agent._env(h)
        self.master: int | None = None
        container = agent.container
        enter = None
        entry = None if container is None or pty else container.entry(argv, cwd)
        if entry is not None:
            argv, cwd = entry
        elif container is not None:
            # The working directory is inside the container: set it after the chroot.
            enter, cwd = (lambda c=cwd: container.enter(c)), None
        if pty:
            master, slave = os.openpty()
            _set_winsize(slave, int(h.get("rows", 24)), int(h.get("cols", 80)))
            env.setdefault("TERM", "xterm")

            def in_child() -> None:
                _take_controlling_tty()
                if enter is not None:
                    enter()

            self.proc = agent.watcher.spawn(
                argv,
                stdin=slave,
                stdout=slave,
                stderr=slave,
                cwd=cwd,
                env=env,
                start_new_session=True,
                preexec_fn=in_child,
            )
            os.close(slave)
            self.master = master
            self.readers = [(master, 1)]
        else:
            self.proc = agent.watcher.spawn(
                argv,
                stdin=_PIPE,
                stdout=_PIPE,
                stderr=_PIPE,
                cwd=cwd,
                env=env,
                start_new_session=True,
                preexec_fn=enter,
            )
            assert self.proc.stdout is not None and self.proc.stderr is not None
            self.readers = [(self.proc.stdout.fileno(), 1), (self.proc.stderr.fileno(), 2)]
        self._stdin_lock = threading.Lock()

    def write_stdin(self, data: bytes | memoryview) -> None:
        with self._stdin_lock:
            fd = (
                self.master if self.pty else (self.proc.stdin.fileno() if self.proc.stdin else None)
            )
            if fd is None:
                return
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
            except OSError:
                pass  # the process closed its input; like a shell, drop the rest

    def close_stdin(self) -> None:
        with self._stdin_lock:
            if self.pty:
                if self.master is not None:
                    # A terminal has no half-close: EOF is the VEOF character.
                    self.write_stdin_eof()
            elif self.proc.stdin is not None:
                with contextlib.suppress(OSError):
                    self.proc.stdin.close()
                self.proc.stdin = None

    def write_stdin_eof(self) -> None:
        assert self.master is not None
        with contextlib.suppress(OSError):
            os.write(self.master, b"\x04")

    def control(self, kind: str, h: Header, body: bytes | memoryview) -> None:
        if kind == "stdin":
            self.write_stdin(body)
        elif kind == "stdin_close":
            self.close_stdin()
        elif kind == "kill":
            self.signal(int(h.get("sig", signal.SIGKILL)))
        elif kind == "resize" and self.pty:
            with self._stdin_lock:  # the pump closes the master under this lock
                if self.master is None:
                    return
                _set_winsize(self.master, int(h.get("rows", 24)), int(h.get("cols", 80)))
            self.signal(signal.SIGWINCH)

    def signal(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except OSError:
            with contextlib.suppress(OSError):
                self.proc.send_signal(sig)

    def _pump_all(self) -> None:
        """Send the output of every stream until each ends. A stream ends when every
        process holding its other end is gone, which may be long after the command: a
        background child keeps its pipe and is never cut off (run() stops waiting for
        this after PIPE_GRACE, not this)."""
        import select

        poller = select.poll()
        streams = dict(self.readers)
        for fd in streams:
            poller.register(fd, select.POLLIN)
        while streams:
            for fd, _ in poller.poll():
                if fd in streams and not self._forward(fd, streams[fd]):
                    poller.unregister(fd)
                    self._release_output(streams.pop(fd))

    def _forward(self, fd: int, which: int) -> bool:
        """Send what ``fd`` has; False once it ended."""
        while True:
            try:
                data = os.read(fd, _OUTPUT_CHUNK)
            except InterruptedError:
                continue
            except OSError:  # EIO: the pty's last user went away
                return False
            if not data:
                return False
            self.sink(which, data)
            return True

    def sink(self, which: int, data: bytes) -> None:
        self.agent.ch.send({"t": "out", "id": self.rid, "fd": which}, data)

    def _release_output(self, which: int) -> None:
        # The pump owns its descriptor: it may outlive run() while a background child of
        # the command still holds the other end.
        with self._stdin_lock:
            if self.pty:
                if self.master is not None:
                    os.close(self.master)
                    self.master = None
                return
        stream = self.proc.stdout if which == 1 else self.proc.stderr
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()

    def run(self) -> tuple[int, bool]:
        # One thread follows both streams, not a thread per stream: under emulation each
        # thread started costs about a millisecond.
        pump = threading.Thread(target=self._pump_all, daemon=True)
        pump.start()
        timed_out = False
        timer = None
        if self.timeout is not None:

            def expire() -> None:
                nonlocal timed_out
                timed_out = True
                self.signal(signal.SIGKILL)

            timer = threading.Timer(self.timeout, expire)
            timer.start()
        code = exit_code_of(self.agent.watcher.wait(self.proc))
        if timer is not None:
            timer.cancel()
        # Background children of the command may hold the pipes open: don't wait forever.
        pump.join(timeout=PIPE_GRACE)
        if not self.pty:
            self.close_stdin()  # under the lock a late stdin frame's write holds
        return code, timed_out

    def feed_stdin_and_close(self, data: bytes) -> None:
        self.write_stdin(data)
        self.close_stdin()


class _Background:
    """A background process: its last RING_BYTES of each stream (and how many bytes were
    dropped before them), its exit code once it ends, and the calls attached to it."""

    def __init__(self, agent: Agent, h: Header) -> None:
        self.agent = agent
        self.argv = agent._argv(h)
        self.lock = threading.Lock()
        self.rings: dict[int, bytearray] = {1: bytearray(), 2: bytearray()}
        self.dropped = {1: 0, 2: 0}
        self.attached: set[int] = set()
        self.code: int | None = None
        self.started_at = time.time()
        self.started = _Started(agent, h, pty=bool(h.get("pty")))
        self.started.sink = self.keep  # type: ignore[method-assign]

    def keep(self, which: int, data: bytes) -> None:
        with self.lock:
            ring = self.rings[which]
            ring += data
            if len(ring) > RING_BYTES:
                excess = len(ring) - RING_BYTES
                del ring[:excess]
                self.dropped[which] += excess
            for rid in self.attached:
                self.agent.ch.send({"t": "out", "id": rid, "fd": which}, data)

    def run(self) -> None:
        code, _ = self.started.run()
        with self.lock:
            self.code = code
            attached, self.attached = self.attached, set()
        for rid in attached:
            self.agent.ch.send({"t": "exit", "id": rid, "code": code, "timed_out": False})
            self.agent.detach(rid)

    def attach(self, rid: int) -> None:
        with self.lock:
            self.agent.ch.send(
                {
                    "t": "res",
                    "id": rid,
                    "pid": self.started.proc.pid,
                    "dropped": [self.dropped[1], self.dropped[2]],
                }
            )
            for which, ring in self.rings.items():
                if ring:
                    self.agent.ch.send({"t": "out", "id": rid, "fd": which}, bytes(ring))
            if self.code is None:
                self.attached.add(rid)
                return
        self.agent.ch.send({"t": "exit", "id": rid, "code": self.code, "timed_out": False})
        self.agent.detach(rid)

    def detach(self, rid: int) -> None:
        with self.lock:
            self.attached.discard(rid)

    def describe(self) -> Header:
        with self.lock:
            return {
                "pid": self.started.proc.pid,
                "argv": self.argv,
                "running": self.code is None,
                "exit_code": self.code,
                "started": self.started_at,
                "dropped": [self.dropped[1], self.dropped[2]],
            }


def _set_winsize(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


class Container:
    """Where commands run when the sandbox boots an OCI image: a root, the image's
    environment, working directory and user."""

    def __init__(
        self, root: str, env: dict[str, str], workdir: str, uid: int, gid: int, groups: list[int]
    ) -> None:
        self.root, self.env, self.workdir = root, env, workdir
        self.uid, self.gid, self.groups = uid, gid, groups
        self._exec_checks = ExecChecks(root)
        # The image's root user keeps the agent's credentials: busybox's nsenter can enter
        # for it. Any other user needs enter(), which sets its groups.
        self._nsenter = (
            uid == 0
            and gid == 0
            and set(groups) | set(os.getgroups()) <= {0}
            and os.access(BUSYBOX, os.X_OK)
        )

    def entry(self, argv: list[str], cwd: str | None) -> tuple[list[str], str] | None:
        """``argv`` run in the container by busybox's ``nsenter -r`` (static, exec'd from
        a vfork: no Python in the child, which makes Python fork the whole agent and costs
        ~10 ms per command under emulation), with the working directory it starts in as
        the agent sees it. None where only :meth:`enter` behaves the same: another user, a
        program named without its path (busybox would run its own applet of that name, not
        the image's program), a directory that is missing or relative, or a program exec
        would refuse (enter() reports these as the agent's errors; through nsenter they
        would be busybox's exit 127). Both are resolved as the chroot resolves them; the
        directory before the chroot, so a process of the container racing to swap it for
        a symlink could start the command outside, which root in the container can do to
        itself anyway (other users never come here)."""
        usable = self._nsenter and (cwd is None or isinstance(cwd, str))
        if not usable or not argv[0].startswith("/"):
            return None
        where = self._inside(cwd or self.workdir)
        if where is None or not os.path.isdir(where):
            return None
        if self._exec_checks.program(argv[0]) is None:
            return None
        return [BUSYBOX, "nsenter", f"-r{self.root}", "-F", "--", *argv], where

    def _inside(self, path: str) -> str | None:
        """Absolute ``path`` in the container as the chroot resolves it, seen from outside;
        None for a relative path or where the chroot would fail."""
        return resolve_in_root(self.root, path) if path.startswith("/") else None

    def enter(self, cwd: str | None = None) -> None:
        """In the child, before exec: chroot, chdir, drop to the image's user."""
        os.chroot(self.root)
        try:
            os.chdir(cwd or self.workdir)
        except OSError:
            os.chdir("/")
        os.setgroups(self.groups)
        os.setgid(self.gid)
        os.setuid(self.uid)

    def path(self, path: str) -> str:
        """A guest path as seen inside the container, from the agent's side."""
        return os.path.join(self.root, os.path.normpath("/" + path).lstrip("/"))


def _take_controlling_tty() -> None:
    # Runs in the child after setsid(): make the pty on fd 0 our controlling terminal so
    # that Ctrl-C and job control work in an interactive shell.
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] != "--fd":
        print("usage: python -m capsa.guest.agent --fd N", file=sys.stderr)
        return 2
    agent = Agent(Channel(int(argv[1])))
    agent.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
