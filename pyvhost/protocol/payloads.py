"""Payload types of vhost-user messages: pack, unpack and per-field validation.

Each payload is a small frozen dataclass with ``unpack(bytes)`` (which checks the size) and
``pack()``; ``validate()`` checks the values a handler may rely on. Nothing here does I/O.
All integers are host-native byte order, as the protocol defines (little-endian on x86).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import ClassVar

from . import constants as C


class PayloadError(ValueError):
    """A payload has the wrong size or a field value that no handler may accept."""


def _check_size(name: str, data: bytes, size: int) -> None:
    if len(data) != size:
        raise PayloadError(f"{name} payload is {len(data)} bytes, expected {size}")


class _Fixed:
    """Mixin for payloads that are one fixed-size struct."""

    FMT: ClassVar[struct.Struct]

    @classmethod
    def unpack(cls, data: bytes):
        _check_size(cls.__name__, data, cls.FMT.size)
        return cls(*cls.FMT.unpack(data))

    def pack(self) -> bytes:
        return self.FMT.pack(*self.__dict__.values())

    def validate(self) -> None:
        """Field checks; the base accepts everything the struct can hold."""


@dataclass(frozen=True)
class U64(_Fixed):
    FMT: ClassVar = struct.Struct("=Q")
    value: int


@dataclass(frozen=True)
class VringState(_Fixed):
    """u32 index, u32 num: SET_VRING_NUM/BASE, GET_VRING_BASE, SET_VRING_ENABLE."""

    FMT: ClassVar = struct.Struct("=II")
    index: int
    num: int

    def validate(self) -> None:
        if self.index >= C.MAX_RINGS:
            raise PayloadError(f"vring index {self.index} out of range")


@dataclass(frozen=True)
class VringFd(_Fixed):
    """u64 with the ring index in bits 0-7 and the no-fd flag in bit 8."""

    FMT: ClassVar = struct.Struct("=Q")
    value: int

    @property
    def index(self) -> int:
        return self.value & C.VRING_IDX_MASK

    @property
    def nofd(self) -> bool:
        return bool(self.value & C.VRING_NOFD_MASK)

    def validate(self) -> None:
        if self.value & ~(C.VRING_IDX_MASK | C.VRING_NOFD_MASK):
            raise PayloadError(f"vring fd payload {self.value:#x} has reserved bits set")


@dataclass(frozen=True)
class VringAddr(_Fixed):
    """u32 index, u32 flags, u64 desc, u64 used, u64 avail, u64 log (the C struct order)."""

    FMT: ClassVar = struct.Struct("=IIQQQQ")
    index: int
    flags: int
    desc: int
    used: int
    avail: int
    log: int

    def validate(self) -> None:
        if self.index >= C.MAX_RINGS:
            raise PayloadError(f"vring index {self.index} out of range")
        if self.flags & ~C.VRING_F_LOG:
            raise PayloadError(f"vring address flags {self.flags:#x} unknown")


@dataclass(frozen=True)
class MemRegion(_Fixed):
    FMT: ClassVar = struct.Struct("=QQQQ")
    guest_phys_addr: int
    size: int
    userspace_addr: int
    mmap_offset: int

    def validate(self) -> None:
        if self.size == 0:
            raise PayloadError("memory region of size 0")
        for name, start in (("guest", self.guest_phys_addr), ("user", self.userspace_addr),
                            ("mmap offset", self.mmap_offset)):
            if start + self.size > 1 << 64:
                raise PayloadError(f"memory region {name} range overflows 2^64")


@dataclass(frozen=True)
class MemTable:
    """SET_MEM_TABLE: u32 nregions, u32 padding, then a fixed array of 8 regions."""

    HEAD: ClassVar = struct.Struct("=II")
    SIZE: ClassVar = HEAD.size + C.MAX_MEM_TABLE_REGIONS * MemRegion.FMT.size
    regions: tuple[MemRegion, ...]

    @classmethod
    def unpack(cls, data: bytes) -> MemTable:
        # QEMU sends only the regions in use; the fixed-size array is the upper bound.
        if len(data) < cls.HEAD.size:
            raise PayloadError(f"memory table payload is {len(data)} bytes")
        nregions, _ = cls.HEAD.unpack_from(data)
        if not 1 <= nregions <= C.MAX_MEM_TABLE_REGIONS:
            raise PayloadError(f"memory table has {nregions} regions (1..8 allowed)")
        need = cls.HEAD.size + nregions * MemRegion.FMT.size
        if len(data) < need or len(data) > cls.SIZE:
            raise PayloadError(f"memory table payload is {len(data)} bytes for {nregions} regions")
        size = MemRegion.FMT.size
        regions = tuple(
            MemRegion.unpack(data[cls.HEAD.size + i * size: cls.HEAD.size + (i + 1) * size])
            for i in range(nregions)
        )
        return cls(regions)

    def pack(self) -> bytes:
        body = b"".join(r.pack() for r in self.regions)
        return self.HEAD.pack(len(self.regions), 0) + body

    def validate(self) -> None:
        for r in self.regions:
            r.validate()


@dataclass(frozen=True)
class SingleMemRegion:
    """ADD_MEM_REG / REM_MEM_REG: u64 padding, then one region."""

    SIZE: ClassVar = 8 + MemRegion.FMT.size
    region: MemRegion

    @classmethod
    def unpack(cls, data: bytes) -> SingleMemRegion:
        _check_size(cls.__name__, data, cls.SIZE)
        return cls(MemRegion.unpack(data[8:]))

    def pack(self) -> bytes:
        return bytes(8) + self.region.pack()

    def validate(self) -> None:
        self.region.validate()


@dataclass(frozen=True)
class LogBase(_Fixed):
    FMT: ClassVar = struct.Struct("=QQ")
    mmap_size: int
    mmap_offset: int

    def validate(self) -> None:
        # CVE-2020-10722: offset + size must not wrap (a smaller map than the bitmap)
        if self.mmap_size == 0:
            raise PayloadError("dirty log of size 0")
        if self.mmap_offset + self.mmap_size > 1 << 64:
            raise PayloadError(f"dirty log offset {self.mmap_offset:#x} + size "
                               f"{self.mmap_size:#x} overflows 2^64")


@dataclass(frozen=True)
class IotlbMsg(_Fixed):
    """u64 iova, u64 size, u64 uaddr, u8 perm, u8 type, padded to the C sizeof of 32."""

    FMT: ClassVar = struct.Struct("=QQQBB6x")
    iova: int
    size: int
    uaddr: int
    perm: int
    type: int


@dataclass(frozen=True)
class Config:
    """u32 offset, u32 size, u32 flags, then ``size`` bytes of config space."""

    HEAD: ClassVar = struct.Struct("=III")
    offset: int
    size: int
    flags: int
    data: bytes

    @classmethod
    def unpack(cls, data: bytes) -> Config:
        if len(data) < cls.HEAD.size:
            raise PayloadError(f"config payload is {len(data)} bytes")
        offset, size, flags = cls.HEAD.unpack_from(data)
        if size > C.MAX_CONFIG_SIZE or len(data) != cls.HEAD.size + size:
            raise PayloadError(f"config payload of {len(data)} bytes claims {size} bytes of data")
        return cls(offset, size, flags, bytes(data[cls.HEAD.size:]))

    def pack(self) -> bytes:
        return self.HEAD.pack(self.offset, self.size, self.flags) + self.data

    def validate(self) -> None:
        if self.offset + self.size > C.MAX_CONFIG_SIZE:
            raise PayloadError("config access past the end of config space")


@dataclass(frozen=True)
class Inflight(_Fixed):
    FMT: ClassVar = struct.Struct("=QQHH4x")
    mmap_size: int
    mmap_offset: int
    num_queues: int
    queue_size: int


@dataclass(frozen=True)
class DeviceStateParams(_Fixed):
    FMT: ClassVar = struct.Struct("=II")
    direction: int
    phase: int


@dataclass(frozen=True)
class Empty:
    """No payload. Some front-ends send 8 zero bytes with bodiless requests; both are taken."""

    @classmethod
    def unpack(cls, data: bytes) -> Empty:
        if len(data) not in (0, 8):
            raise PayloadError(f"request without payload carries {len(data)} bytes")
        return cls()

    def pack(self) -> bytes:
        return b""

    def validate(self) -> None:
        pass
