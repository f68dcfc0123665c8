# The afpacket port class: an existing interface through an AF_PACKET socket with a
# TPACKET_V3 receive ring and PACKET_VNET_HDR (sendmmsg batches to send).
from libc.stdint cimport uint8_t, uint32_t, uint64_t

from pyvhost._port cimport PortDev

cdef struct afp_stats_t:
    # the socket's own counters; AfPacketDev.stats() returns this struct as a dict
    uint64_t rx_blocks        # ring blocks consumed
    uint64_t rx_truncated     # frames larger than a ring block or a packet buffer: dropped
    uint64_t rx_csum_partial  # frames with a partial checksum (TP_STATUS_CSUMNOTREADY)
    uint64_t rx_vlan_restored # frames whose VLAN tag the kernel had taken out (put back)
    uint64_t tx_errors        # frames the kernel refused (bad header, too big)
    uint64_t tx_down          # frames not sent: the interface is down or gone

cdef struct afp_dev_t:
    int rx_lock               # a PMD receiving (try-lock), or control swapping the socket
    int tx_lock               # a PMD sending, or control swapping the socket
    int fd                    # -1: detached (the interface is gone): nothing moves
    uint8_t *ring
    uint64_t ring_size
    uint32_t block_size
    uint32_t nblocks
    uint32_t cur              # the block we read next
    uint32_t left             # frames still to read in ``cur`` (in_block)
    uint8_t in_block
    int lost                  # the socket reported an error (the link went away): sticky
    uint8_t *next             # the next frame in ``cur``
    afp_stats_t st


cdef class AfPacketDev(PortDev):
    cdef afp_dev_t d
