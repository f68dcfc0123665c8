# The internal (tap) port class: frames read from and written to a tap fd opened with
# IFF_TAP | IFF_NO_PI | IFF_VNET_HDR, each with its virtio-net header.
from libc.stdint cimport uint32_t, uint64_t

from pyvhost._port cimport PortDev

cdef struct tap_stats_t:
    # the tap's own counters; TapDev.stats() returns this struct as a dict
    uint64_t rx_errors        # reads that failed other than "nothing to read"
    uint64_t rx_runts         # frames shorter than an Ethernet header
    uint64_t tx_errors        # writes the kernel refused (bad header, too big)
    uint64_t tx_gone          # frames not sent: the interface was deleted under the port

cdef struct tap_dev_t:
    int fd
    uint32_t hdr_len          # the virtio-net header's size on this fd (TUNSETVNETHDRSZ)
    int dead                  # the interface was deleted (EBADFD): the fd is not waited on
    tap_stats_t st


cdef class TapDev(PortDev):
    cdef tap_dev_t d
