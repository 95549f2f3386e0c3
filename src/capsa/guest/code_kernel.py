"""A code execution context inside the guest: one long-lived interpreter (Python, or a bash
it drives) that runs cells and keeps their state, like a notebook kernel.

It runs under the image's own ``python3`` (standard library only; 3.9 and later) and is
driven over its stdin and stdout:

- in: one JSON object per line, ``{"id": N, "code": "..."}``;
- out: JSON lines on the descriptor the host reads, each ``{"id": N, "t": KIND, ...}``:
  ``stdout``/``stderr`` (``text``), ``display`` and ``result`` (``data``: MIME type →
  text or base64), ``error`` (``name``, ``value``, ``traceback``), then ``done``
  (``truncated``: output was dropped past the cap).

What the cell's code (and its child processes) write to descriptors 1 and 2 is read back
from pipes and sent as ``stdout``/``stderr``. SIGINT interrupts the running cell only.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading

# A trimmed interpreter (the minimal image's) has no `typing`: type checkers only.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

MAX_CELL_OUTPUT = 4 << 20  # bytes per stream and cell; the rest is dropped and flagged
MARK = b"\x00capsa-cell-end\x00"
BASH_DONE = "__capsa_done_"


class Wire:
    """The host's descriptor: JSON lines, one writer at a time, each cell's output capped."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.lock = threading.Lock()
        self.cell = 0
        self.sent = {"stdout": 0, "stderr": 0}
        self.truncated = False

    def start_cell(self, cell: int) -> None:
        with self.lock:
            self.cell = cell
            self.sent = {"stdout": 0, "stderr": 0}
            self.truncated = False

    def send(self, kind: str, **fields: Any) -> None:
        line = json.dumps({"id": self.cell, "t": kind, **fields}).encode() + b"\n"
        with self.lock:
            view = memoryview(line)
            while view:
                view = view[os.write(self.fd, view) :]

    def output(self, stream: str, text: str) -> None:
        with self.lock:
            room = MAX_CELL_OUTPUT - self.sent[stream]
            if room <= 0:
                self.truncated = True
                return
            if len(text) > room:
                text, self.truncated = text[:room], True
            self.sent[stream] += len(text)
        if text:
            self.send(stream, text=text)


class Stream:
    """``sys.stdout``/``sys.stderr`` while a cell runs: straight onto the wire, in order."""

    def __init__(self, wire: Wire, name: str) -> None:
        self.wire, self.name = wire, name
        self.encoding, self.errors = "utf-8", "replace"

    def write(self, text: str) -> int:
        self.wire.output(self.name, str(text))
        return len(text)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return 1 if self.name == "stdout" else 2


class FdForwarder:
    """Descriptor 1 or 2 as a pipe: what child processes write goes onto the wire."""

    def __init__(self, wire: Wire, fd: int, name: str) -> None:
        self.wire, self.name = wire, name
        read, write = os.pipe()
        os.dup2(write, fd)
        os.close(write)
        self.fd, self.read = fd, read
        self.drained = threading.Event()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        pending = b""
        while True:
            chunk = os.read(self.read, 65536)
            if not chunk:
                return
            pending += chunk
            while MARK in pending:
                before, pending = pending.split(MARK, 1)
                self._emit(before)
                self.drained.set()
            # Hold back a tail that may be the start of a mark.
            keep = len(MARK) - 1
            if len(pending) > keep:
                self._emit(pending[:-keep])
                pending = pending[-keep:]

    def _emit(self, data: bytes) -> None:
        if data:
            self.wire.output(self.name, data.decode("utf-8", "replace"))

    def drain(self) -> None:
        """Wait until everything written so far has been forwarded."""
        self.drained.clear()
        os.write(self.fd, MARK)
        self.drained.wait(2.0)


def mime_bundle(value: Any) -> dict[str, str]:
    """A value's rich representations (IPython's ``_repr_*_`` protocol) plus its repr."""
    bundle: dict[str, str] = {}
    for method, mime, binary in (
        ("_repr_png_", "image/png", True),
        ("_repr_jpeg_", "image/jpeg", True),
        ("_repr_svg_", "image/svg+xml", False),
        ("_repr_html_", "text/html", False),
        ("_repr_markdown_", "text/markdown", False),
        ("_repr_json_", "application/json", False),
    ):
        render = getattr(value, method, None)
        if not callable(render):
            continue
        try:
            data = render()
        except Exception:
            continue
        if data is None:
            continue
        if binary and isinstance(data, bytes):
            bundle[mime] = base64.b64encode(data).decode()
        elif mime == "application/json" and not isinstance(data, str):
            bundle[mime] = json.dumps(data)
        else:
            bundle[mime] = str(data)
    try:
        bundle["text/plain"] = repr(value)
    except Exception as e:
        bundle["text/plain"] = f"<repr failed: {e!r}>"
    return bundle


def figures() -> list[dict[str, str]]:
    """Open matplotlib figures as PNGs (then closed), like a notebook's inline backend."""
    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is None:
        return []
    import io

    out = []
    for number in pyplot.get_fignums():
        buffer = io.BytesIO()
        pyplot.figure(number).savefig(buffer, format="png")
        out.append({"image/png": base64.b64encode(buffer.getvalue()).decode(), "text/plain": ""})
    pyplot.close("all")
    return out


