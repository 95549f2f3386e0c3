"""Cleanup that survives the owner: a tiny watchdog process per Python process.

The owner registers every child process (QEMU, device helpers) and every run directory
with the watchdog over a pipe. When the pipe closes — normal exit, exception, or SIGKILL
of the owner — the watchdog kills what is still registered and removes the directories.
Normal teardown unregisters things first, so the watchdog only acts after a crash.

The watchdog runs in its own session so a Ctrl-C aimed at the owner's terminal does not
take it down before it has done its job, and it is not the owner's child: supervisors that
kill a dead process's children (Ray does, for its workers) would kill it first.
"""

from __future__ import annotations

import atexit
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

# Runs with `python -I -S -c`: keep it stdlib-only and free of capsa imports.
_WATCHDOG = r"""
import os, select, shutil, signal, sys
if os.fork():
    os._exit(0)  # the owner reaps this launcher; the watchdog is nobody's child of theirs
signal.signal(signal.SIGINT, signal.SIG_IGN)
pids = {}
paths = set()
for raw in sys.stdin.buffer:
    verb, _, arg = raw.decode("utf-8", "surrogateescape").rstrip("\n").partition(" ")
    if verb == "pid":
        pid = int(arg)
        try:
            pids[pid] = os.pidfd_open(pid)
        except OSError:
            pass
    elif verb == "unpid":
        fd = pids.pop(int(arg), None)
        if fd is not None:
            os.close(fd)
    elif verb == "path":
        paths.add(arg)
    elif verb == "unpath":
        paths.discard(arg)
for pid, fd in pids.items():
    try:
        signal.pidfd_send_signal(fd, signal.SIGKILL)
    except OSError:
        pass
for pid, fd in pids.items():
    try:  # a pidfd turns readable once its process is gone (it is not our child to wait for)
        select.select([fd], [], [], 5)
    except (OSError, ValueError):
        pass
for p in paths:
    if os.path.isdir(p) and not os.path.islink(p):
        shutil.rmtree(p, ignore_errors=True)
    else:
        try:
            os.unlink(p)
        except OSError:
            pass
"""


class Reaper:
    """Registers processes and paths with the per-process watchdog."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._owner_pid = 0
        # What is registered, so that a watchdog started again (someone killed the last
        # one) is told all of it.
        self._pids: set[int] = set()
        self._paths: set[str] = set()

    def _ensure_started(self) -> tuple[subprocess.Popen[bytes], bool]:
        """The watchdog, and whether it was started just now."""
        if self._owner_pid != os.getpid():
            # A forked child: what its parent registered is the parent's business.
            self._proc, self._pids, self._paths = None, set(), set()
        fresh = self._proc is None
        if self._proc is None:
            self._proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", _WATCHDOG],
                stdin=subprocess.PIPE,
                # Held open by the watchdog until it is done: close() reads to its end.
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
                close_fds=True,
            )
            if self._proc.wait() != 0:  # the launcher, gone once the watchdog is forked
                self._proc = None
                raise OSError("capsa's watchdog process could not start")
            self._owner_pid = os.getpid()
        return self._proc, fresh

    def _send(self, line: str, record: Callable[[], None]) -> None:
        with self._lock:
            for _ in range(2):
                proc, fresh = self._ensure_started()
                record()
                assert proc.stdin is not None
                lines = self._registered() if fresh else [line]
                try:
                    proc.stdin.write(b"".join(_encoded(text) for text in lines))
                    proc.stdin.flush()
                    return
                except BrokenPipeError:
                    # The watchdog died (someone killed it): a new one is told everything.
                    self._proc = None

    def _registered(self) -> list[str]:
        return [f"pid {pid}" for pid in self._pids] + [f"path {p}" for p in self._paths]

    def watch_pid(self, pid: int) -> None:
        self._send(f"pid {pid}", lambda: self._pids.add(pid))

    def unwatch_pid(self, pid: int) -> None:
        self._send(f"unpid {pid}", lambda: self._pids.discard(pid))

    def watch_path(self, path: Path) -> None:
        self._send(f"path {path}", lambda: self._paths.add(str(path)))

    def unwatch_path(self, path: Path) -> None:
        self._send(f"unpath {path}", lambda: self._paths.discard(str(path)))

    def close(self) -> None:
        """Let the watchdog clean whatever is still registered and exit."""
        with self._lock:
            if self._proc is not None and self._owner_pid == os.getpid():
                assert self._proc.stdin is not None and self._proc.stdout is not None
                self._proc.stdin.close()
                self._proc.stdout.read()  # the end of it: the watchdog has cleaned up
                self._proc.stdout.close()
            self._proc = None


def _encoded(line: str) -> bytes:
    return line.encode("utf-8", "surrogateescape") + b"\n"


REAPER = Reaper()
atexit.register(REAPER.close)
