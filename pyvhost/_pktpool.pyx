# cython: language_level=3
"""A pool of preallocated packet buffers for the compiled data path.

One pool belongs to one thread at a time (no locking inside): a PMD thread, or the asyncio
thread for the Python device API. Steady-state forwarding allocates nothing. This module
knows nothing of rings, guests or sockets.
"""

from libc.stdint cimport uint8_t, uint32_t
from libc.stdlib cimport calloc, free


cdef class PacketPool:
    """``count`` buffers of ``buf_size`` data bytes each (plus headroom)."""

    def __cinit__(self, uint32_t count=4096, uint32_t buf_size=10240):
        cdef uint32_t i, stride
        if count == 0 or buf_size < 64:
            raise ValueError("a pool needs buffers of at least 64 bytes")
        self.pool = <pktpool_t *>calloc(1, sizeof(pktpool_t))
        if self.pool == NULL:
            raise MemoryError()
        stride = (PKT_HEADROOM + buf_size + 63) & ~63u
        self.pool.mem = <uint8_t *>calloc(count, stride)
        self.pool.pkts = <pkt_t *>calloc(count, sizeof(pkt_t))
        self.pool.free_list = <pkt_t **>calloc(count, sizeof(pkt_t *))
        if self.pool.mem == NULL or self.pool.pkts == NULL or self.pool.free_list == NULL:
            raise MemoryError()
        self.pool.count = count
        self.pool.buf_size = buf_size
        for i in range(count):
            self.pool.pkts[i].buf = self.pool.mem + <size_t>i * stride
            self.pool.free_list[i] = &self.pool.pkts[i]
        self.pool.nfree = count

    def __dealloc__(self):
        if self.pool != NULL:
            free(self.pool.mem)
            free(self.pool.pkts)
            free(self.pool.free_list)
            free(self.pool)

    @property
    def count(self):
        return self.pool.count

    @property
    def available(self):
        return self.pool.nfree

    @property
    def buf_size(self):
        return self.pool.buf_size
