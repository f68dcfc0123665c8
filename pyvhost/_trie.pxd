# A path-compressed binary trie of 32-bit address prefixes (IPv4 nw_src or nw_dst of a
# classifier table's rules), counting the rules that end at each prefix. Nodes come from a
# caller's spare list so that changes made under a lock never allocate. No rules, no keys.
from libc.stdint cimport uint32_t, uint64_t

cdef struct trie_node_t:
    uint32_t bits                  # this node's segment of the address, left-aligned
    uint32_t n_rules               # prefixes that end at the end of the segment
    uint32_t nbits                 # the segment's length (0 only for a branching root)
    trie_node_t *child[2]          # by the next address bit

cdef struct trie_t:
    trie_node_t *root
    uint32_t n_nodes

cdef struct trie_spare_t:          # free nodes (linked by child[0])
    trie_node_t *head
    uint32_t n

cdef enum:
    TRIE_NODES_PER_INSERT = 2

cdef uint32_t prefix_mask(uint32_t plen) noexcept nogil
cdef int prefix_len(uint32_t mask) noexcept nogil
cdef int spare_reserve(trie_spare_t *sp, uint32_t n) noexcept nogil
cdef void spare_trim(trie_spare_t *sp, uint32_t keep) noexcept nogil
cdef void spare_move(trie_spare_t *dst, trie_spare_t *src, uint32_t keep) noexcept nogil
cdef void trie_insert(trie_t *t, trie_spare_t *sp, uint32_t addr, uint32_t plen) noexcept nogil
cdef void trie_remove(trie_t *t, trie_spare_t *sp, uint32_t addr, uint32_t plen) noexcept nogil
cdef uint64_t trie_lookup(const trie_t *t, uint32_t addr, uint32_t *check) noexcept nogil
cdef void trie_free(trie_t *t) noexcept nogil
