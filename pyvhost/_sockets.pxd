# The batched socket calls of the datapath's socket-based ports (afpacket's TX, tunnels'
# RX and TX): sendmmsg/recvmmsg with their message headers, and SO_ERROR. Declarations of
# the C library only; no code.
from posix.uio cimport iovec


cdef extern from "<sys/socket.h>" nogil:
    """
    #ifndef _GNU_SOURCE
    #define _GNU_SOURCE
    #endif
    """
    struct msghdr:
        void *msg_name
        unsigned int msg_namelen
        iovec *msg_iov
        size_t msg_iovlen
        void *msg_control
        size_t msg_controllen
        int msg_flags
    struct mmsghdr:
        msghdr msg_hdr
        unsigned int msg_len
    int sendmmsg(int fd, mmsghdr *msgs, unsigned int n, int flags)
    int recvmmsg(int fd, mmsghdr *msgs, unsigned int n, int flags, void *timeout)
    int getsockopt(int fd, int level, int name, void *value, unsigned int *len)
    enum:
        MSG_DONTWAIT
        MSG_TRUNC
        SOL_SOCKET
        SO_ERROR
