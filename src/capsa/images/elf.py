"""Just enough ELF reading for kernel modules: one section's bytes, every offset checked.

Module metadata lives in the ``.modinfo`` section as NUL-separated ``key=value`` strings;
reading it here spares the host ``modinfo`` (kmod), which is not on a user's PATH on Debian.
"""

from __future__ import annotations

import struct

from capsa.errors import ImageBuildError

_ELFCLASS64, _ELFDATA2LSB = 2, 1
_HEADER = struct.Struct("<16xHHIQQQIHHHHHH")  # e_type .. e_shstrndx of an ELF64 header
_SECTION = struct.Struct("<IIQQQQIIQQ")  # an ELF64 section header


def section(data: bytes, name: str) -> bytes | None:
    """The contents of section ``name`` of a 64-bit little-endian ELF file (None: absent)."""
    if data[:4] != b"\x7fELF" or len(data) < 64:
        raise ImageBuildError("not an ELF file")
    if data[4] != _ELFCLASS64 or data[5] != _ELFDATA2LSB:
        raise ImageBuildError("not a 64-bit little-endian ELF file")
    fields = _HEADER.unpack_from(data)
    shoff, shentsize, shnum, shstrndx = fields[5], fields[10], fields[11], fields[12]
    if shentsize < _SECTION.size or shstrndx >= shnum:
        raise ImageBuildError("malformed ELF section table")
    headers = [_section_header(data, shoff + i * shentsize) for i in range(shnum)]
    names = _contents(data, headers[shstrndx])
    for header in headers:
        start = header[0]
        end = names.find(b"\0", start)
        if 0 <= start < len(names) and names[start:end].decode(errors="replace") == name:
            return _contents(data, header)
    return None


def _section_header(data: bytes, offset: int) -> tuple[int, ...]:
    if offset < 0 or offset + _SECTION.size > len(data):
        raise ImageBuildError("ELF section header outside the file")
    return _SECTION.unpack_from(data, offset)


def _contents(data: bytes, header: tuple[int, ...]) -> bytes:
    offset, size = header[4], header[5]
    if offset + size > len(data):
        raise ImageBuildError("ELF section outside the file")
    return data[offset : offset + size]


def modinfo(data: bytes) -> dict[str, list[str]]:
    """A kernel module's ``.modinfo`` entries (a key may repeat, e.g. ``alias``)."""
    info: dict[str, list[str]] = {}
    raw = section(data, ".modinfo") or b""
    for entry in raw.split(b"\0"):
        key, sep, value = entry.decode(errors="replace").partition("=")
        if sep:
            info.setdefault(key, []).append(value)
    return info
