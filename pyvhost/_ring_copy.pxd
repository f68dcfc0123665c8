# Bytes between translated guest segments and packet buffers, whatever the layout: the
# virtio-net header checked on TX (tx_header_ok) and written on RX (put_header, fill_header), a frame
# copied out whole (copy_out) or by its head only for one-copy (copy_head), copied in
# (fill_iovs), dirty-logged (log_iovs); the RARP of SEND_RARP. Knows no ring structure.
# Header-only: compiled into _vring.
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy, memset

from pyvhost._pktpool cimport pkt_t
from pyvhost._vring cimport (
    OFL_CSUM, OFL_TSO4, OFL_TSO6, ONECOPY_HEAD, VNET_HDR_F_NEEDS_CSUM, VNET_HDR_GSO_ECN,
    VNET_HDR_GSO_NONE, VNET_HDR_GSO_TCPV4, VNET_HDR_GSO_TCPV6, ext_t, iov_t, vh_log_write, vq_t,
)


cdef inline void log_iovs(vq_t *vq, const iov_t *iov, uint32_t niov,
                          uint64_t written) noexcept nogil:
    """Dirty-log the guest pages of the first ``written`` bytes of ``iov``."""
    cdef uint32_t j
    cdef uint64_t n
    if not vq.log_all:
        return
    for j in range(niov):
        if written == 0:
            break
        n = iov[j].len if iov[j].len < written else written
        vh_log_write(vq.log, vq.log_size, iov[j].gpa, n)
        written -= n


cdef inline void copy_out(const iov_t *iov, uint32_t niov, uint64_t total, uint32_t hdr,
                          pkt_t *pkt) noexcept nogil:
    """The virtio-net header into pkt.vnet_hdr, the rest (the frame) into pkt.data."""
    cdef uint64_t skip = 0, take
    cdef uint8_t *dst = pkt.data
    cdef uint32_t j = 0
    if hdr == 12 and niov and iov[0].len >= 12:
        memcpy(pkt.vnet_hdr, iov[0].base, 12)       # a constant size: inline loads
        if iov[0].len > 12:
            memcpy(dst, iov[0].base + 12, iov[0].len - 12)
            dst += iov[0].len - 12
        skip = 12
        j = 1
    while j < niov:
        take = iov[j].len
        if skip < hdr:
            if take > hdr - skip:
                take = hdr - skip
            memcpy(&pkt.vnet_hdr[skip], iov[j].base, take)
            skip += take
            if take < iov[j].len:
                memcpy(dst, iov[j].base + take, iov[j].len - take)
                dst += iov[j].len - take
        else:
            memcpy(dst, iov[j].base, take)
            dst += take
        j += 1
    pkt.len = <uint32_t>(total - hdr)


cdef inline uint16_t rd_le16(const uint8_t *p) noexcept nogil:
    return p[0] | (<uint16_t>p[1] << 8)


cdef inline bint tx_header_ok(vq_t *vq, pkt_t *p) noexcept nogil:
    """Check the header a guest sent with a frame against what it negotiated; never trust
    it blindly (it decides where the switch writes a checksum)."""
    cdef uint8_t flags = p.vnet_hdr[0], gso = p.vnet_hdr[1] & ~VNET_HDR_GSO_ECN
    cdef uint32_t start, offset
    p.vnet_hdr[0] = flags & VNET_HDR_F_NEEDS_CSUM        # DATA_VALID etc. mean nothing here
    if vq.hdr_len < 12:
        p.vnet_hdr[10] = 0
        p.vnet_hdr[11] = 0
    if flags & VNET_HDR_F_NEEDS_CSUM:
        start = rd_le16(p.vnet_hdr + 6)
        offset = rd_le16(p.vnet_hdr + 8)
        if not vq.ofl_tx & OFL_CSUM or start + offset + 2 > p.len + p.ext_len:
            return False
    if gso == VNET_HDR_GSO_NONE:
        p.vnet_hdr[1] = 0
        return True
    if gso == VNET_HDR_GSO_TCPV4 and vq.ofl_tx & OFL_TSO4 or \
            gso == VNET_HDR_GSO_TCPV6 and vq.ofl_tx & OFL_TSO6:
        return rd_le16(p.vnet_hdr + 4) > 0 and flags & VNET_HDR_F_NEEDS_CSUM
    return False


cdef inline void copy_head(vq_t *vq, const iov_t *iov, uint32_t niov, uint64_t total,
                           uint32_t hdr, pkt_t *pkt) noexcept nogil:
    """One-copy receive: the virtio-net header into pkt.vnet_hdr, the frame's first
    ONECOPY_HEAD bytes into pkt.data (all a decision may read), the rest left where it is:
    its (already translated) segments recorded in an ext_t at the tail of pkt's buffer."""
    cdef ext_t *e = <ext_t *>((<size_t>(pkt.data + pkt.cap - sizeof(ext_t))) & ~(<size_t>7))
    cdef uint64_t pos = 0, take, left
    cdef uint64_t head_end = hdr + ONECOPY_HEAD
    cdef const uint8_t *b
    cdef uint32_t j
    e.src = vq
    e.nseg = 0
    for j in range(niov):
        b = iov[j].base
        left = iov[j].len
        if pos < hdr:
            take = left if left < hdr - pos else hdr - pos
            memcpy(&pkt.vnet_hdr[pos], b, take)
            b += take
            left -= take
            pos += take
        if left and pos < head_end:
            take = left if left < head_end - pos else head_end - pos
            memcpy(pkt.data + (pos - hdr), b, take)
            b += take
            left -= take
            pos += take
        if left:
            e.seg[e.nseg].base = <uint8_t *>b
            e.seg[e.nseg].len = left
            e.seg[e.nseg].gpa = 0
            e.nseg += 1
            pos += left
    pkt.len = ONECOPY_HEAD
    pkt.ext_len = <uint32_t>(total - hdr - ONECOPY_HEAD)
    pkt.ext = e


