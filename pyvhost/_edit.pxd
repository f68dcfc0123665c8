# Header edits of a frame in place, as OpenFlow's set-field and dec_nw_ttl actions make them:
# Ethernet addresses, the VLAN priority, IPv4 addresses, DSCP and TTL, TCP/UDP ports, with
# the IPv4 header checksum and the L4 checksum updated incrementally (RFC 1624; a partial
# checksum the guest left to the device, virtio-net NEEDS_CSUM, kept partial). No rules,
# no keys, no ports here: the switch's execute() calls these per packet.
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t

from pyvhost._pktpool cimport pkt_t

cdef void edit_eth(pkt_t *p, bint dst, uint64_t mac) noexcept nogil
cdef void edit_pcp(pkt_t *p, uint8_t pcp) noexcept nogil
cdef void edit_ipv4_addr(pkt_t *p, bint dst, uint32_t addr) noexcept nogil
cdef void edit_dscp(pkt_t *p, uint8_t dscp) noexcept nogil
cdef void edit_l4_port(pkt_t *p, bint dst, uint16_t port) noexcept nogil
cdef int edit_dec_ttl(pkt_t *p) noexcept nogil
