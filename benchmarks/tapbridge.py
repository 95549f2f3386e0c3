"""Stand-in guest NIC for the network benchmark: a tap device wired to a stack's socket.

    ip netns exec NS python benchmarks/tapbridge.py SOCKET IFNAME

Creates tap IFNAME in the current network namespace, connects to SOCKET (our switch port
or passt's socket: both speak QEMU's ``-netdev stream`` framing, a 4-byte big-endian
length before each Ethernet frame), prints ``ready`` and copies frames both ways until
either side closes. Two blocking threads: the copies run outside the GIL.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import struct
import sys
import threading

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
MAX_FRAME = 65536 + 14


def open_tap(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI))
    return fd


def tap_to_socket(tap: int, sock: socket.socket) -> None:
    while frame := os.read(tap, MAX_FRAME):
        sock.sendall(struct.pack("!I", len(frame)) + frame)


def read_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return bytes(buf)


def socket_to_tap(sock: socket.socket, tap: int) -> None:
    while True:
        (length,) = struct.unpack("!I", read_exact(sock, 4))
        if length > MAX_FRAME:
            raise ValueError(f"frame of {length} bytes")
        os.write(tap, read_exact(sock, length))


def main() -> None:
    path, name = sys.argv[1], sys.argv[2]
    tap = open_tap(name)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    print("ready", flush=True)
    threading.Thread(target=tap_to_socket, args=(tap, sock), daemon=True).start()
    with contextlib.suppress(EOFError, OSError):
        socket_to_tap(sock, tap)


if __name__ == "__main__":
    main()