class PythonKernel:
    def __init__(self, wire: Wire) -> None:
        self.wire = wire
        self.namespace: dict[str, Any] = {"__name__": "__main__", "__builtins__": __builtins__}
        self.namespace["display"] = self.display
        self.streams = (Stream(wire, "stdout"), Stream(wire, "stderr"))

    def display(self, *values: Any) -> None:
        for value in values:
            self.wire.send("display", data=mime_bundle(value))

    def run(self, code: str) -> None:
        import ast  # here: a bash context runs where the interpreter is a trimmed one

        saved = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = self.streams
        try:
            tree = ast.parse(code, "<cell>", "exec")
            last = tree.body[-1] if tree.body and isinstance(tree.body[-1], ast.Expr) else None
            if last is not None:
                tree.body.pop()
            exec(compile(tree, "<cell>", "exec"), self.namespace)
            value = None
            if last is not None:
                expression = ast.Expression(last.value)
                value = eval(compile(expression, "<cell>", "eval"), self.namespace)
            for figure in figures():
                self.wire.send("display", data=figure)
            if value is not None:
                self.namespace["_"] = value
                self.wire.send("result", data=mime_bundle(value))
        except BaseException as e:  # KeyboardInterrupt and SystemExit too: the cell ends
            self.wire.send(
                "error",
                name=type(e).__name__,
                value=str(e),
                traceback=_user_traceback(e),
            )
        finally:
            sys.stdout, sys.stderr = saved


def _user_traceback(error: BaseException) -> str:
    """The traceback from the cell's frames on (the kernel's own are left out)."""
    import traceback

    tb = error.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename != "<cell>":
        tb = tb.tb_next
    lines = traceback.format_exception(type(error), error, tb)
    return "".join(lines)


def _has(program: str) -> bool:
    path = os.environ.get("PATH", "/usr/bin:/bin")
    return any(os.access(os.path.join(d, program), os.X_OK) for d in path.split(":") if d)


class BashKernel:
    """A bash whose state (variables, functions, working directory) lasts across cells."""

    def __init__(self, wire: Wire) -> None:
        self.wire = wire
        self.token = os.urandom(8).hex()
        folder = f"/tmp/capsa-bash-{os.getpid()}-{os.urandom(6).hex()}"
        os.mkdir(folder, 0o700)
        self.cell_file = os.path.join(folder, "cell.sh")
        # SIGINT is trapped (not ignored): the running command gets it, bash lives on.
        self.bash = subprocess.Popen(
            ["bash", "--noprofile", "--norc"] if _has("bash") else ["sh"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,  # read here, for the end-of-cell mark
            start_new_session=True,  # stderr: descriptor 2, forwarded as it comes
        )
        assert self.bash.stdin is not None
        self.bash.stdin.write(b"trap 'echo interrupted >&2' INT\n")
        self.bash.stdin.flush()

    def interrupt(self) -> None:
        with contextlib.suppress(OSError):
            os.killpg(self.bash.pid, signal.SIGINT)

    def run(self, code: str) -> None:
        assert self.bash.stdin is not None and self.bash.stdout is not None
        done = f"{BASH_DONE}{self.token}"
        # Sourced from a file: a syntax error or an open quote stays inside the cell, and
        # the cell cannot read the commands that follow it.
        with open(self.cell_file, "w") as f:
            f.write(code + "\n")
        script = f". {self.cell_file} </dev/null\nprintf '\\n{done} %d\\n' $?\n"
        try:
            self.bash.stdin.write(script.encode())
            self.bash.stdin.flush()
        except OSError:
            self.wire.send("error", name="BashExited", value="bash has exited", traceback="")
            return
        held: str | None = None  # one line behind: the last one loses printf's newline
        while True:
            line = self.bash.stdout.readline()
            if not line:
                status = self.bash.wait()
                self.wire.send(
                    "error", name="BashExited", value=f"bash exited ({status})", traceback=""
                )
                return
            text = line.decode("utf-8", "replace")
            if text.startswith(done):
                if held:
                    self.wire.output("stdout", held[:-1])
                status = int(text.split()[1])
                self.wire.send("result", data={"text/plain": str(status)}, exit_code=status)
                return
            if held is not None:
                self.wire.output("stdout", held)
            held = text


def main() -> None:
    language = sys.argv[1] if len(sys.argv) > 1 else "python"
    wire = Wire(os.dup(1))
    requests = os.fdopen(os.dup(0), "rb")
    # Cells' own descriptors: nothing reads stdin; 1 and 2 go to the wire through pipes.
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    forwarders = [FdForwarder(wire, 1, "stdout"), FdForwarder(wire, 2, "stderr")]
    os.environ.setdefault("MPLBACKEND", "Agg")
    kernel: PythonKernel | BashKernel
    if language == "bash":
        bash = BashKernel(wire)
        kernel = bash
        signal.signal(signal.SIGINT, lambda *_: bash.interrupt())
    else:
        kernel = PythonKernel(wire)
    wire.send("ready", language=language, pid=os.getpid())
    lines = iter(requests.readline, b"")
    while True:
        try:
            line = next(lines)
        except StopIteration:
            return
        except KeyboardInterrupt:
            continue  # an interrupt between cells: nothing to stop
        try:
            request = json.loads(line)
            cell, code = int(request["id"]), str(request["code"])
        except (ValueError, KeyError, TypeError):
            continue
        wire.start_cell(cell)
        try:
            kernel.run(code)
        except KeyboardInterrupt:
            wire.send("error", name="KeyboardInterrupt", value="", traceback="")
        for forwarder in forwarders:
            forwarder.drain()
        wire.send("done", truncated=wire.truncated)


if __name__ == "__main__":
    main()