cdef inline void fill_iovs(iov_t *iov, uint32_t *i_iov, uint64_t *off, const uint8_t *src,
                           uint64_t length) noexcept nogil:
    cdef uint64_t take
    while length:
        take = iov[i_iov[0]].len - off[0]
        if take > length:
            take = length
        memcpy(iov[i_iov[0]].base + off[0], src, take)
        src += take
        length -= take
        off[0] += take
        if off[0] == iov[i_iov[0]].len:
            i_iov[0] += 1
            off[0] = 0


cdef inline void fill_header(uint8_t *hdr, vq_t *vq, uint32_t nbufs, pkt_t *pkt) noexcept nogil:
    """The RX header: the frame's offload state where this guest agreed to take it."""
    cdef uint8_t gso = pkt.vnet_hdr[1]
    memset(hdr, 0, 12)
    if pkt.vnet_hdr[0] & VNET_HDR_F_NEEDS_CSUM and vq.ofl_rx & OFL_CSUM:
        memcpy(hdr, pkt.vnet_hdr, 10)
        if not (gso == VNET_HDR_GSO_TCPV4 and vq.ofl_rx & OFL_TSO4 or
                gso == VNET_HDR_GSO_TCPV6 and vq.ofl_rx & OFL_TSO6):
            hdr[1] = 0                       # no (acceptable) GSO: a plain partial checksum
            hdr[2] = hdr[3] = hdr[4] = hdr[5] = 0
    if vq.hdr_len == 12:
        hdr[10] = <uint8_t>(nbufs & 0xff)
        hdr[11] = <uint8_t>(nbufs >> 8)


cdef inline void make_rarp(pkt_t *p, const uint8_t *mac) noexcept nogil:
    """The RARP request a migrated guest's new location announces itself with."""
    cdef uint8_t *d = p.data
    memset(d, 0, 60)
    memset(d, 0xFF, 6)
    memcpy(d + 6, mac, 6)
    d[12] = 0x80                                  # ethertype RARP 0x8035
    d[13] = 0x35
    d[15] = 1                                     # htype Ethernet
    d[16] = 0x08                                  # ptype IPv4
    d[18] = 6                                     # hlen
    d[19] = 4                                     # plen
    d[21] = 3                                     # op: reverse request
    memcpy(d + 22, mac, 6)                        # sender MAC
    memcpy(d + 32, mac, 6)                        # target MAC
    memset(p.vnet_hdr, 0, 12)
    p.len = 60


cdef inline void put_header(iov_t *iov, uint32_t *i_iov, uint64_t *off, vq_t *vq,
                            uint32_t nbufs, pkt_t *pkt) noexcept nogil:
    """The RX header (fill_header) into the buffer at iov[*i_iov] + *off, which is then
    past it. Without an offload to pass on, when the header fits the segment, it is made in
    registers and stored as one 8- and one 4- (or 2-) byte store: a header made byte by byte
    in our memory and copied out reads back in pieces the CPU cannot forward from its store
    queue, so each frame waited for every earlier store to reach the cache, the guest's
    lines too, which another core may have to give up first (hundreds of ns a frame when
    the guest's core is in another cache domain). A part that already holds its value is
    not stored again (DPDK's ASSIGN_UNLESS_EQUAL, on both sides of its rings): a buffer's
    header line, which the guest reads for every frame, then stays shared by both cores
    instead of moving to ours and back (with DPDK's virtio driver as the guest, 64 B
    frames: 16 ns a frame when the guests write their frames, 6 when they do not). Only
    when the frame starts on the next line: where it starts in the header's line (Linux's
    and pyvhost's drivers), that line is written anyway, and reading it first made two
    transfers of one, a load the copy waited for (bench flows, 10k flows at 1 Mpps into
    pyvhost gen: 371 -> 543 ns a frame). What is read decides nothing else: a guest that
    changes it meanwhile only changes what it reads itself."""
    cdef uint8_t hdr[12]
    cdef uint64_t zero8 = 0
    cdef uint32_t hi4 = nbufs << 16       # csum_offset 0, num_buffers (little-endian)
    cdef uint16_t zero2 = 0
    cdef uint64_t old8
    cdef uint32_t old4
    cdef uint16_t old2
    cdef uint8_t *d
    if not (pkt.vnet_hdr[0] & VNET_HDR_F_NEEDS_CSUM and vq.ofl_rx & OFL_CSUM) and \
            (vq.hdr_len == 12 or vq.hdr_len == 10) and \
            iov[i_iov[0]].len - off[0] > vq.hdr_len:
        d = iov[i_iov[0]].base + off[0]
        if (<size_t>d + vq.hdr_len) & 63:      # the frame starts in the header's line:
            memcpy(d, &zero8, 8)                # that line is written anyway
            if vq.hdr_len == 12:
                memcpy(d + 8, &hi4, 4)
            else:
                memcpy(d + 8, &zero2, 2)
            off[0] += vq.hdr_len
            return
        memcpy(&old8, d, 8)
        if old8 != 0:
            memcpy(d, &zero8, 8)
        if vq.hdr_len == 12:
            memcpy(&old4, d + 8, 4)
            if old4 != hi4:
                memcpy(d + 8, &hi4, 4)
        else:
            memcpy(&old2, d + 8, 2)
            if old2 != 0:
                memcpy(d + 8, &zero2, 2)
        off[0] += vq.hdr_len
        return
    fill_header(hdr, vq, nbufs, pkt)
    fill_iovs(iov, i_iov, off, hdr, vq.hdr_len)
