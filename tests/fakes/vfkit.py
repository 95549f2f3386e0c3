#!/usr/bin/env python3
"""A stand-in for vfkit that speaks its documented REST API on the Unix socket given by
``--restful-uri unix://PATH`` and gives each ``virtio-serial,pty`` device a real PTY. It
prints a boot line on the console PTY, echoes what it receives there, and exits 0 when
asked to stop (POST /vm/state {"state": "Stop"}). Used by the vfkit contract tests."""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import tty

args = sys.argv[1:]
rest = next(a for i, a in enumerate(args) if i and args[i - 1] == "--restful-uri")
path = rest.removeprefix("unix://")
devices = [a for i, a in enumerate(args) if i and args[i - 1] == "--device"]
with open(os.environ.get("FAKE_VFKIT_ARGV", "/dev/null"), "w") as f:
    json.dump(args, f)
ptys = []
for d in devices:
    if d.startswith("virtio-serial,pty"):
        master, slave = os.openpty()
        # Raw like a device: a line discipline that echoed would feed the echo thread's
        # own output back to it, a loop that floods the console.
        tty.setraw(slave)
        ptys.append((master, os.ttyname(slave), slave))
os.write(ptys[0][0], b"FAKE-VFKIT-BOOTED\r\n")


def echo(master: int) -> None:
    while True:
        try:
            data = os.read(master, 1024)
        except OSError:
            return
        os.write(master, b"echo:" + data)


threading.Thread(target=echo, args=(ptys[0][0],), daemon=True).start()
state = "VirtualMachineStateRunning"
srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
srv.bind(path)
srv.listen(8)
while True:
    conn, _ = srv.accept()
    request = b""
    while b"\r\n\r\n" not in request:
        request += conn.recv(4096)
    head, _, body = request.partition(b"\r\n\r\n")
    length = next(
        (
            int(h.split(b":")[1])
            for h in head.split(b"\r\n")
            if h.lower().startswith(b"content-length")
        ),
        0,
    )
    while len(body) < length:
        body += conn.recv(4096)
    method, target = head.split(b" ")[:2]
    stop = False
    if method == b"GET" and target == b"/vm/state":
        reply = {"state": state, "canStop": True, "canHardStop": True}
    elif method == b"GET" and target == b"/vm/inspect":
        reply = {
            "cpus": 1,
            "memory": 256,
            "devices": [{"kind": "virtioserial", "ptyName": name} for _, name, _ in ptys],
        }
    elif method == b"POST" and target == b"/vm/state":
        wanted = json.loads(body)["state"]
        stop = wanted in ("Stop", "HardStop")
        reply = None
    else:
        conn.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        conn.close()
        continue
    data = json.dumps(reply).encode() if reply is not None else b""
    conn.sendall(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
        + str(len(data)).encode()
        + b"\r\nConnection: close\r\n\r\n"
        + data
    )
    conn.close()
    if stop:
        srv.close()
        os.unlink(path)
        sys.exit(0)
