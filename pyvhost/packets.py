"""Small helpers on Ethernet/IPv4 frames shared by the Python tools (the reflector's
responder, the frontend's pinger): the Internet checksum and protocol numbers. Pure
functions; the lowest layer, like pyvhost.protocol (it imports nothing of pyvhost)."""

from __future__ import annotations

import struct

ETH_P_IP = 0x0800
ETH_P_ARP = 0x0806


def inet_checksum(data: bytes) -> int:
    """RFC 1071: the one's-complement of the one's-complement sum of 16-bit words."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF
