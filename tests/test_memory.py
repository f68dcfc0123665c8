"""pyvhost.memory and pyvhost._memory: region validation, bounds-checked translation,
hot add/remove, and no fd or mapping leaks over many table replacements."""

from __future__ import annotations

import os
import socket

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyvhost._memory import Mapping, MemTable
from pyvhost.memory import GuestMemory, GuestMemoryError
from pyvhost.protocol.payloads import MemRegion
from tests.harness.driver import GuestImage
from tests.harness.fuzzing import Counter, fuzz_settings

PAGE = 4096
MiB = 1 << 20


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def maps_count() -> int:
    """Mappings of this file's memfds ("gm"): the allocators (Python's, ASan's in the
    ASan run) map and unmap regions of their own at any time, so all lines would not do."""
    with open("/proc/self/maps") as f:
        return sum(1 for line in f if "/memfd:gm " in line)


def memfd(size: int) -> int:
    fd = os.memfd_create("gm", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


# ======================================================================================
# validation
# ======================================================================================

@pytest.mark.parametrize("desc,file_size", [
    (MemRegion(0x1000, 0, 0x7000, 0), PAGE),                          # size 0
    (MemRegion(0x1000, PAGE, 0x7000, PAGE), PAGE),                    # offset past the end
    (MemRegion(0x1000, 2 * PAGE, 0x7000, 0), PAGE),                   # runs past the end
    (MemRegion(0x1000, PAGE, 0x7000, 1 << 62), PAGE),
    (MemRegion((1 << 64) - PAGE, 2 * PAGE, 0x7000, 0), 2 * PAGE),     # gpa overflows
    (MemRegion(0x1000, 2 * PAGE, (1 << 64) - PAGE, 0), 2 * PAGE),     # uva overflows
], ids=["size0", "offset_past_end", "past_end", "huge_offset", "gpa_overflow", "uva_overflow"])
def test_bad_region_refused_and_fd_closed(desc, file_size):
    gm = GuestMemory()
    fd = memfd(file_size)
    before = fd_count()
    with pytest.raises(GuestMemoryError):
        gm.replace([desc], [fd])
    assert not is_open(fd)
    assert fd_count() == before - 1
    assert gm.regions == [] and len(gm.table) == 0


def _not_files():
    r, w = os.pipe()
    yield "pipe", r, [w]
    yield "eventfd", os.eventfd(0), []
    s1, s2 = socket.socketpair()
    yield "socket", s1.detach(), [s2.detach()]
    yield "dev_zero", os.open("/dev/zero", os.O_RDWR), []
    yield "directory", os.open("/tmp", os.O_RDONLY), []


def test_non_file_fds_refused():
    for name, fd, others in _not_files():
        gm = GuestMemory()
        with pytest.raises(GuestMemoryError, match="not a file"):
            gm.replace([MemRegion(0, PAGE, 0, 0)], [fd])
        assert not is_open(fd), name
        for o in others:
            os.close(o)


def test_closed_fd_refused():
    fd = memfd(PAGE)
    os.close(fd)
    with pytest.raises(OSError):
        GuestMemory().replace([MemRegion(0, PAGE, 0, 0)], [fd])


@pytest.mark.parametrize("second", [
    MemRegion(0x1000 + PAGE, PAGE, 0x90000, 0),     # gpa overlaps the tail
    MemRegion(0x0, 0x2000, 0x90000, 0),             # gpa overlaps the head
    MemRegion(0x0, 0x10000, 0x90000, 0),            # gpa contains the first
    MemRegion(0x80000, PAGE, 0x7000 + PAGE, 0),     # uva overlaps
    MemRegion(0x80000, PAGE, 0x6000 + 1, 0),
    MemRegion(0x1000, 2 * PAGE, 0x9000, 0),         # same gpa range, other uva
    MemRegion(0x9000, 2 * PAGE, 0x7000, 0),         # same uva range, other gpa
], ids=["gpa_tail", "gpa_head", "gpa_contains", "uva", "uva_unaligned", "same_gpa",
        "same_uva"])
def test_overlaps_refused(second):
    first = MemRegion(0x1000, 2 * PAGE, 0x7000, 0)
    before = fd_count()
    # in one table: all or nothing, every fd closed
    gm = GuestMemory()
    with pytest.raises(GuestMemoryError, match="overlaps"):
        gm.replace([first, second], [memfd(4 * PAGE), memfd(4 * PAGE)])
    assert gm.regions == [] and fd_count() == before
    # added later: the existing table stays
    gm.replace([first], [memfd(4 * PAGE)])
    with pytest.raises(GuestMemoryError, match="overlaps"):
        gm.add(second, memfd(4 * PAGE))
    assert len(gm.regions) == 1 and len(gm.table) == 1
    for m in gm.clear():
        m.close()
    assert fd_count() == before


def test_identical_region_twice():
    """In one table it overlaps itself; added twice (QEMU: once per vhost device on the
    socket) it is mapped once and goes with the last matching removal."""
    r = MemRegion(0x1000, 2 * PAGE, 0x7000, 0)
    gm = GuestMemory()
    with pytest.raises(GuestMemoryError, match="overlaps"):
        gm.replace([r, r], [memfd(2 * PAGE), memfd(2 * PAGE)])
    before, maps = fd_count(), maps_count()
    gm.add(r, memfd(2 * PAGE))
    fd = memfd(2 * PAGE)
    assert gm.add(r, fd) == []
    assert not is_open(fd)
    assert len(gm.table) == 1 and maps_count() == maps + 1 and fd_count() == before
    assert gm.remove(r) == []
    assert len(gm.table) == 1
    (m,) = gm.remove(r)
    m.close()
    assert len(gm.table) == 0 and maps_count() == maps
    with pytest.raises(GuestMemoryError):
        gm.remove(r)


def test_adjacent_regions_are_fine():
    gm = GuestMemory()
    gm.replace([MemRegion(0x0, PAGE, 0x10000, 0), MemRegion(PAGE, PAGE, 0x10000 + PAGE, 0)],
               [memfd(PAGE), memfd(PAGE)])
    assert len(gm.table) == 2
    for m in gm.clear():
        m.close()


def test_failed_replace_keeps_the_old_table():
    with GuestImage((MiB,)) as img:
        gm = img.guest_memory()
        old = gm.table
        img.write(img.start, b"hello")
        bad = [MemRegion(0, PAGE, 0, 0), MemRegion(0, 0, 0x10000, 0)]
        before = fd_count()
        fds = [memfd(PAGE), memfd(PAGE)]
        with pytest.raises(GuestMemoryError):
            gm.replace(bad, fds)
        assert fd_count() == before
        assert gm.table is old
        assert gm.table.read(img.start, 5) == b"hello"
        for m in gm.clear():
            m.close()


def test_too_many_regions():
    gm = GuestMemory(max_regions=2)
    gm.add(MemRegion(0, PAGE, 0, 0), memfd(PAGE))
    gm.add(MemRegion(PAGE, PAGE, PAGE, 0), memfd(PAGE))
    fd = memfd(PAGE)
    with pytest.raises(GuestMemoryError, match="more than 2"):
        gm.add(MemRegion(2 * PAGE, PAGE, 2 * PAGE, 0), fd)
    assert not is_open(fd)
    for m in gm.clear():
        m.close()


def test_memtable_checks_its_input():
    fd = memfd(2 * PAGE)
    m = Mapping(fd, 2 * PAGE)
    os.close(fd)
    with pytest.raises(ValueError):
        MemTable([(0, 3 * PAGE, 0, m, 0)])                 # larger than the mapping
    with pytest.raises(ValueError):
        MemTable([(0, PAGE, 0, m, 2 * PAGE)])              # offset at the end
    with pytest.raises(ValueError):
        MemTable([(0, 2, 0, m, (1 << 64) - 1)])            # offset + size overflows
    with pytest.raises(ValueError):
        MemTable([(i * PAGE, 1, i * PAGE, m, 0) for i in range(510)])
    assert len(MemTable([(i * PAGE, 1, i * PAGE, m, 0) for i in range(509)])) == 509
    m.close()
    with pytest.raises(ValueError):
        MemTable([(0, PAGE, 0, m, 0)])                     # closed mapping
    with pytest.raises(ValueError):
        Mapping(0, 0)


# ======================================================================================
# translation
# ======================================================================================

@pytest.fixture
def two():
    """Two regions adjacent in GPA, far apart in UVA, the second at file offset 0x2000."""
    with GuestImage((MiB, MiB)) as img:
        gm = img.guest_memory()
        yield img, gm
        for m in gm.clear():
            m.close()


def test_gpa_bounds(two):
    img, gm = two
    t = gm.table
    r0, r1 = img.regions
    for gpa in (r0.gpa, r0.end - 1, r1.gpa, r1.end - 1):
        host, n = t.gpa_to_host(gpa, 1)
        assert n == 1 and host
    for gpa in (r0.gpa - 1, r1.end, 0, (1 << 64) - 1):
        with pytest.raises(KeyError):
            t.gpa_to_host(gpa, 1)
    # the length is cut at the end of the region, never beyond
    _, n = t.gpa_to_host(r0.end - 10, 100)
    assert n == 10
    _, n = t.gpa_to_host(r1.end - 10, (1 << 64) - 1)
    assert n == 10
    h0, _ = t.gpa_to_host(r0.gpa)
    h0b, _ = t.gpa_to_host(r0.gpa + 123)
    assert h0b == h0 + 123


def test_uva_bounds(two):
    img, gm = two
    t = gm.table
    r0, r1 = img.regions
    assert t.uva_to_host(r0.uva, r0.size)
    assert t.uva_to_host(r1.uva + r1.size - 8, 8)
    for uva, n in ((r0.uva, r0.size + 1), (r0.uva + r0.size - 8, 9), (r0.uva - 1, 2),
                   (r1.uva + r1.size, 1), (r0.gpa, 1), ((1 << 64) - 1, 1),
                   (r0.uva, (1 << 64) - 1)):
        with pytest.raises(KeyError):
            t.uva_to_host(uva, n)
    # gpa and uva of the same byte lead to the same host address
    assert t.uva_to_host(r1.uva + 77, 1) == t.gpa_to_host(r1.gpa + 77)[0]


def test_read_write_across_adjacent_regions(two):
    img, gm = two
    t = gm.table
    b = img.boundary(0)
    data = bytes(range(256)) * 4
    t.write(b - 500, data)
    assert img.read(b - 500, len(data)) == data       # what the driver sees (mmap offset ok)
    img.write(b - 3, b"abcdef")
    assert t.read(b - 3, 6) == b"abcdef"
    assert t.read(b, 0) == b""
    t.write(b, b"")
    with pytest.raises(KeyError):
        t.read(img.end - 4, 8)
    with pytest.raises(KeyError):
        t.write(img.end - 4, bytes(8))
    with pytest.raises(KeyError):
        t.read(img.start - 1, 2)


def test_read_across_a_hole_fails():
    gm = GuestMemory()
    gm.replace([MemRegion(0, PAGE, 0x10000, 0), MemRegion(2 * PAGE, PAGE, 0x20000, 0)],
               [memfd(PAGE), memfd(PAGE)])
    with pytest.raises(KeyError):
        gm.table.read(PAGE - 2, 4)
    with pytest.raises(KeyError):
        gm.table.gpa_to_host(PAGE)
    for m in gm.clear():
        m.close()


def test_translation_matches_a_model():
    count = Counter("translation against a model")

    @fuzz_settings(150)
    @given(st.lists(st.tuples(st.integers(1, 8), st.integers(0, 4)), min_size=1, max_size=6),
           st.lists(st.tuples(st.integers(0, 80 * PAGE), st.integers(1, 3 * PAGE)),
                    min_size=1, max_size=20))
    def run(layout, queries):
        count()
        gm = GuestMemory()
        descs, fds, at = [], [], 0
        for k, (pages, gap) in enumerate(layout):
            at += gap * PAGE
            descs.append(MemRegion(at, pages * PAGE, 0x7F0000000000 + k * (1 << 30), PAGE))
            fds.append(memfd((pages + 1) * PAGE))
            at += pages * PAGE
        gm.replace(descs, fds)
        try:
            for gpa, length in queries:
                inside = [d for d in descs if d.guest_phys_addr <= gpa < d.guest_phys_addr
                          + d.size]
                if not inside:
                    with pytest.raises(KeyError):
                        gm.table.gpa_to_host(gpa, length)
                    continue
                d = inside[0]
                _, n = gm.table.gpa_to_host(gpa, length)
                assert n == min(length, d.guest_phys_addr + d.size - gpa)
                uva = d.userspace_addr + gpa - d.guest_phys_addr
                fits = gpa + length <= d.guest_phys_addr + d.size
                if fits:
                    gm.table.uva_to_host(uva, length)
                else:
                    with pytest.raises(KeyError):
                        gm.table.uva_to_host(uva, length)
        finally:
            for m in gm.clear():
                m.close()

    run()
    count.report(150)


# ======================================================================================
# add / remove
# ======================================================================================

def test_add_and_remove():
    gm = GuestMemory()
    a = MemRegion(0x0, PAGE, 0x10000, 0)
    b = MemRegion(0x10 * PAGE, 2 * PAGE, 0x40000, PAGE)
    assert gm.add(a, memfd(PAGE)) == []
    assert gm.add(b, memfd(3 * PAGE)) == []
    t1 = gm.table
    assert len(t1) == 2 and t1.gpa_to_host(0x10 * PAGE + 5)
    retired = gm.remove(MemRegion(a.guest_phys_addr, a.size, a.userspace_addr, 12345))
    assert len(retired) == 1 and len(gm.table) == 1
    with pytest.raises(KeyError):
        gm.table.gpa_to_host(0)
    assert t1.gpa_to_host(0)                 # the old table is untouched until unmapped
    for m in retired:
        m.close()
    with pytest.raises(GuestMemoryError, match="no region"):
        gm.remove(a)
    with pytest.raises(GuestMemoryError):
        gm.remove(MemRegion(b.guest_phys_addr, PAGE, b.userspace_addr, 0))   # size differs
    for m in gm.clear():
        m.close()
    assert gm.regions == [] and len(gm.table) == 0


def test_remove_then_add_again_in_the_same_place():
    gm = GuestMemory()
    a = MemRegion(0x0, PAGE, 0x10000, 0)
    for _ in range(5):
        gm.add(a, memfd(PAGE))
        gm.table.write(0, b"x")
        for m in gm.remove(a):
            m.close()
    assert len(gm.table) == 0


# ======================================================================================
# leaks
# ======================================================================================

def test_no_fd_or_mapping_leaks_over_replace_cycles():
    gm = GuestMemory()
    descs = [MemRegion(0, 64 * PAGE, 0x7F0000000000, 0),
             MemRegion(64 * PAGE, 64 * PAGE, 0x7F1000000000, 0)]
    src = [memfd(64 * PAGE), memfd(64 * PAGE)]
    for m in gm.replace(descs, [os.dup(f) for f in src]):   # warm up
        m.close()
    fds, maps = fd_count(), maps_count()
    for i in range(200):
        if i % 3 == 2:                                      # a refused table now and then
            with pytest.raises(GuestMemoryError):
                gm.replace([descs[0], descs[0]], [os.dup(f) for f in src])
            continue
        for m in gm.replace(descs, [os.dup(f) for f in src]):
            m.close()
        if i % 5 == 0:
            gm.add(MemRegion(1 << 30, PAGE, 0x7F2000000000, 0), os.dup(src[0]))
            for m in gm.remove(MemRegion(1 << 30, PAGE, 0x7F2000000000, 0)):
                m.close()
    assert fd_count() == fds
    during = maps_count()
    assert during == maps
    for m in gm.clear():
        m.close()
    for f in src:
        os.close(f)
    assert fd_count() == fds - 2
    assert maps_count() == during - 2           # the two regions' mappings are gone


def test_mapping_close_is_idempotent():
    fd = memfd(PAGE)
    maps = maps_count()
    m = Mapping(fd, PAGE)
    os.close(fd)
    assert maps_count() == maps + 1
    m.close()
    m.close()
    assert m.closed and maps_count() == maps


def test_sealable_memfd_can_no_longer_shrink():
    """A front-end truncating its memory under the data path would crash it with SIGBUS:
    a memfd that allows sealing is sealed against shrinking when it is mapped."""
    from pyvhost.memory import GuestMemory
    from pyvhost.protocol.payloads import MemRegion
    fd = os.memfd_create("sealable", os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, 1 << 20)
    mem = GuestMemory()
    try:
        retired = mem.replace([MemRegion(0, 1 << 20, 0x7F0000000000, 0)], [os.dup(fd)])
        assert retired == []
        with pytest.raises(PermissionError):
            os.ftruncate(fd, 4096)
        os.ftruncate(fd, 2 << 20)                       # growing stays allowed
    finally:
        for m in mem.clear():
            m.close()
        os.close(fd)
