"""Answers ARP requests and ICMP echo requests for one IPv4 address: pure functions on
Ethernet frames (bytes in, reply bytes or None out). Used by ``pyvhost reflector``'s reply
mode through the Python device API. No I/O here."""

from __future__ import annotations

import ipaddress
import struct

from pyvhost.packets import ETH_P_ARP, ETH_P_IP, inet_checksum

DEFAULT_MAC = bytes.fromhex("020000fe0001")


class Responder:
    """Replies for ``ip`` (dotted quad) from ``mac``; counts what it saw and answered."""

    def __init__(self, ip: str, mac: bytes = DEFAULT_MAC):
        self.ip = ipaddress.IPv4Address(ip).packed
        self.mac = mac
        self.arp_replies = 0
        self.icmp_replies = 0
        self.ignored = 0

    def reply(self, frame: bytes) -> bytes | None:
        if len(frame) >= 14:
            ethertype = struct.unpack_from("!H", frame, 12)[0]
            if ethertype == ETH_P_ARP:
                out = self._arp(frame)
            elif ethertype == ETH_P_IP:
                out = self._icmp(frame)
            else:
                out = None
            if out is not None:
                return out
        self.ignored += 1
        return None

    def _arp(self, frame: bytes) -> bytes | None:
        if len(frame) < 42:
            return None
        htype, ptype, hlen, plen, op = struct.unpack_from("!HHBBH", frame, 14)
        sha, spa, tpa = frame[22:28], frame[28:32], frame[38:42]
        if (htype, ptype, hlen, plen, op) != (1, ETH_P_IP, 6, 4, 1) or tpa != self.ip:
            return None
        self.arp_replies += 1
        arp = struct.pack("!HHBBH", 1, ETH_P_IP, 6, 4, 2) + self.mac + self.ip + sha + spa
        return sha + self.mac + struct.pack("!H", ETH_P_ARP) + arp

    def _icmp(self, frame: bytes) -> bytes | None:
        if len(frame) < 34:
            return None
        ihl = (frame[14] & 0x0F) * 4
        total_len = struct.unpack_from("!H", frame, 16)[0]
        if frame[14] >> 4 != 4 or ihl < 20 or frame[23] != 1 or frame[30:34] != self.ip:
            return None
        if total_len < ihl + 8 or 14 + total_len > len(frame):
            return None
        icmp = frame[14 + ihl: 14 + total_len]
        if icmp[0] != 8:      # echo request
            return None
        self.icmp_replies += 1
        body = b"\0\0\0\0" + icmp[4:]
        body = b"\0\0" + struct.pack("!H", inet_checksum(body)) + body[4:]
        ip = bytearray(frame[14: 14 + ihl])
        ip[8] = 64
        ip[12:16], ip[16:20] = frame[30:34], frame[26:30]
        ip[10:12] = b"\0\0"
        ip[10:12] = struct.pack("!H", inet_checksum(bytes(ip)))
        return frame[6:12] + self.mac + frame[12:14] + bytes(ip) + body
