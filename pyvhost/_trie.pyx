# cython: language_level=3
"""Prefix tries for the classifier: per table and address field (nw_src, nw_dst), the
prefixes of its rules in a path-compressed binary trie. ``trie_lookup`` walks an address
down it and answers which prefix lengths some rule has on that address (a subtable whose
prefix length is not among them cannot match and is skipped) and how many leading address
bits the walk looked at: the only bits of the field a megaflow then needs, where the
subtable would have needed all of its prefix (a miss on 100k /32 rules can be cached for
a /15 instead of one /32 per destination). Changes take nodes from a spare list filled
beforehand and give them back to it, so they never allocate under the classifier's lock.
No rules, no keys, no locking here.
"""

from libc.stdint cimport uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memset

cdef extern from *:
    int __builtin_clz(unsigned int x) nogil
    int __builtin_popcount(unsigned int x) nogil

cdef enum:
    MAX_DEPTH = 34


cdef uint32_t prefix_mask(uint32_t plen) noexcept nogil:
    return 0 if plen == 0 else <uint32_t>(0xFFFFFFFFU << (32 - plen))


cdef int prefix_len(uint32_t mask) noexcept nogil:
    """The length of a CIDR mask, or -1 when ``mask`` is not one."""
    cdef int n = __builtin_popcount(mask)
    return n if mask == prefix_mask(n) else -1


cdef inline uint32_t common_bits(uint32_t a, uint32_t b, uint32_t limit) noexcept nogil:
    """Leading bits ``a`` and ``b`` share, at most ``limit``."""
    cdef uint32_t x = a ^ b
    cdef uint32_t n = 32 if x == 0 else <uint32_t>__builtin_clz(x)
    return n if n < limit else limit


cdef inline uint32_t bit_at(uint32_t addr, uint32_t pos) noexcept nogil:
    return (addr >> (31 - pos)) & 1


cdef inline uint32_t shifted(uint32_t addr, uint32_t ofs) noexcept nogil:
    return addr << ofs if ofs < 32 else 0


# -- nodes ----------------------------------------------------------------------------------

cdef int spare_reserve(trie_spare_t *sp, uint32_t n) noexcept nogil:
    """At least ``n`` spare nodes; -1 when memory ran out."""
    cdef trie_node_t *node
    while sp.n < n:
        node = <trie_node_t *>malloc(sizeof(trie_node_t))
        if node == NULL:
            return -1
        node.child[0] = sp.head
        sp.head = node
        sp.n += 1
    return 0


cdef void spare_trim(trie_spare_t *sp, uint32_t keep) noexcept nogil:
    cdef trie_node_t *node
    while sp.n > keep:
        node = sp.head
        sp.head = node.child[0]
        sp.n -= 1
        free(node)


cdef void spare_move(trie_spare_t *dst, trie_spare_t *src, uint32_t keep) noexcept nogil:
    """Move nodes from ``src`` to ``dst`` until ``src`` holds ``keep``."""
    cdef trie_node_t *node
    while src.n > keep:
        node = src.head
        src.head = node.child[0]
        src.n -= 1
        node.child[0] = dst.head
        dst.head = node
        dst.n += 1


cdef trie_node_t *take(trie_t *t, trie_spare_t *sp) noexcept nogil:
    cdef trie_node_t *node = sp.head
    sp.head = node.child[0]
    sp.n -= 1
    memset(node, 0, sizeof(trie_node_t))
    t.n_nodes += 1
    return node


cdef void give(trie_t *t, trie_spare_t *sp, trie_node_t *node) noexcept nogil:
    node.child[0] = sp.head
    sp.head = node
    sp.n += 1
    t.n_nodes -= 1


# -- changes --------------------------------------------------------------------------------

