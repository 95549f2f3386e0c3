"""The name a client asks for in its first bytes: TLS SNI or the HTTP Host header.

Used on connections admitted by a domain rule, so a guest cannot reach a pinned address
while presenting a different name (a shared CDN address, domain fronting). Every length
read from the guest is checked against what was received.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

HTTP_METHODS = (
    b"GET ",
    b"POST ",
    b"PUT ",
    b"HEAD ",
    b"DELETE ",
    b"OPTIONS ",
    b"PATCH ",
    b"CONNECT ",
    b"TRACE ",
)
MAX_HEAD = 16 * 1024


class Kind(enum.Enum):
    INCOMPLETE = "incomplete"  # need more bytes to tell
    TLS = "tls"
    HTTP = "http"
    OPAQUE = "opaque"  # some other protocol: no name to check


@dataclass(frozen=True)
class Sniffed:
    kind: Kind
    name: str | None = None


def sniff(data: bytes) -> Sniffed:
    if not data:
        return Sniffed(Kind.INCOMPLETE)
    if data[0] == 0x16:
        return _tls(data)
    if any(m.startswith(data[: len(m)]) for m in HTTP_METHODS):
        return _http(data)
    return Sniffed(Kind.OPAQUE)


def _http(data: bytes) -> Sniffed:
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return Sniffed(Kind.HTTP, None) if len(data) >= MAX_HEAD else Sniffed(Kind.INCOMPLETE)
    names = []
    for line in data[:end].split(b"\r\n")[1:]:
        field, sep, value = line.partition(b":")
        if sep and field.strip().lower() == b"host":
            names.append(value.strip())
    if len(names) != 1:
        return Sniffed(Kind.HTTP, None)  # none, or an ambiguous pair: no name
    return Sniffed(Kind.HTTP, _hostname(names[0].decode("ascii", "replace")))


def _hostname(value: str) -> str | None:
    host = value.rsplit(":", 1)[0] if value.count(":") == 1 else value
    host = host.rstrip(".").lower()
    if not host or any(c in host for c in "/@[] \t"):
        return None
    return host


def _tls(data: bytes) -> Sniffed:
    if len(data) < 5:
        return Sniffed(Kind.INCOMPLETE)
    _type, _version, length = struct.unpack_from("!BHH", data)
    if len(data) < 5 + length:
        return Sniffed(Kind.INCOMPLETE)
    try:
        return Sniffed(Kind.TLS, _client_hello_sni(data[5 : 5 + length]))
    except (struct.error, ValueError, IndexError):
        return Sniffed(Kind.TLS, None)


def _client_hello_sni(body: bytes) -> str | None:
    if body[0] != 1:  # handshake type ClientHello
        return None
    (hello_len,) = struct.unpack("!I", b"\0" + body[1:4])
    hello = body[4 : 4 + hello_len]
    if len(hello) != hello_len:
        return None  # a ClientHello spread over several records: not inspected
    pos = 2 + 32  # version, random
    pos += 1 + hello[pos]  # session id
    (suites,) = struct.unpack_from("!H", hello, pos)
    pos += 2 + suites
    pos += 1 + hello[pos]  # compression methods
    if pos + 2 > len(hello):
        return None
    (ext_total,) = struct.unpack_from("!H", hello, pos)
    pos += 2
    end = pos + ext_total
    if end > len(hello):
        raise ValueError("extensions overrun the ClientHello")
    while pos + 4 <= end:
        ext_type, ext_len = struct.unpack_from("!HH", hello, pos)
        pos += 4
        if pos + ext_len > end:
            raise ValueError("extension overruns the list")
        if ext_type == 0:
            return _server_name(hello[pos : pos + ext_len])
        pos += ext_len
    return None


def _server_name(ext: bytes) -> str | None:
    (list_len,) = struct.unpack_from("!H", ext)
    pos, end = 2, min(2 + list_len, len(ext))
    while pos + 3 <= end:
        name_type, name_len = struct.unpack_from("!BH", ext, pos)
        pos += 3
        if pos + name_len > end:
            raise ValueError("server name overruns the extension")
        if name_type == 0:
            return _hostname(ext[pos : pos + name_len].decode("ascii", "replace"))
        pos += name_len
    return None
