# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, nonecheck=False
"""Compiled ``PromptPages``: SGLang's chained page hashes of a prompt, in C with OpenSSL.

The specification is ``block_sgl.page_hash.PurePromptPages`` (same methods, same results,
same errors; the unit tests run both). Why compiled: the router hashes the leading pages of
every request on its critical path (``Router.decide``), and in Python each page costs a
``hashlib`` object, a bytes concatenation, a digest and an ``int.from_bytes`` (1.5-3 us per page
here); OpenSSL's SHA-256 (fetched once, see below) over a buffer laid out so that no copy is
needed, with one reused context, costs a fraction of that.

Layout: one buffer of ``n_pages`` slots of ``32 + 4 * page_size`` bytes. Slot ``k`` holds the
digest of page ``k - 1`` (its 32-byte parent) followed by page ``k``'s token ids as
little-endian uint32, so page ``k``'s SHA-256 input is one contiguous run: the whole slot
(page 0 has no parent: its run starts at byte 32). Each digest is written into the head of the
next slot (the last one into a spare slot). Hashes are computed lazily, as in the twin: routing
reads only the leading pages that some instance holds.
"""

from cpython.mem cimport PyMem_Malloc, PyMem_Free
from libc.stdint cimport uint8_t, uint32_t, int64_t, uint64_t
from libc.string cimport memcpy

cdef extern from "openssl/evp.h" nogil:
    ctypedef struct EVP_MD
    ctypedef struct EVP_MD_CTX
    EVP_MD_CTX *EVP_MD_CTX_new()
    void EVP_MD_CTX_free(EVP_MD_CTX *ctx)
    int EVP_DigestUpdate(EVP_MD_CTX *ctx, const void *d, size_t cnt)
    int EVP_DigestFinal_ex(EVP_MD_CTX *ctx, unsigned char *md, unsigned int *s)

cdef extern from *:
    """
    #include <openssl/evp.h>
    /* The SHA-256 implementation fetched once. OpenSSL 3 looks the algorithm up again at every
       EVP_DigestInit_ex(ctx, EVP_sha256(), NULL) (and at every one-shot SHA256()), which costs
       ~5x the hashing of a 96-byte page (measured here: 683 ns per page, 150 ns with the
       explicitly fetched EVP_MD and EVP_DigestInit_ex2). OpenSSL 1.1 has no fetching. */
    #if OPENSSL_VERSION_NUMBER >= 0x30000000L
    static EVP_MD *block_sgl_sha256_md = NULL;
    static int block_sgl_sha256_fetch(void) {
        if (block_sgl_sha256_md == NULL) block_sgl_sha256_md = EVP_MD_fetch(NULL, "SHA256", NULL);
        return block_sgl_sha256_md != NULL;
    }
    static int block_sgl_sha256_init(EVP_MD_CTX *ctx) {
        return EVP_DigestInit_ex2(ctx, block_sgl_sha256_md, NULL);
    }
    #else
    static int block_sgl_sha256_fetch(void) { return 1; }
    static int block_sgl_sha256_init(EVP_MD_CTX *ctx) {
        return EVP_DigestInit_ex(ctx, EVP_sha256(), NULL);
    }
    #endif
    """
    int block_sgl_sha256_fetch() nogil
    int block_sgl_sha256_init(EVP_MD_CTX *ctx) nogil

if not block_sgl_sha256_fetch():
    raise ImportError("block_sgl._page_hash: OpenSSL has no SHA256 implementation available")

from array import array
import sys

import numpy as np

cdef enum:
    DIGEST = 32
cdef bint LITTLE_ENDIAN = sys.byteorder == "little"
_U32 = next(code for code in "IL" if array(code).itemsize == 4)

_RANGE_ERROR = "token ids must be in [0, 2**32)"


cdef inline void _put_le32(uint8_t *out, uint32_t v) noexcept nogil:
    out[0] = v & 0xFF
    out[1] = (v >> 8) & 0xFF
    out[2] = (v >> 16) & 0xFF
    out[3] = (v >> 24) & 0xFF


cdef inline int _sha256(EVP_MD_CTX *ctx, const uint8_t *data, size_t n,
                        uint8_t *out) noexcept nogil:
    return (block_sgl_sha256_init(ctx) and EVP_DigestUpdate(ctx, data, n)
            and EVP_DigestFinal_ex(ctx, out, NULL))


