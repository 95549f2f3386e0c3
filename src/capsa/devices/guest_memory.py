"""Guest RAM as the back end sees it: mmap'd regions with bounds-checked access.

Every address that comes from the guest (descriptor buffers) or from QEMU (ring
addresses) goes through :meth:`GuestMemory.view`, which refuses anything that is not
entirely inside one region. Nothing else touches the mappings.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
from dataclasses import dataclass, field


class DeviceError(Exception):
    """The guest or the VMM broke the device contract; the device stops, the host is safe."""


MAX_REGIONS = 8


@dataclass
class Region:
    guest_phys: int
    size: int
    user_addr: int
    mapping: mmap.mmap
    offset: int  # where the region starts inside the mapping
    # One view of the whole mapping, sliced for every access (cheaper than a new export).
    whole: memoryview = field(init=False)

    def __post_init__(self) -> None:
        self.whole = memoryview(self.mapping)


class GuestMemory:
    def __init__(self) -> None:
        self.regions: list[Region] = []

    def add_region(
        self, fd: int, guest_phys: int, size: int, user_addr: int, mmap_offset: int
    ) -> None:
        if len(self.regions) >= MAX_REGIONS:
            raise DeviceError("too many memory regions")
        if size <= 0 or guest_phys < 0 or user_addr < 0 or mmap_offset < 0:
            raise DeviceError("bad memory region")
        if guest_phys + size > 1 << 64 or user_addr + size > 1 << 64:
            raise DeviceError("memory region wraps around")
        # mmap offsets must be page aligned: map from the aligned start and remember the rest.
        page = mmap.ALLOCATIONGRANULARITY
        aligned = mmap_offset - mmap_offset % page
        mapping = mmap.mmap(
            fd,
            size + (mmap_offset - aligned),
            mmap.MAP_SHARED,
            mmap.PROT_READ | mmap.PROT_WRITE,
            offset=aligned,
        )
        self.regions.append(Region(guest_phys, size, user_addr, mapping, mmap_offset - aligned))

    def close(self) -> None:
        for r in self.regions:
            r.whole.release()
            # A view still held elsewhere keeps the mapping alive until it is dropped.
            with contextlib.suppress(BufferError):
                r.mapping.close()
        self.regions.clear()

    def _find(self, addr: int, length: int, user: bool) -> tuple[Region, int]:
        if length >= 0 and addr >= 0:
            for r in self.regions:
                rel = addr - (r.user_addr if user else r.guest_phys)
                if rel >= 0 and rel + length <= r.size:
                    return r, r.offset + rel
        kind = "user" if user else "guest-physical"
        raise DeviceError(f"{kind} range {addr:#x}+{length:#x} is outside guest memory")

    def view(self, addr: int, length: int, user: bool = False) -> memoryview:
        """A writable view of ``length`` bytes at ``addr``; never crosses a region boundary."""
        r, off = self._find(addr, length, user)
        return r.whole[off : off + length]

    def unpack(self, fmt: struct.Struct, addr: int, user: bool = False) -> tuple[int, ...]:
        """``fmt`` read at ``addr``, bounds-checked like :meth:`view`, without a new view."""
        r, off = self._find(addr, fmt.size, user)
        return fmt.unpack_from(r.whole, off)

    def read(self, addr: int, length: int) -> bytes:
        return bytes(self.view(addr, length))

    def write(self, addr: int, data: bytes) -> None:
        self.view(addr, len(data))[:] = data


LOG_PAGE = 0x1000


class DirtyLog:
    """QEMU's dirty bitmap (SET_LOG_BASE): one bit per 4 KiB guest-physical page we wrote,
    so that pages changed behind QEMU's back during a migration are sent again."""

    def __init__(self, fd: int, size: int, offset: int) -> None:
        page = mmap.ALLOCATIONGRANULARITY
        aligned = offset - offset % page
        self._map = mmap.mmap(
            fd,
            size + offset - aligned,
            flags=mmap.MAP_SHARED,
            prot=mmap.PROT_READ | mmap.PROT_WRITE,
            offset=aligned,
        )
        self._start = offset - aligned
        self.size = size

    def mark(self, addr: int, length: int) -> None:
        if length <= 0:
            return
        for page in range(addr // LOG_PAGE, (addr + length - 1) // LOG_PAGE + 1):
            byte = page >> 3
            if byte < self.size:  # beyond the log: QEMU did not ask for that range
                self._map[self._start + byte] |= 1 << (page & 7)

    def close(self) -> None:
        self._map.close()


def memfd_memory(size: int) -> tuple[GuestMemory, int]:
    """A standalone guest memory (for tests): one memfd region at guest-physical 0."""
    fd = os.memfd_create("capsa-test-mem")
    os.ftruncate(fd, size)
    mem = GuestMemory()
    mem.add_region(fd, 0, size, 0x7F00_0000_0000, 0)
    return mem, fd
