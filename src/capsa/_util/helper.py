"""Helper processes: how capsa starts, talks to and stops the programs that serve its
devices (vsock, virtio-fs) and networks (the switch and gateway).

The convention every helper follows (``python -m MODULE ARGS``):

- it prints ``READY`` on stdout once every socket it serves is listening (QEMU refuses a
  vhost-user back end, and never reconnects a netdev, that is not there yet);
- its stdin is its lifeline: end of file means the owner is gone, and it exits (so does
  SIGTERM); a helper with a control channel reads one JSON request per line there and
  answers each with one JSON line on stdout;
- it logs JSON records on stderr, which the owner re-emits in its own logging.

The owner's side is :class:`HelperProcess`; the helper's side is :func:`run_helper`,
:func:`say_ready`, :func:`stop_event` and :func:`serve_requests`. The watchdog kills a
helper whose owner died without stopping it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any

from capsa._util.privileges import Identity, drop_privileges
from capsa._util.reaper import REAPER
from capsa.errors import CapsaError, InvalidConfig, StartFailed

READY = b"READY\n"
START_TIMEOUT = 15.0
REQUEST_TIMEOUT = 15.0
STOP_TIMEOUT = 5.0
STDERR_TAIL = 20

log = logging.getLogger("capsa.helper")
Request = dict[str, Any]


# -- the owner's side ----------------------------------------------------------------------------


class HelperProcess:
    """A running helper, owned by the caller (and by the watchdog if the caller dies)."""

    def __init__(self, proc: asyncio.subprocess.Process, what: str) -> None:
        self.proc = proc
        self.what = what
        self.stderr_tail: list[str] = []
        self._lock = asyncio.Lock()
        self._next_id = 0
        self._logs: asyncio.Task[None] | None = None

    @classmethod
    async def start(
        cls, module: str, args: Sequence[str], what: str, identity: Identity | None = None
    ) -> HelperProcess:
        """Start ``python -m module args`` and return once it says it is listening (as
        ``identity``, when given: it drops to it itself, before it says so)."""
        if identity is not None:
            args = [*args, "--identity", identity.to_arg()]
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            module,
            *args,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,  # a Ctrl-C for the owner must not reach its helpers
        )
        REAPER.watch_pid(proc.pid)
        helper = cls(proc, what)
        helper._logs = asyncio.get_running_loop().create_task(helper._pump_logs())
        assert proc.stdout is not None
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), START_TIMEOUT)
        except TimeoutError:
            line = b""
        if line != READY:
            await helper.stop()
            error = "".join(helper.stderr_tail).strip() or f"no READY within {START_TIMEOUT:.0f} s"
            raise StartFailed(f"{what} failed to start: {error}")
        return helper

    async def _pump_logs(self) -> None:
        """Keep reading stderr (a full pipe would stall the helper) into our logging."""
        assert self.proc.stderr is not None
        while line := await self.proc.stderr.readline():
            text = line.decode(errors="replace")
            self.stderr_tail = [*self.stderr_tail[-(STDERR_TAIL - 1) :], text]
            relog(line, self.what)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc.returncode is None

    async def request(self, op: str, **fields: object) -> Request:
        """One request on the control channel; its answer, or the helper's error raised."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        async with self._lock:
            if not self.running:
                raise StartFailed(f"{self.what} is not running")
            self._next_id += 1
            line = json.dumps({"id": self._next_id, "op": op, **fields}).encode() + b"\n"
            self.proc.stdin.write(line)
            await self.proc.stdin.drain()
            raw = await asyncio.wait_for(self.proc.stdout.readline(), REQUEST_TIMEOUT)
        if not raw:
            raise StartFailed(f"{self.what} exited")
        reply: Request = json.loads(raw)
        if not reply.get("ok"):
            raise InvalidConfig(f"{self.what} {op}: {reply.get('error')}")
        return reply

    async def stop(self) -> None:
        """Close the lifeline and wait for the helper to go; kill it if it lingers."""
        if self.running:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
            try:
                await asyncio.wait_for(self.proc.wait(), STOP_TIMEOUT)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        if self._logs is not None:
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(self._logs, 2)
        REAPER.unwatch_pid(self.proc.pid)

    async def wait(self) -> int:
        return await self.proc.wait()


def relog(line: bytes, what: str) -> None:
    """Re-emit a helper's log record in the owner's logging, structured fields intact."""
    try:
        data = json.loads(line)
        name, level, msg, extra = data["name"], int(data["level"]), data["msg"], data["extra"]
    except (ValueError, KeyError, TypeError):
        log.warning("%s: %s", what, line.decode(errors="replace").rstrip())
        return
    logging.getLogger(str(name)).log(level, "%s", msg, extra=dict(extra))


# -- the helper's side ---------------------------------------------------------------------------


class JsonLogFormatter(logging.Formatter):
    """One JSON object per record, so the owner can re-emit it with its ``capsa_`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        extra = {k: v for k, v in vars(record).items() if k.startswith("capsa_")}
        data = {"name": record.name, "level": record.levelno, "msg": record.getMessage()}
        return json.dumps({**data, "extra": extra}, default=str)


def run_helper(main: Coroutine[Any, Any, None], level: int = logging.WARNING) -> int:
    """The body of a helper's ``main()``: logging to the owner, then ``main`` to the end."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLogFormatter())
    logging.basicConfig(level=level, handlers=[handler], force=True)
    asyncio.run(main)
    return 0


def say_ready(identity: str | None = None) -> None:
    """Tell the owner every socket is listening; first become ``identity`` (its
    ``--identity`` argument), so nothing of the guest's ever reaches a privileged helper."""
    if identity is not None:
        drop_privileges(Identity.from_arg(identity))
    os.write(sys.stdout.fileno(), READY)


def stop_event() -> asyncio.Event:
    """Set on SIGTERM or when the owner's end of stdin closes (helpers without control)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)

    def on_lifeline() -> None:
        if not os.read(sys.stdin.fileno(), 4096):
            stop.set()  # the owner is gone

    loop.add_reader(sys.stdin.fileno(), on_lifeline)
    return stop


async def serve_requests(
    handle: Callable[[Request], Awaitable[Request]], done: asyncio.Event
) -> None:
    """The control channel: each JSON line on stdin answered by one on stdout, until the
    owner closes stdin (which also sets ``done``)."""
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, done.set)
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while not done.is_set():
        line = await reader.readline()
        if not line:
            break  # the owner is gone
        request: object = None
        try:
            request = json.loads(line)
            if not isinstance(request, dict):
                raise ValueError("a request is a JSON object")
            reply = {"ok": True, **await handle(request)}
        except (ValueError, KeyError, TypeError, OSError, CapsaError) as e:
            reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        reply["id"] = request.get("id") if isinstance(request, dict) else None
        os.write(sys.stdout.fileno(), json.dumps(reply).encode() + b"\n")
    done.set()