cdef void trie_insert(trie_t *t, trie_spare_t *sp, uint32_t addr, uint32_t plen) noexcept nogil:
    """Count one more prefix ``addr``/``plen`` (1..32); takes at most
    TRIE_NODES_PER_INSERT nodes from ``sp``, which must hold them."""
    cdef trie_node_t **link = &t.root
    cdef trie_node_t *node
    cdef trie_node_t *top
    cdef uint32_t ofs = 0, c
    addr &= prefix_mask(plen)
    while True:
        node = link[0]
        if node == NULL:                               # the rest of the prefix: a leaf
            node = take(t, sp)
            node.bits = shifted(addr, ofs)
            node.nbits = plen - ofs
            node.n_rules = 1
            link[0] = node
            return
        c = common_bits(node.bits, shifted(addr, ofs), min(node.nbits, plen - ofs))
        if c < node.nbits:                             # split the node after c bits
            top = take(t, sp)
            top.bits = node.bits & prefix_mask(c)
            top.nbits = c
            node.bits = node.bits << c
            node.nbits -= c
            top.child[node.bits >> 31] = node
            link[0] = top
            node = top
        ofs += node.nbits
        if ofs == plen:
            node.n_rules += 1
            return
        link = &node.child[bit_at(addr, ofs)]


cdef void trie_remove(trie_t *t, trie_spare_t *sp, uint32_t addr, uint32_t plen) noexcept nogil:
    """Count one prefix fewer; nodes left with no prefix and fewer than two children go
    (a single child is merged into its parent's place)."""
    cdef trie_node_t **links[MAX_DEPTH]
    cdef trie_node_t **link = &t.root
    cdef trie_node_t *node
    cdef trie_node_t *child
    cdef uint32_t ofs = 0, depth = 0
    addr &= prefix_mask(plen)
    while True:
        node = link[0]
        if node == NULL or node.nbits > plen - ofs or \
                common_bits(node.bits, shifted(addr, ofs), node.nbits) < node.nbits:
            return                                     # not there
        links[depth] = link
        depth += 1
        ofs += node.nbits
        if ofs == plen:
            break
        link = &node.child[bit_at(addr, ofs)]
    if node.n_rules == 0:
        return
    node.n_rules -= 1
    while depth > 0 and node.n_rules == 0:
        depth -= 1
        link = links[depth]
        node = link[0]
        if node.n_rules or (node.child[0] != NULL and node.child[1] != NULL):
            return
        child = node.child[0] if node.child[0] != NULL else node.child[1]
        if child == NULL:                              # gone; its parent may now merge
            link[0] = NULL
            give(t, sp, node)
            if depth > 0:
                node = links[depth - 1][0]
            continue
        child.bits = node.bits | (child.bits >> node.nbits)
        child.nbits += node.nbits
        link[0] = child
        give(t, sp, node)
        return


cdef void trie_free(trie_t *t) noexcept nogil:
    cdef trie_node_t *stack[MAX_DEPTH * 2]
    cdef trie_node_t *node
    cdef int n = 0
    if t.root != NULL:
        stack[0] = t.root
        n = 1
    while n > 0:                                       # depth <= 33: the stack suffices
        n -= 1
        node = stack[n]
        if node.child[0] != NULL:
            stack[n] = node.child[0]
            n += 1
        if node.child[1] != NULL:
            stack[n] = node.child[1]
            n += 1
        free(node)
    t.root = NULL
    t.n_nodes = 0


# -- lookup ---------------------------------------------------------------------------------

cdef uint64_t trie_lookup(const trie_t *t, uint32_t addr, uint32_t *check) noexcept nogil:
    """Bit L (1..32) set when some prefix of length L matches ``addr``; ``check``: how many
    leading bits of ``addr`` decided that (any address sharing them gets the same answer)."""
    cdef const trie_node_t *node = t.root
    cdef uint32_t ofs = 0, c
    cdef uint64_t plens = 0
    check[0] = 0
    while node != NULL:
        c = common_bits(node.bits, shifted(addr, ofs), node.nbits)
        if c < node.nbits:
            check[0] = ofs + c + 1                     # up to the first differing bit
            return plens
        ofs += node.nbits
        if node.n_rules:
            plens |= 1ULL << ofs
        if ofs >= 32:
            check[0] = 32
            return plens
        check[0] = ofs + 1                             # the bit that picks the child
        node = node.child[bit_at(addr, ofs)]
    return plens
