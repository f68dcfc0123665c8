# cython: language_level=3
"""The base of every port type's device object (see _port.pxd for the ops a type supplies).
Knows no port type, no rings, no sockets."""


cdef class PortDev:
    def __cinit__(self, *args, **kwargs):
        self.ops = NULL
        self.dev = NULL
        self.nqueues = 0
        self.per_remote = 0

    @property
    def ready(self):
        """True once a subclass has set its ops and state."""
        return self.ops != NULL and self.dev != NULL