cdef class PromptPages:
    """A prompt's page-hash chain (int64 hashes as in SGLang's cache events), computed lazily.
    See ``block_sgl.page_hash.PurePromptPages`` for the contract."""

    cdef readonly Py_ssize_t page_size
    cdef readonly Py_ssize_t n_pages
    cdef Py_ssize_t _slot          # bytes per slot: DIGEST + 4 * page_size
    cdef Py_ssize_t _done          # pages hashed so far
    cdef uint8_t *_buf             # (n_pages + 1) slots
    cdef list _hashes              # Python ints of the pages hashed so far
    cdef EVP_MD_CTX *_ctx          # reused for every page

    def __cinit__(self):
        self._buf = NULL
        self._ctx = NULL
        self._hashes = []

    def __init__(self, token_ids, Py_ssize_t page_size):
        if page_size <= 0:
            raise ValueError(f"page_size must be > 0, got {page_size}")
        cdef Py_ssize_t n = len(token_ids)
        self.page_size = page_size
        self.n_pages = n // page_size
        self._slot = DIGEST + 4 * page_size
        self._done = 0
        if self.n_pages == 0:
            return
        cdef Py_ssize_t full = self.n_pages * page_size
        self._buf = <uint8_t *>PyMem_Malloc((self.n_pages + 1) * self._slot)
        if self._buf == NULL:
            raise MemoryError()
        if isinstance(token_ids, list):
            self._fill_from_list(<list>token_ids, full)
        elif isinstance(token_ids, np.ndarray):
            self._fill_from_array(token_ids, full)
        else:  # any other sequence converts as a list does (the twin's errors, e.g. TypeError)
            self._fill_from_list(list(token_ids), full)

    def __dealloc__(self):
        if self._buf != NULL:
            PyMem_Free(self._buf)
            self._buf = NULL
        if self._ctx != NULL:
            EVP_MD_CTX_free(self._ctx)
            self._ctx = NULL

    cdef int _fill_from_list(self, list ids, Py_ssize_t full) except -1:
        # array() converts and range-checks ints in C (faster than a typed loop over objects)
        try:
            packed = array(_U32, ids[:full] if full != len(ids) else ids)
        except OverflowError:
            raise ValueError(_RANGE_ERROR) from None
        self._fill_u32(packed)
        return 0

    cdef void _fill_u32(self, const uint32_t[::1] ids):
        cdef Py_ssize_t k, i, p = self.page_size
        cdef uint8_t *dst
        for k in range(self.n_pages):
            dst = self._buf + k * self._slot + DIGEST
            if LITTLE_ENDIAN:
                memcpy(dst, &ids[k * p], 4 * p)
            else:
                for i in range(p):
                    _put_le32(dst + 4 * i, ids[k * p + i])

    cdef int _fill_from_array(self, token_ids, Py_ssize_t full) except -1:
        ids = token_ids[:full]
        if ids.dtype.kind not in "iub":
            ids = ids.astype(np.int64)  # as the twin: floats are truncated
        if full and (int(ids.min()) < 0 or int(ids.max()) > 0xFFFFFFFF):
            raise ValueError(_RANGE_ERROR)
        self._fill_u32(np.ascontiguousarray(ids, dtype=np.uint32))
        return 0

    def __len__(self):
        return self.n_pages

    cdef int _compute_to(self, Py_ssize_t last) except -1:
        """Hash pages ``_done .. last`` (inclusive)."""
        cdef Py_ssize_t k
        cdef uint8_t *slot
        cdef uint8_t *digest
        cdef uint64_t top
        cdef int j, ok
        if self._ctx == NULL:
            self._ctx = EVP_MD_CTX_new()
            if self._ctx == NULL:
                raise MemoryError()
        for k in range(self._done, last + 1):
            slot = self._buf + k * self._slot
            digest = self._buf + (k + 1) * self._slot  # the next slot's parent field
            if k == 0:
                ok = _sha256(self._ctx, slot + DIGEST, self._slot - DIGEST, digest)
            else:
                ok = _sha256(self._ctx, slot, self._slot, digest)
            if not ok:
                raise RuntimeError("OpenSSL SHA-256 failed")
            top = 0
            for j in range(8):  # the first 8 digest bytes, big-endian, as a signed int64
                top = (top << 8) | digest[j]
            self._hashes.append(<int64_t>top)
        self._done = last + 1
        return 0

    def hash(self, Py_ssize_t i):
        """The int64 hash of page ``i`` (computing the chain up to it if needed)."""
        if i < 0 or i >= self.n_pages:
            raise IndexError(i)
        if i >= self._done:
            self._compute_to(i)
        return self._hashes[i]

    def all(self):
        """Every full page's hash, as a new list."""
        if self._done < self.n_pages:
            self._compute_to(self.n_pages - 1)
        return list(self._hashes)

    def __iter__(self):
        return iter(self.all())

    def leading_in(self, container):
        """How many leading pages have their hash ``in container`` (a set or dict of hashes)."""
        cdef Py_ssize_t n = 0
        while n < self.n_pages:
            if n >= self._done:
                self._compute_to(n)
            if self._hashes[n] not in container:
                break
            n += 1
        return n

    def leading_unexpired(self, dict expiry, double now):
        """How many leading pages have ``expiry[hash] >= now`` (speculative cache entries)."""
        cdef Py_ssize_t n = 0
        cdef object e
        while n < self.n_pages:
            if n >= self._done:
                self._compute_to(n)
            e = expiry.get(self._hashes[n])
            if e is None or e < now:
                break
            n += 1
        return n
