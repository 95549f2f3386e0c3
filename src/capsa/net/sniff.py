"""The name a client asks for in its first bytes: TLS SNI or the HTTP Host header.

Used on connections admitted by a domain rule, so a guest cannot reach a pinned address
while presenting a different name (a shared CDN address, domain fronting). Only two shapes
of first bytes carry a name we trust: a TLS ClientHello in one record with one SNI host
name, and a well-formed HTTP/1.x request head (a known method, an origin-form target, or
an absolute-form / CONNECT target naming the same host as its one Host header). Anything
else names nothing, and the gateway refuses it unless the rule opted into opaque traffic.
Every length read from the guest is checked against what was received.
"""

from __future__ import annotations

import enum
import re
import struct
from dataclasses import dataclass

HTTP_METHODS = frozenset(
    (b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH", b"TRACE", b"CONNECT")
)
LONGEST_METHOD = max(map(len, HTTP_METHODS))
HTTP_VERSIONS = (b"HTTP/1.0", b"HTTP/1.1")
MAX_HEAD = 16 * 1024
MAX_TLS_RECORD = 1 << 14
INSPECT_LIMIT = 5 + MAX_TLS_RECORD  # one TLS record, or an HTTP request head
# How long a domain-admitted client may stay silent before it is refused: generous for a
# slow guest's first flight, short enough that a held connection costs little.
INSPECT_WAIT = 5.0

_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_HOST = re.compile(rb"([A-Za-z0-9-]{1,63}(?:\.[A-Za-z0-9-]{1,63})*)\.?(?::[0-9]{1,5})?")
_NAME = re.compile(r"[a-z0-9-]{1,63}(?:\.[a-z0-9-]{1,63})*")
# Control bytes (but tab) and DEL in a head; CR and LF are checked as line ends separately.
_CONTROL = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_ABSOLUTE = re.compile(rb"(?i)https?://([^/?#]*)")


class Kind(enum.Enum):
    INCOMPLETE = "incomplete"  # need more bytes to tell
    TLS = "tls"
    HTTP = "http"
    OPAQUE = "opaque"  # neither a ClientHello nor an HTTP/1.x request: no name to check


@dataclass(frozen=True)
class Sniffed:
    kind: Kind
    name: str | None = None
    need: int = 0
    """INCOMPLETE: how many bytes in all before looking again is worth it (0: unknown)."""


def sniff(data: bytes) -> Sniffed:
    if not data:
        return Sniffed(Kind.INCOMPLETE, need=1)
    if data[0] == 0x16:
        return _tls(data)
    space = data.find(b" ", 0, LONGEST_METHOD + 1)
    if space < 0:
        start = data[: LONGEST_METHOD + 1]
        maybe = len(start) <= LONGEST_METHOD and any(m.startswith(start) for m in HTTP_METHODS)
        return Sniffed(Kind.INCOMPLETE) if maybe else Sniffed(Kind.OPAQUE)
    if data[:space] not in HTTP_METHODS:
        return Sniffed(Kind.OPAQUE)
    return _http(data)


class Inspector:
    """One connection's first bytes, fed as they arrive, until they name a host or cannot.

    Each byte is copied once (up to ``limit``), and the head is parsed again only when it
    may have become complete: a TLS record's announced length reached, or the blank line
    ending an HTTP head seen in the new bytes."""

    def __init__(self, limit: int = INSPECT_LIMIT) -> None:
        self.head = bytearray()
        self.limit = limit
        self._need = 1
        self._scanned = 0
        self._http = False  # a method prefix was seen: wait for the end of the head

    def feed(self, data: bytes) -> Sniffed:
        self.head += data[: self.limit - len(self.head)]
        full = len(self.head) >= self.limit
        if not full and (len(self.head) < self._need or self._head_unfinished()):
            return Sniffed(Kind.INCOMPLETE)
        found = sniff(bytes(self.head))
        if found.kind is not Kind.INCOMPLETE:
            return found
        if full:
            return Sniffed(Kind.OPAQUE)  # no complete head within the limit
        self._http = self.head[0] != 0x16
        self._need = max(found.need, len(self.head) + 1)
        return found

    def _head_unfinished(self) -> bool:
        if not self._http:
            return False
        start, self._scanned = max(0, self._scanned - 3), len(self.head)
        return self.head.find(b"\r\n\r\n", start) < 0


def _http(data: bytes) -> Sniffed:
    end = data.find(b"\r\n\r\n")
    if end < 0:
        if len(data) >= MAX_HEAD:
            return Sniffed(Kind.HTTP, None)
        return Sniffed(Kind.INCOMPLETE, need=len(data) + 1)
    return Sniffed(Kind.HTTP, _request_host(data[:end]))


def _request_host(head: bytes) -> str | None:
    """The host a request head names, or None when it is malformed or ambiguous."""
    if _CONTROL.search(head):
        return None
    lines = head.split(b"\r\n")
    if any(b"\r" in line or b"\n" in line for line in lines):
        return None  # a bare CR or LF: servers disagree on where lines end
    accepted, target_host = _request_target(lines[0])
    if not accepted:
        return None
    hosts = _host_headers(lines[1:])
    if hosts is None or len(hosts) != 1:
        return None  # none, an ambiguous pair, or a header line we cannot read
    host = _authority(hosts[0])
    if host is None or (target_host is not None and target_host != host):
        return None
    return host


def _request_target(request_line: bytes) -> tuple[bool, str | None]:
    """Whether the request line is one we accept, and the host its target names: an
    absolute-form or CONNECT target names one, an origin-form (or ``*``) target none."""
    parts = request_line.split(b" ")
    if len(parts) != 3 or parts[0] not in HTTP_METHODS or parts[2] not in HTTP_VERSIONS:
        return False, None
    method, target, _ = parts
    if target.startswith(b"/") or (method == b"OPTIONS" and target == b"*"):
        return method != b"CONNECT", None
    absolute = _ABSOLUTE.match(target)
    authority = target if method == b"CONNECT" else absolute.group(1) if absolute else None
    host = _authority(authority) if authority is not None else None
    return host is not None, host


def _host_headers(lines: list[bytes]) -> list[bytes] | None:
    hosts = []
    for line in lines:
        if not line or line[:1] in (b" ", b"\t"):
            return None  # obsolete line folding, or an empty line inside the head
        name, sep, value = line.partition(b":")
        if not sep or not _TOKEN.fullmatch(name):
            return None  # "Host : x" and the like: whitespace before the colon
        if name.lower() == b"host":
            hosts.append(value.strip(b" \t"))
    return hosts


def _authority(value: bytes) -> str | None:
    """``host[:port]`` as a lower-case host name; None for anything else (userinfo, IPv6
    literals, odd characters)."""
    match = _HOST.fullmatch(value)
    return match.group(1).decode("ascii").lower() if match else None


def _tls(data: bytes) -> Sniffed:
    if len(data) < 5:
        return Sniffed(Kind.INCOMPLETE, need=5)
    _type, version, length = struct.unpack_from("!BHH", data)
    if version >> 8 != 3 or not 0 < length <= MAX_TLS_RECORD:
        return Sniffed(Kind.TLS, None)
    if len(data) < 5 + length:
        return Sniffed(Kind.INCOMPLETE, need=5 + length)
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
    (ext_total,) = struct.unpack_from("!H", hello, pos)
    pos += 2
    end = pos + ext_total
    if end != len(hello):
        raise ValueError("the extensions do not fill the ClientHello")
    names = []
    while pos < end:
        ext_type, ext_len = struct.unpack_from("!HH", hello, pos)
        pos += 4
        if pos + ext_len > end:
            raise ValueError("extension overruns the list")
        if ext_type == 0:
            names.append(_server_name(hello[pos : pos + ext_len]))
        pos += ext_len
    return names[0] if len(names) == 1 else None  # two SNI extensions: ambiguous


def _server_name(ext: bytes) -> str | None:
    (list_len,) = struct.unpack_from("!H", ext)
    if 2 + list_len != len(ext):
        raise ValueError("server name list length does not match the extension")
    pos, names = 2, []
    while pos < len(ext):
        name_type, name_len = struct.unpack_from("!BH", ext, pos)
        pos += 3
        if pos + name_len > len(ext):
            raise ValueError("server name overruns the extension")
        if name_type == 0:
            names.append(ext[pos : pos + name_len])
        pos += name_len
    if len(names) != 1:
        return None
    name = names[0].decode("ascii", "replace").lower()
    return name if _NAME.fullmatch(name) else None
