"""ARP resolution and ICMP echo over a ``VirtioUser`` port: the slow, Python-level test a
``pyvhost gen --mode ping`` runs (a handful of frames, so no compiled path is needed).
Frames are built and parsed here; the port does the I/O. No sockets of its own."""

from __future__ import annotations

import ipaddress
import os
import statistics
import struct
import time

from pyvhost.packets import ETH_P_ARP, ETH_P_IP, inet_checksum

from .port import VirtioUser

BROADCAST = b"\xff" * 6


class Unreachable(RuntimeError):
    """The target did not answer ARP."""


def arp_request(mac: bytes, ip: bytes, target: bytes) -> bytes:
    arp = struct.pack("!HHBBH", 1, ETH_P_IP, 6, 4, 1) + mac + ip + bytes(6) + target
    return BROADCAST + mac + struct.pack("!H", ETH_P_ARP) + arp + bytes(18)


def parse_arp_reply(frame: bytes, ip: bytes, target: bytes) -> bytes | None:
    """The sender MAC of an ARP reply from ``target`` to ``ip``, else None."""
    if len(frame) < 42 or struct.unpack_from("!H", frame, 12)[0] != ETH_P_ARP:
        return None
    if struct.unpack_from("!H", frame, 20)[0] != 2:
        return None
    if frame[28:32] != target or frame[38:42] != ip:
        return None
    return frame[22:28]


def echo_request(mac: bytes, dst_mac: bytes, ip: bytes, target: bytes, ident: int,
                 seq: int) -> bytes:
    payload = struct.pack("!d", time.monotonic()) + bytes(48)
    icmp = struct.pack("!BBHHH", 8, 0, 0, ident, seq) + payload
    icmp = icmp[:2] + struct.pack("!H", inet_checksum(icmp)) + icmp[4:]
    iph = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), seq, 0, 64, 1, 0, ip, target)
    iph = iph[:10] + struct.pack("!H", inet_checksum(iph)) + iph[12:]
    return dst_mac + mac + struct.pack("!H", ETH_P_IP) + iph + icmp


def parse_echo_reply(frame: bytes, ip: bytes, target: bytes, ident: int) -> int | None:
    """The sequence number of an echo reply from ``target`` for ``ident``, else None."""
    if len(frame) < 42 or struct.unpack_from("!H", frame, 12)[0] != ETH_P_IP:
        return None
    ihl = (frame[14] & 0x0F) * 4
    if frame[23] != 1 or frame[26:30] != target or frame[30:34] != ip:
        return None
    icmp = frame[14 + ihl:]
    if len(icmp) < 8 or icmp[0] != 0 or inet_checksum(icmp) != 0:
        return None
    rid, seq = struct.unpack_from("!HH", icmp, 4)
    return seq if rid == ident else None


class Pinger:
    def __init__(self, port: VirtioUser, mac: bytes, ip: str, target: str):
        self.port = port
        self.mac = mac
        self.ip = ipaddress.IPv4Address(ip).packed
        self.target = ipaddress.IPv4Address(target).packed
        self.ident = os.getpid() & 0xFFFF

    def resolve(self, timeout: float, tries: int = 3) -> bytes:
        for _ in range(tries):
            self.port.send_all([arp_request(self.mac, self.ip, self.target)])
            deadline = time.monotonic() + timeout / tries
            while (left := deadline - time.monotonic()) > 0:
                for frame in self.port.recv(timeout=left):
                    mac = parse_arp_reply(frame, self.ip, self.target)
                    if mac is not None:
                        return mac
        raise Unreachable(f"no ARP reply from {ipaddress.IPv4Address(self.target)}")

    def run(self, count: int, interval: float, timeout: float) -> dict:
        """ARP, then ``count`` echo requests ``interval`` s apart; waits up to 1 s for the
        last replies. Returns the gen summary fields (latency = round-trip time)."""
        dst = self.resolve(timeout)
        sent_at: dict[int, float] = {}
        rtts: list[float] = []
        reordered = last_seq = 0
        start = time.monotonic()
        for seq in range(1, count + 1):
            sent_at[seq] = time.monotonic()
            self.port.send_all([echo_request(self.mac, dst, self.ip, self.target, self.ident,
                                             seq)])
            wait_until = sent_at[seq] + (interval if seq < count else 1.0)
            while (left := wait_until - time.monotonic()) > 0 and len(rtts) < count:
                for frame in self.port.recv(timeout=left):
                    got = parse_echo_reply(frame, self.ip, self.target, self.ident)
                    if got in sent_at:
                        rtts.append(time.monotonic() - sent_at.pop(got))
                        reordered += got < last_seq
                        last_seq = max(last_seq, got)
        elapsed = time.monotonic() - start
        us = sorted(r * 1e6 for r in rtts)
        lat = {"p50": None, "p99": None, "max": None, "mean": None}
        if us:
            lat = {"p50": round(us[len(us) // 2]), "p99": round(us[min(len(us) - 1,
                   int(len(us) * 0.99))]), "max": round(us[-1]),
                   "mean": round(statistics.fmean(us), 1)}
        return {"sent": count, "received": len(rtts), "lost": count - len(rtts),
                "reordered": reordered, "tx_pps": round(count / elapsed, 1),
                "rx_pps": round(len(rtts) / elapsed, 1), "latency_us": lat,
                "target_mac": dst.hex(":")}
