# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, nonecheck=False
"""Compiled fastsim kernel: SGLang 0.5.23 scheduling replayed in C.

The specification is ``block_sgl/_fastsim_py.py`` (read it first: semantics, SGLang source
citations, data layout, approximations). This file performs the same integer and floating-point
operations in the same order, so both give identical results; the parity tests check it.

Structure (as scikit-learn's ``_tree.pyx``): ``simulate`` validates its inputs with the GIL
held (``ValueError`` naming the field, message produced by the twin's ``validate``), copies the
requests into a scratch ``Workspace`` and runs ``_run`` without the GIL: no Python objects in
the loop, only typed C pointers. Decode stretches with no admission, completion or retraction
are summed in closed form.

The edge takes ``ndarray`` arguments checked through NumPy's C API (dtype, ndim,
C-contiguity, shape) rather than typed-memoryview arguments: acquiring one typed memoryview
costs about 0.35 us on this machine, seven of them half the 5 us budget of a whole prediction.
"""

from libc.stdint cimport int64_t
from libc.stdlib cimport malloc, realloc, free, qsort
from libc.string cimport memset
from libc.math cimport INFINITY
cimport numpy as cnp

cnp.import_array()

ctypedef int64_t i64

# must match block_sgl/_fastsim_py.py (SLOTS: int64 scratch slots per request, see _layout)
cdef enum:
    N_FIELDS = 6
    R_INPUT = 0
    R_PREFIX = 1
    R_OUTPUT = 2
    R_MAX_NEW = 3
    R_IGNORE_EOS = 4
    R_PRED = 5
    N_ISCAL = 13
    I_PAGE = 0
    I_MAX_TOTAL = 1
    I_FREE = 2
    I_EVICTABLE = 3
    I_MAX_RUNNING = 4
    I_CHUNK = 5
    I_MAX_PREFILL = 6
    I_POLICY = 7
    I_CHUNKED_IDX = 8
    I_CHUNKED_DONE = 9
    I_BATCH_FULL = 10
    I_CLIP = 11
    I_RETRACT_STEPS = 12
    N_FSCAL = 5
    F_RATIO = 0
    F_INIT_RATIO = 1
    F_MIN_RATIO = 2
    F_DECAY = 3
    F_ELAPSED = 4
    N_CAND = 5
    C_INPUT = 0
    C_PREFIX = 1
    C_PRED = 2
    C_MAX_NEW = 3
    C_IGNORE_EOS = 4
    N_COEFFS = 5
    POLICY_LPM = 1
    LPM_MAX_QUEUE = 128
    CONTINUE = 0
    NO_TOKEN = 1
    OTHER = 2
    SLOTS = 28


cdef struct HE:        # heap entry: finish decode step, request id
    i64 k
    i64 id


cdef struct RKey:      # retraction order key: keep (-out, inp, seq) ascending, pop the end
    i64 neg_out
    i64 inp
    i64 seq
    i64 rid


cdef struct Sim:
    double c0, c1, c2, c3, c4
    i64 page, max_running, chunk_size, max_prefill, lpm, clip, retract_steps
    double ratio_base, min_ratio, decay, elapsed
    i64 ndecay
    bint step_by_step
    i64 pool, D
    double t
    bint batch_full
    i64 bs, ctx_base
    i64 sum_m[2]    # per ignore_eos: sum of (mx - out + d0), remaining = M - D
    i64 cnt[2]
    i64 n, cand, n_snapshot, chunk, chunk_done, next_seq
    i64 *inp
    i64 *pre
    i64 *out
    i64 *mx
    i64 *ieos
    i64 *tgt
    i64 *d0
    i64 *seq
    i64 *bigpos     # index in big[] or -1
    i64 *running    # 1 while in the running batch
    i64 *taken      # admitted in the current pass
    HE *heap        # min-heap on the finish step of requests that joined during the run
    HE *srt         # the snapshot's running requests sorted by finish step: srt[sp:sn]
    HE *tmp         # radix-sort scratch
    i64 sp, sn
    i64 hn
    i64 *q          # waiting queue q[qh:qt]
    i64 qh, qt
    i64 *big
    i64 nbig
    i64 *adm_id
    i64 *adm_e
    i64 *adm_p
    i64 *adm_c
    i64 nadm
    RKey *order
    bint needs_sort
    const double *pend_t  # arrival times of the pending requests (NULL: all at 0)
    const double *fut_t   # arrival times of the future requests after the candidate's
    i64 n_pend
    i64 fi, nf            # the next arrival (id n_snapshot + fi); how many there are
    double ttft, e2e, queue_s
    bint done


cdef class Workspace:
    """Reusable scratch memory for ``simulate`` (grows on demand, never shrinks)."""
    cdef i64 *buf
    cdef Py_ssize_t cap

    def __cinit__(self):
        self.buf = NULL
        self.cap = 0

    def __dealloc__(self):
        free(self.buf)

    cdef i64* ensure(self, Py_ssize_t n_slots) except NULL:
        cdef i64 *p
        if n_slots > self.cap:
            p = <i64*> realloc(self.buf, n_slots * sizeof(i64))
            if p == NULL:
                raise MemoryError()
            self.buf = p
            self.cap = n_slots
        return self.buf


cdef void _layout(Sim *s, i64 *buf, i64 n) noexcept nogil:
    s.inp = buf
    s.pre = buf + n
    s.out = buf + 2 * n
    s.mx = buf + 3 * n
    s.ieos = buf + 4 * n
    s.tgt = buf + 5 * n
    s.d0 = buf + 6 * n
    s.seq = buf + 7 * n
    s.bigpos = buf + 8 * n
    s.running = buf + 9 * n
    s.taken = buf + 10 * n
    s.heap = <HE*> (buf + 11 * n)      # 2 slots per request: 11..12
    s.q = buf + 13 * n
    s.big = buf + 14 * n
    s.adm_id = buf + 15 * n
    s.adm_e = buf + 16 * n
    s.adm_p = buf + 17 * n
    s.adm_c = buf + 18 * n
    s.order = <RKey*> (buf + 19 * n)   # 4 slots per request: 19..22
    s.srt = <HE*> (buf + 23 * n)       # 23..24
    s.tmp = <HE*> (buf + 25 * n)       # 25..26; slot 27 spare


# ------------------------------------------------------------------------------ model
cdef inline double _pos(double x) noexcept nogil:
    # Python max(x, 0.0)
    if 0.0 > x:
        return 0.0
    return x


cdef inline double _step_time(Sim *s, i64 prefill_tokens, double pctx, i64 decode_seqs,
                              i64 dctx) noexcept nogil:
    cdef i64 n = prefill_tokens + decode_seqs
    if n <= 0:
        return 0.0
    return (s.c0 + s.c1 * _pos(<double> n - s.c2) + s.c3 * pctx + s.c4 * <double> dctx)


cdef inline double _decode_run_time(Sim *s, i64 k, i64 bs, i64 ctx) noexcept nogil:
    return (<double> k * (s.c0 + s.c1 * _pos(<double> bs - s.c2))
            + s.c4 * <double> (k * ctx + bs * ((k * (k - 1)) // 2)))


cdef inline i64 _ceil_page(i64 tokens, i64 page) noexcept nogil:
    if page == 1:
        return tokens
    return (tokens + page - 1) // page * page


# ------------------------------------------------------------------------------ heap
cdef void _sift_down(HE *h, i64 hn, i64 i) noexcept nogil:
    cdef HE x = h[i]
    cdef i64 c
    while True:
        c = 2 * i + 1
        if c >= hn:
            break
        if c + 1 < hn and h[c + 1].k < h[c].k:
            c += 1
        if not h[c].k < x.k:
            break
        h[i] = h[c]
        i = c
    h[i] = x


cdef void _hpush(Sim *s, i64 key, i64 rid) noexcept nogil:
    cdef HE *h = s.heap
    cdef i64 i = s.hn, p
    s.hn += 1
    while i > 0:
        p = (i - 1) >> 1
        if not key < h[p].k:
            break
        h[i] = h[p]
        i = p
    h[i].k = key
    h[i].id = rid


cdef inline i64 _hpop(Sim *s) noexcept nogil:
    # Floyd: walk the hole down along the smaller children, then lift the last entry into it
    cdef HE *h = s.heap
    cdef i64 rid = h[0].id, hn, i = 0, c, p
    cdef HE x
    s.hn -= 1
    hn = s.hn
    x = h[hn]
    while True:
        c = 2 * i + 1
        if c >= hn:
            break
        if c + 1 < hn and h[c + 1].k < h[c].k:
            c += 1
        h[i] = h[c]
        i = c
    while i > 0:
        p = (i - 1) >> 1
        if not x.k < h[p].k:
            break
        h[i] = h[p]
        i = p
    h[i] = x
    return rid


# ------------------------------------------------------------------------------ running batch
cdef inline i64 _held(Sim *s, i64 rid) noexcept nogil:
    cdef i64 h = s.inp[rid] + s.out[rid] + s.D - s.d0[rid] - 1 - s.pre[rid]
    return h if h > 0 else 0


cdef void _big_remove(Sim *s, i64 rid) noexcept nogil:
    cdef i64 pos = s.bigpos[rid], last
    if pos < 0:
        return
    s.nbig -= 1
    last = s.big[s.nbig]
    s.big[pos] = last
    s.bigpos[last] = pos
    s.bigpos[rid] = -1


cdef void _join(Sim *s, i64 rid) noexcept nogil:
    _hpush(s, s.D + s.tgt[rid] - s.out[rid], rid)
    _join_batch(s, rid)


cdef void _radix_sort(HE *a, HE *tmp, i64 n) noexcept nogil:
    """Sort ``a[:n]`` by key (>= 0): LSD radix with about log2(n)-bit digits, O(n) per pass
    where a heap costs O(log n) per completion."""
    cdef i64 count[256]
    cdef i64 i, pos, total, shift = 0, kmax = 0, bits = 4, nb, mask
    cdef HE *src = a
    cdef HE *dst = tmp
    cdef HE *sw
    if n < 2:
        return
    while bits < 8 and (<i64> 1 << (bits + 1)) <= n:
        bits += 1
    nb = <i64> 1 << bits
    mask = nb - 1
    for i in range(n):
        if a[i].k > kmax:
            kmax = a[i].k
    while shift < 64 and (shift == 0 or (kmax >> shift) > 0):
        memset(count, 0, nb * sizeof(i64))
        for i in range(n):
            count[(src[i].k >> shift) & mask] += 1
        total = 0
        for i in range(nb):
            pos = count[i]
            count[i] = total
            total += pos
        for i in range(n):
            pos = (src[i].k >> shift) & mask
            dst[count[pos]] = src[i]
            count[pos] += 1
        sw = src
        src = dst
        dst = sw
        shift += bits
    if src != a:
        for i in range(n):
            a[i] = src[i]


cdef inline i64 _next_finish(Sim *s) noexcept nogil:
    """The earliest finish step in the running batch (requires bs > 0)."""
    if s.sp < s.sn and (s.hn == 0 or s.srt[s.sp].k <= s.heap[0].k):
        return s.srt[s.sp].k
    return s.heap[0].k


cdef void _heapify(Sim *s) noexcept nogil:
    cdef i64 i = s.hn // 2 - 1
    while i >= 0:
        _sift_down(s.heap, s.hn, i)
        i -= 1


cdef void _join_batch(Sim *s, i64 rid) noexcept nogil:
    """Everything ``_join`` does but the heap push."""
    cdef i64 m
    s.d0[rid] = s.D
    s.seq[rid] = s.next_seq
    s.next_seq += 1
    s.running[rid] = 1
    s.bs += 1
    s.ctx_base += s.inp[rid] + s.out[rid] - s.D
    m = s.mx[rid] - s.out[rid] + s.D
    s.sum_m[s.ieos[rid]] += m
    s.cnt[s.ieos[rid]] += 1
    if m - s.clip > s.D and s.bigpos[rid] < 0:
        s.bigpos[rid] = s.nbig
        s.big[s.nbig] = rid
        s.nbig += 1


cdef void _leave(Sim *s, i64 rid) noexcept nogil:
    cdef i64 m
    s.out[rid] += s.D - s.d0[rid]
    s.running[rid] = 0
    _big_remove(s, rid)
    s.bs -= 1
    s.ctx_base -= s.inp[rid] + s.out[rid] - s.D
    m = s.mx[rid] - s.out[rid] + s.D
    s.sum_m[s.ieos[rid]] -= m
    s.cnt[s.ieos[rid]] -= 1


cdef inline double _ratio(Sim *s) noexcept nogil:
    cdef double r
    if s.ndecay == 0:
        return s.ratio_base
    r = s.ratio_base - <double> s.ndecay * s.decay
    if s.min_ratio > r:
        return s.min_ratio
    return r


cdef double _running_offset(Sim *s) noexcept nogil:
    cdef i64 s0 = s.sum_m[0] - s.cnt[0] * s.D
    cdef i64 s1 = s.sum_m[1] - s.cnt[1] * s.D
    cdef i64 i = 0, rid, excess
    while i < s.nbig:
        rid = s.big[i]
        excess = s.mx[rid] - s.out[rid] + s.d0[rid] - s.clip - s.D
        if excess <= 0:
            _big_remove(s, rid)   # moves the last entry to i: look at i again
            continue
        if s.ieos[rid]:
            s1 -= excess
        else:
            s0 -= excess
        i += 1
    return _ratio(s) * <double> s0 + <double> s1


cdef inline void _advance(Sim *s, double dt) noexcept nogil:
    s.t += dt


cdef void _finish_running(Sim *s) noexcept nogil:
    cdef i64 rid
    while s.bs > 0:
        if s.sp < s.sn and (s.hn == 0 or s.srt[s.sp].k <= s.heap[0].k):
            if s.srt[s.sp].k > s.D:
                return
            rid = s.srt[s.sp].id
            s.sp += 1
        else:
            if s.heap[0].k > s.D:
                return
            rid = _hpop(s)
        s.pool += _held(s, rid)
        _leave(s, rid)
        s.batch_full = False
        if rid == s.cand:
            s.e2e = s.t
            s.done = True
            return


# ------------------------------------------------------------------------------ admission
cdef void _queue_append(Sim *s, i64 rid) noexcept nogil:
    cdef i64 i, m
    if s.qt == s.n:   # shift the live part to the front (it holds < n entries here)
        m = s.qt - s.qh
        for i in range(m):
            s.q[i] = s.q[s.qh + i]
        s.qh = 0
        s.qt = m
    s.q[s.qt] = rid
    s.qt += 1


cdef void _lpm_sort(Sim *s) noexcept nogil:
    # stable insertion sort of q[qh:qt] by prefix length, longest first
    cdef i64 i, j, x
    for i in range(s.qh + 1, s.qt):
        x = s.q[i]
        j = i - 1
        while j >= s.qh and s.pre[s.q[j]] < s.pre[x]:
            s.q[j + 1] = s.q[j]
            j -= 1
        s.q[j + 1] = x


cdef inline int _budget_state(i64 pool, double b_total, i64 b_cur, i64 b_input,
                              i64 b_chunk, bint chunked) noexcept nogil:
    if not (<double> pool - b_total > 0 and pool - b_cur > 0):
        return NO_TOKEN
    if b_input <= 0 or (chunked and b_chunk <= 0):
        return OTHER
    return CONTINUE


cdef inline void _add_adm(Sim *s, i64 rid, i64 e, i64 p, i64 complete) noexcept nogil:
    s.adm_id[s.nadm] = rid
    s.adm_e[s.nadm] = e
    s.adm_p[s.nadm] = p
    s.adm_c[s.nadm] = complete
    s.nadm += 1


cdef void _admit(Sim *s) noexcept nogil:
    """Scheduler._get_new_batch_prefill_raw + PrefillAdder; fills s.adm_*."""
    cdef bint has_queue = s.qt > s.qh, chunked = s.chunk_size > 0, truncated
    cdef i64 i, j, rid, page = s.page, pool = s.pool, b_cur = 0, b_input, b_chunk
    cdef i64 rem, ext, e, ep, total, mxn, ntaken = 0
    cdef double b_total
    cdef int state
    s.nadm = 0
    if s.bs == 0:
        s.batch_full = False
    if (s.batch_full or not has_queue) and s.chunk < 0:
        return
    if s.chunk < 0 and s.bs >= s.max_running:
        s.batch_full = True
        return
    if s.lpm and s.needs_sort and s.qt - s.qh <= LPM_MAX_QUEUE:
        _lpm_sort(s)
        s.needs_sort = False

    b_total = _running_offset(s)
    b_input = s.max_prefill
    b_chunk = s.chunk_size

    if s.chunk >= 0:   # PrefillAdder.add_chunked_req
        rid = s.chunk
        rem = <i64> (<double> pool - b_total)
        if b_chunk < rem:
            rem = b_chunk
        if rem <= 0:
            rem = b_chunk
        ext = s.inp[rid] + s.out[rid] - s.chunk_done
        truncated = ext > rem
        e = rem if truncated else ext
        mxn = 0
        if not truncated:
            mxn = s.mx[rid] if s.mx[rid] < s.clip else s.clip
        ep = _ceil_page(e, page)
        b_total += <double> (ep + page + mxn)
        b_cur += ep + page
        b_input -= ep
        b_chunk -= ep
        _add_adm(s, rid, e, s.chunk_done, 0 if truncated else 1)
        if truncated:
            s.chunk_done += e
        else:
            s.chunk = -1

    for i in range(s.qh, s.qt):
        rid = s.q[i]
        if _budget_state(pool, b_total, b_cur, b_input, b_chunk, chunked) == OTHER:
            break
        if s.nadm >= s.max_running - s.bs:
            s.batch_full = True
            break
        ext = s.inp[rid] + s.out[rid] - s.pre[rid]
        mxn = s.mx[rid] - s.out[rid]
        if mxn < 0:
            mxn = 0
        if mxn > s.clip:
            mxn = s.clip
        total = ext + mxn + page
        if not (<double> total < <double> pool - b_total):
            s.batch_full = s.nadm > 0 or s.bs > 0
            break
        ep = _ceil_page(ext, page)
        if not chunked and s.nadm > 0 and ep >= b_input:
            break
        if chunked and ep > b_chunk:   # becomes THE chunked request
            e = b_chunk // page * page
            e = (s.pre[rid] + e) // page * page - s.pre[rid]
            if e <= 0:
                break
            ep = _ceil_page(e, page)
            b_total += <double> (ep + page + 0)
            b_cur += ep + page
            b_input -= ep
            b_chunk -= ep
            _add_adm(s, rid, e, s.pre[rid], 0)
            s.chunk = rid
            s.chunk_done = s.pre[rid] + e
        else:
            mxn = s.mx[rid] if s.mx[rid] < s.clip else s.clip
            b_total += <double> (ep + page + mxn)
            b_cur += ep + page
            b_input -= ep
            if chunked:
                b_chunk -= ep
            _add_adm(s, rid, ext, s.pre[rid], 1)
        s.taken[rid] = 1
        ntaken += 1
        state = _budget_state(pool, b_total, b_cur, b_input, b_chunk, chunked)
        if state != CONTINUE:
            if state == NO_TOKEN:
                s.batch_full = True
            break

    if ntaken > 0:
        if s.taken[s.q[s.qh + ntaken - 1]]:
            # the admitted requests are the head of the queue
            s.qh += ntaken
            for i in range(s.qh - ntaken, s.qh):
                s.taken[s.q[i]] = 0
        else:
            j = s.qh
            for i in range(s.qh, s.qt):
                if s.taken[s.q[i]]:
                    s.taken[s.q[i]] = 0
                else:
                    s.q[j] = s.q[i]
                    j += 1
            s.qt = j


cdef void _run_extend(Sim *s) noexcept nogil:
    cdef i64 a, rid, e, tokens = 0
    cdef double pairs = 0.0, t_start
    cdef bint reset_full = s.bs == 0
    for a in range(s.nadm):
        e = s.adm_e[a]
        tokens += e
        pairs += <double> e * (<double> s.adm_p[a] + <double> (e + 1) / 2.0)
        if s.chunk >= 0 and s.adm_id[a] == s.chunk:
            reset_full = True
    t_start = s.t
    _advance(s, _step_time(s, tokens, pairs, 0, 0))
    s.pool -= tokens
    for a in range(s.nadm):
        rid = s.adm_id[a]
        if rid == s.cand and s.queue_s == INFINITY:
            s.queue_s = t_start
        if not s.adm_c[a]:
            continue
        s.out[rid] += 1
        if rid == s.cand:
            s.ttft = s.t
        if s.out[rid] >= s.tgt[rid]:
            e = s.inp[rid] + s.out[rid] - 1 - s.pre[rid]
            s.pool += e if e > 0 else 0
            reset_full = True
            if rid == s.cand:
                s.e2e = s.t
                s.done = True
        else:
            _join(s, rid)
    if reset_full:
        s.batch_full = False


# ------------------------------------------------------------------------------ decode
cdef int _rkey_cmp(const void *pa, const void *pb) noexcept nogil:
    cdef const RKey *a = <const RKey*> pa
    cdef const RKey *b = <const RKey*> pb
    if a.neg_out != b.neg_out:
        return -1 if a.neg_out < b.neg_out else 1
    if a.inp != b.inp:
        return -1 if a.inp < b.inp else 1
    if a.seq != b.seq:
        return -1 if a.seq < b.seq else 1
    return 0


cdef void _retract(Sim *s) noexcept nogil:
    """ScheduleBatch.retract_decode (see the twin)."""
    cdef i64 i, rid, m = 0, nret = 0, aborted = -1, sum_out = 0, sum_mx = 0
    cdef bint first_iter = True
    # the sorted list and the heap hold exactly the running requests
    for i in range(s.hn + s.sn - s.sp):
        rid = s.heap[i].id if i < s.hn else s.srt[s.sp + i - s.hn].id
        s.order[m].neg_out = -(s.out[rid] + s.D - s.d0[rid])
        s.order[m].inp = s.inp[rid]
        s.order[m].seq = s.seq[rid]
        s.order[m].rid = rid
        m += 1
    qsort(s.order, m, sizeof(RKey), _rkey_cmp)
    # retracted ids are parked in adm_id (free between steps)
    while first_iter or not s.pool >= m:
        if m == 1:
            break
        first_iter = False
        m -= 1
        rid = s.order[m].rid
        s.pool += _held(s, rid)
        s.adm_id[nret] = rid
        nret += 1
    if m <= 1 and not s.pool >= m:
        m -= 1
        aborted = s.order[m].rid
        s.pool += _held(s, aborted)
    for i in range(nret):
        _leave(s, s.adm_id[i])
    if aborted >= 0:
        _leave(s, aborted)
    if nret > 0 or aborted >= 0:   # everyone left goes to the heap
        s.sp = 0
        s.sn = 0
        s.hn = 0
        for i in range(m):
            rid = s.order[i].rid
            s.heap[s.hn].k = s.d0[rid] + s.tgt[rid] - s.out[rid]
            s.heap[s.hn].id = rid
            s.hn += 1
        _heapify(s)
    for i in range(m):
        rid = s.order[i].rid
        sum_out += s.out[rid] + s.D - s.d0[rid]
        sum_mx += s.mx[rid]
    s.ratio_base = <double> (sum_out + s.retract_steps * m) / <double> (sum_mx + 1)
    if not s.ratio_base < 1.0:
        s.ratio_base = 1.0
    s.ndecay = 0
    for i in range(nret):
        rid = s.adm_id[i]
        if s.pre[rid] > s.inp[rid] + s.out[rid] - 1:
            s.pre[rid] = s.inp[rid] + s.out[rid] - 1
        _queue_append(s, rid)
    s.needs_sort = True
    s.batch_full = False
    if aborted == s.cand:
        s.done = True


cdef void _run_decode(Sim *s, i64 k) noexcept nogil:
    cdef i64 ctx = s.ctx_base + s.bs * s.D
    _advance(s, _decode_run_time(s, k, s.bs, ctx))
    s.pool -= k * s.bs
    s.D += k
    _finish_running(s)


cdef i64 _decode_jump_len(Sim *s) noexcept nogil:
    cdef i64 a, b
    if s.step_by_step or s.chunk >= 0:
        return 0
    if s.bs == 0:
        return 0
    if s.bs >= s.max_running:
        s.batch_full = True
    if not (s.batch_full or s.qt == s.qh):
        return 0
    a = _next_finish(s) - s.D
    if s.pool >= a * s.bs:      # enough KV for all a steps: skip the division
        return a
    b = s.pool // s.bs
    return a if a < b else b


# ------------------------------------------------------------------------------ arrivals
cdef inline double _arrival_time(Sim *s, i64 i) noexcept nogil:
    """Arrival ``i`` (id n_snapshot + i): the pending requests, the candidate, the future ones."""
    cdef double t
    if i < s.n_pend:
        if s.pend_t == NULL:
            return 0.0
        t = s.pend_t[i]
        return t if t <= s.elapsed else s.elapsed
    if i == s.n_pend:
        return s.elapsed
    return s.elapsed + s.fut_t[i - s.n_pend - 1]


cdef void _arrive(Sim *s) noexcept nogil:
    while s.fi < s.nf and _arrival_time(s, s.fi) <= s.t:
        _queue_append(s, s.n_snapshot + s.fi)
        s.fi += 1
        s.needs_sort = True


cdef i64 _jump_until_arrival(Sim *s, i64 k) noexcept nogil:
    cdef i64 ctx, lo, hi, mid
    cdef double arrival
    if s.fi >= s.nf:
        return k
    arrival = _arrival_time(s, s.fi)
    ctx = s.ctx_base + s.bs * s.D
    if s.t + _decode_run_time(s, k, s.bs, ctx) < arrival:
        return k
    lo = 1
    hi = k
    while lo < hi:
        mid = (lo + hi) // 2
        if s.t + _decode_run_time(s, mid, s.bs, ctx) >= arrival:
            hi = mid
        else:
            lo = mid + 1
    return lo


cdef void _run(Sim *s) noexcept nogil:
    cdef i64 k
    cdef double arrival
    while not s.done:
        _arrive(s)
        k = _decode_jump_len(s)
        if k >= 1:
            k = _jump_until_arrival(s, k)
            s.ndecay += k
            _run_decode(s, k)
        else:
            _admit(s)
            if s.nadm > 0:
                _run_extend(s)
            elif s.bs > 0:
                if s.pool < s.bs:
                    _retract(s)
                else:
                    s.ndecay += 1
                if s.bs > 0 and not s.done:
                    _run_decode(s, 1)
            elif s.fi < s.nf:
                arrival = _arrival_time(s, s.fi)
                if arrival > s.t:   # idle until it arrives
                    s.t = arrival
            else:
                break   # nothing can ever run: the candidate waits forever
    # from the candidate's arrival (inf stays inf)
    s.ttft -= s.elapsed
    s.e2e -= s.elapsed
    s.queue_s -= s.elapsed


# ------------------------------------------------------------------------------ Python edge
cdef struct Inputs:
    const i64 *run
    const i64 *wait
    const i64 *pend
    const i64 *iscal
    const double *fscal
    const double *coeffs
    const i64 *cand
    const i64 *fut
    const double *fut_t
    const double *pend_t
    i64 n_run, n_wait, n_pend, n_fut


cdef int _array(cnp.ndarray a, str name, int type_num, int ndim, Py_ssize_t rows,
                const void **data, i64 *n) except -1:
    """Check dtype / layout / shape; ``ValueError`` naming the argument otherwise."""
    if (cnp.PyArray_TYPE(a) != type_num or cnp.PyArray_NDIM(a) != ndim
            or not cnp.PyArray_IS_C_CONTIGUOUS(a) or not cnp.PyArray_ISBEHAVED_RO(a)
            or cnp.PyArray_DIMS(a)[0] != rows):
        kind = "int64" if type_num == cnp.NPY_INT64 else "float64"
        shape = f"({rows}, n)" if ndim == 2 else f"({rows},)"
        raise ValueError(f"{name} must be a C-contiguous native {kind} array of shape {shape}, "
                         f"got dtype {(<object> a).dtype}, shape {(<object> a).shape}")
    data[0] = cnp.PyArray_DATA(a)
    n[0] = cnp.PyArray_DIMS(a)[1] if ndim == 2 else cnp.PyArray_DIMS(a)[0]
    return 0


cdef bint _table_ok(const i64 *t, i64 n) noexcept nogil:
    cdef i64 i, inp, pre, out, mx, ieos
    for i in range(n):
        inp = t[R_INPUT * n + i]
        pre = t[R_PREFIX * n + i]
        out = t[R_OUTPUT * n + i]
        mx = t[R_MAX_NEW * n + i]
        ieos = t[R_IGNORE_EOS * n + i]
        if (inp < 1 or pre < 0 or out < 0 or mx < 1 or (ieos != 0 and ieos != 1)
                or t[R_PRED * n + i] < 1 or pre > inp + out or out > mx):
            return False
    return True


cdef bint _future_ok(Inputs *a) noexcept nogil:
    """The future requests: valid rows, no output yet, finite non-decreasing times >= 0."""
    cdef i64 i
    cdef double previous = 0.0, t
    for i in range(a.n_fut):
        t = a.fut_t[i]
        if not (t >= previous and t < INFINITY) or a.fut[R_OUTPUT * a.n_fut + i] != 0:
            return False
        previous = t
    return _table_ok(a.fut, a.n_fut)


cdef bint _pending_times_ok(Inputs *a) noexcept nogil:
    """Finite non-decreasing times >= 0 (or none given)."""
    cdef i64 i
    cdef double previous = 0.0, t
    if a.pend_t == NULL:
        return True
    for i in range(a.n_pend):
        t = a.pend_t[i]
        if not (t >= previous and t < INFINITY):
            return False
        previous = t
    return True


cdef bint _tables_ok(Inputs *a) noexcept nogil:
    return (_table_ok(a.run, a.n_run) and _table_ok(a.wait, a.n_wait)
            and _table_ok(a.pend, a.n_pend) and _future_ok(a))


cdef bint _inputs_ok(Inputs *a) noexcept nogil:
    """Everything but the request tables (``_init`` checks those while loading them)."""
    cdef i64 k, page, ci, fill, done
    cdef const i64 *iscal = a.iscal
    cdef const i64 *cand = a.cand
    cdef double v
    for k in range(N_COEFFS):
        v = a.coeffs[k]
        if not (v >= 0.0 and v < INFINITY):
            return False
    for k in range(N_FSCAL):
        v = a.fscal[k]
        if not (v >= 0.0 and v < INFINITY):
            return False
    if a.fscal[F_RATIO] > 1.0 or a.fscal[F_INIT_RATIO] > 1.0 or a.fscal[F_MIN_RATIO] > 1.0:
        return False
    page = iscal[I_PAGE]
    if (page < 1 or iscal[I_MAX_TOTAL] < 1 or iscal[I_FREE] < 0 or iscal[I_EVICTABLE] < 0
            or iscal[I_FREE] + iscal[I_EVICTABLE] > iscal[I_MAX_TOTAL]
            or iscal[I_MAX_RUNNING] < 1 or (0 < iscal[I_CHUNK] < page)
            or iscal[I_MAX_PREFILL] < 1 or (iscal[I_POLICY] != 0 and iscal[I_POLICY] != 1)):
        return False
    ci = iscal[I_CHUNKED_IDX]
    if ci < -1 or ci >= a.n_wait:
        return False
    if ci >= 0:
        if iscal[I_CHUNK] <= 0:
            return False
        fill = a.wait[R_INPUT * a.n_wait + ci] + a.wait[R_OUTPUT * a.n_wait + ci]
        done = iscal[I_CHUNKED_DONE]
        if done < a.wait[R_PREFIX * a.n_wait + ci] or done >= fill:
            return False
    if ((iscal[I_BATCH_FULL] != 0 and iscal[I_BATCH_FULL] != 1) or iscal[I_CLIP] < 1
            or iscal[I_RETRACT_STEPS] < 0):
        return False
    if (cand[C_INPUT] < 1 or cand[C_PREFIX] < 0 or cand[C_PREFIX] > cand[C_INPUT]
            or cand[C_PRED] < 1 or cand[C_MAX_NEW] < 1
            or (cand[C_IGNORE_EOS] != 0 and cand[C_IGNORE_EOS] != 1)):
        return False
    return True


cdef int _raise_invalid(args) except -1:
    # the specification words the message, so both implementations say the same thing
    from block_sgl._fastsim_py import validate
    validate(*args)
    raise ValueError("invalid fastsim input")  # unreachable while both checks agree


cdef bint _load_table(Sim *s, const i64 *t, i64 n, i64 base, bint running,
                      bint enqueue=True) noexcept nogil:
    """Validate (as ``_table_ok``) and load one table; running requests join the batch, the
    others the waiting queue (unless ``enqueue`` is false: the future requests)."""
    cdef i64 i, rid, inp, pre, out, mx, ieos, pred, m, bad = 0
    cdef i64 *s_inp = s.inp + base
    cdef i64 *s_pre = s.pre + base
    cdef i64 *s_out = s.out + base
    cdef i64 *s_mx = s.mx + base
    cdef i64 *s_ieos = s.ieos + base
    cdef i64 *s_tgt = s.tgt + base
    cdef HE *heap = s.srt + base
    cdef i64 ctx = 0, clip = s.clip
    for i in range(n):
        inp = t[R_INPUT * n + i]
        pre = t[R_PREFIX * n + i]
        out = t[R_OUTPUT * n + i]
        mx = t[R_MAX_NEW * n + i]
        ieos = t[R_IGNORE_EOS * n + i]
        pred = t[R_PRED * n + i]
        # inp, mx, pred >= 1; pre, out >= 0; ieos in {0, 1}; pre <= inp + out; out <= mx
        bad |= ((((inp - 1) | (mx - 1) | (pred - 1) | pre | out) < 0)
                | (<unsigned long long> ieos > 1) | (pre > inp + out) | (out > mx))
        if mx < pred:
            pred = mx
        if pred < out + 1:
            pred = out + 1
        s_inp[i] = inp
        s_out[i] = out
        s_mx[i] = mx
        s_ieos[i] = ieos & 1
        s_tgt[i] = pred
        if running:   # _join at D = 0; the heap is built once afterwards
            s_pre[i] = pre
            heap[i].k = pred - out
            heap[i].id = i
            ctx += inp + out
            m = mx - out
            s.sum_m[ieos & 1] += m
            s.cnt[ieos & 1] += 1
            if m > clip:
                rid = base + i
                s.bigpos[rid] = s.nbig
                s.big[s.nbig] = rid
                s.nbig += 1
        else:         # a match never covers the last token (Req._compute_max_prefix_len)
            s_pre[i] = pre if pre < inp + out else inp + out - 1
    s.ctx_base += ctx
    if running:
        for i in range(n):
            s.running[i] = 1
            s.seq[i] = i
            s.d0[i] = 0
    elif enqueue:
        for i in range(base, base + n):
            if i != s.chunk:
                s.q[s.qt] = i
                s.qt += 1
    return bad == 0


cdef bint _init(Sim *s, Inputs *a, i64 *buf, bint step_by_step) noexcept nogil:
    """Load the inputs into ``s`` (scratch in ``buf``); False if a request table is invalid."""
    cdef const i64 *iscal = a.iscal
    cdef const i64 *cand = a.cand
    cdef i64 n_run = a.n_run, n = a.n_run + a.n_wait + a.n_pend + 1 + a.n_fut, c, pred
    _layout(s, buf, n)
    s.c0 = a.coeffs[0]
    s.c1 = a.coeffs[1]
    s.c2 = a.coeffs[2]
    s.c3 = a.coeffs[3]
    s.c4 = a.coeffs[4]
    s.page = iscal[I_PAGE]
    s.max_running = iscal[I_MAX_RUNNING]
    s.chunk_size = iscal[I_CHUNK] if iscal[I_CHUNK] > 0 else 0
    s.max_prefill = iscal[I_MAX_PREFILL]
    s.lpm = iscal[I_POLICY] == POLICY_LPM
    s.clip = iscal[I_CLIP]
    s.retract_steps = iscal[I_RETRACT_STEPS]
    s.ratio_base = a.fscal[F_RATIO]
    s.ndecay = 0
    s.min_ratio = a.fscal[F_MIN_RATIO]
    s.decay = a.fscal[F_DECAY]
    s.elapsed = a.fscal[F_ELAPSED]
    s.step_by_step = step_by_step
    s.pool = iscal[I_FREE] + iscal[I_EVICTABLE]
    s.D = 0
    s.t = 0.0
    s.batch_full = iscal[I_BATCH_FULL] == 1
    s.bs = n_run
    s.hn = 0
    s.sp = 0
    s.sn = n_run
    s.ctx_base = 0
    s.sum_m[0] = 0
    s.sum_m[1] = 0
    s.cnt[0] = 0
    s.cnt[1] = 0
    s.nbig = 0
    s.next_seq = n_run
    s.nadm = 0
    s.n = n
    s.cand = n - 1 - a.n_fut
    s.fut_t = a.fut_t
    s.pend_t = a.pend_t
    s.n_pend = a.n_pend
    s.fi = 0
    s.nf = a.n_pend + 1 + a.n_fut
    s.n_snapshot = n_run + a.n_wait
    s.chunk = n_run + iscal[I_CHUNKED_IDX] if iscal[I_CHUNKED_IDX] >= 0 else -1
    s.chunk_done = iscal[I_CHUNKED_DONE]
    s.qh = 0
    s.qt = 0
    memset(s.bigpos, 0xFF, n * sizeof(i64))   # -1
    memset(s.running, 0, n * sizeof(i64))
    memset(s.taken, 0, n * sizeof(i64))
    if not (_load_table(s, a.run, n_run, 0, True)
            and _load_table(s, a.wait, a.n_wait, n_run, False)
            and _load_table(s, a.pend, a.n_pend, n_run + a.n_wait, False, False)
            and _load_table(s, a.fut, a.n_fut, s.cand + 1, False, False)):
        return False
    _radix_sort(s.srt, s.tmp, n_run)
    c = s.cand
    s.inp[c] = cand[C_INPUT]
    s.pre[c] = cand[C_PREFIX] if cand[C_PREFIX] < cand[C_INPUT] else cand[C_INPUT] - 1
    s.out[c] = 0
    s.mx[c] = cand[C_MAX_NEW]
    s.ieos[c] = cand[C_IGNORE_EOS]
    pred = cand[C_PRED] if cand[C_PRED] < cand[C_MAX_NEW] else cand[C_MAX_NEW]
    s.tgt[c] = pred if pred > 1 else 1
    s.needs_sort = True
    s.ttft = INFINITY
    s.e2e = INFINITY
    s.queue_s = INFINITY
    s.done = False
    return True


cdef int _inputs(Inputs *a, cnp.ndarray running, cnp.ndarray waiting, cnp.ndarray pending,
                 cnp.ndarray iscal, cnp.ndarray fscal, cnp.ndarray coeffs,
                 cnp.ndarray cand, object future=None, object future_t=None,
                 object pending_t=None) except -1:
    cdef i64 n
    if (future is None) != (future_t is None):
        raise ValueError("give both future and future_t, or neither")
    if future is None:
        a.fut = NULL
        a.fut_t = NULL
        a.n_fut = 0
    else:
        _array(future, "future", cnp.NPY_INT64, 2, N_FIELDS, <const void**> &a.fut, &a.n_fut)
        _array(future_t, "future_t", cnp.NPY_FLOAT64, 1, a.n_fut, <const void**> &a.fut_t, &n)
    _array(running, "running", cnp.NPY_INT64, 2, N_FIELDS, <const void**> &a.run, &a.n_run)
    _array(waiting, "waiting", cnp.NPY_INT64, 2, N_FIELDS, <const void**> &a.wait, &a.n_wait)
    _array(pending, "pending", cnp.NPY_INT64, 2, N_FIELDS, <const void**> &a.pend, &a.n_pend)
    if pending_t is None:
        a.pend_t = NULL
    else:
        _array(pending_t, "pending_t", cnp.NPY_FLOAT64, 1, a.n_pend,
               <const void**> &a.pend_t, &n)
    _array(iscal, "iscal", cnp.NPY_INT64, 1, N_ISCAL, <const void**> &a.iscal, &n)
    _array(fscal, "fscal", cnp.NPY_FLOAT64, 1, N_FSCAL, <const void**> &a.fscal, &n)
    _array(coeffs, "step model coefficients", cnp.NPY_FLOAT64, 1, N_COEFFS,
           <const void**> &a.coeffs, &n)
    _array(cand, "candidate", cnp.NPY_INT64, 1, N_CAND, <const void**> &a.cand, &n)
    if not _inputs_ok(a) or (a.n_fut and not _future_ok(a)) or not _pending_times_ok(a):
        _raise_invalid((running, waiting, pending, iscal, fscal, coeffs, cand,
                        None if future is None else (future, future_t), pending_t))
    return 0


def simulate(cnp.ndarray running not None, cnp.ndarray waiting not None,
             cnp.ndarray pending not None, cnp.ndarray iscal not None,
             cnp.ndarray fscal not None, cnp.ndarray coeffs not None, cnp.ndarray cand not None,
             Workspace workspace=None, bint step_by_step=False, future=None, future_t=None,
             pending_t=None):
    """Predict ``(ttft_s, e2e_s, queue_s)`` of ``cand`` on one instance (``inf``: never).

    Arrays as documented in ``block_sgl/_fastsim_py.py``: ``running``/``waiting``/``pending``
    int64 ``(6, n)`` C-contiguous, ``iscal`` int64 ``(13,)``, ``fscal`` float64 ``(5,)``,
    ``coeffs`` float64 ``(5,)`` (``StepModel.as_array()``), ``cand`` int64 ``(5,)``;
    optionally ``future`` int64 ``(6, m)`` with ``future_t`` float64 ``(m,)`` (expected
    arrivals after the candidate's) and ``pending_t`` float64 ``(p,)`` (when each pending
    request arrives, from the snapshot). Times returned count from the candidate's arrival
    (``elapsed_s`` after the snapshot). ``workspace``: a reusable ``Workspace`` (saves an
    allocation per call).
    """
    cdef Sim s
    cdef Inputs a
    cdef i64 n
    cdef i64 *buf
    cdef bint own = workspace is None, ok
    _inputs(&a, running, waiting, pending, iscal, fscal, coeffs, cand, future, future_t,
            pending_t)
    n = a.n_run + a.n_wait + a.n_pend + 1 + a.n_fut
    if own:
        buf = <i64*> malloc(SLOTS * n * sizeof(i64))
        if buf == NULL:
            raise MemoryError()
    else:
        buf = workspace.ensure(SLOTS * n)
    with nogil:
        ok = _init(&s, &a, buf, step_by_step)
        if ok:
            _run(&s)
        if own:
            free(buf)
    if not ok:
        _raise_invalid((running, waiting, pending, iscal, fscal, coeffs, cand,
                        None if future is None else (future, future_t), pending_t))
    return (s.ttft, s.e2e, s.queue_s)


def simulate_many(list states, list cands, list coeffs, double[:, ::1] out not None,
                  Workspace workspace=None):
    """``simulate`` over K instances; ``states[i]`` = ``(running, waiting, pending, iscal,
    fscal)``, optionally followed by ``future, future_t`` (each may be None) and then
    ``pending_t``; ``cands[i]`` / ``coeffs[i]`` its
    candidate and step model; fills ``out[i] = (ttft_s, e2e_s, queue_s)``. All inputs are
    validated before any simulation runs."""
    cdef Py_ssize_t k = len(states), i
    cdef Sim s
    cdef Inputs *a
    cdef i64 n, n_max = 0
    cdef i64 *buf
    cdef tuple st
    if len(cands) != k or len(coeffs) != k or out.shape[0] != k or out.shape[1] != 3:
        raise ValueError(f"got {k} states, {len(cands)} candidates, {len(coeffs)} step models "
                         f"and out of shape {tuple(out.shape)[:2]}: need K each and (K, 3)")
    if workspace is None:
        workspace = Workspace()
    a = <Inputs*> malloc((k + 1) * sizeof(Inputs))
    if a == NULL:
        raise MemoryError()
    try:
        for i in range(k):
            st = states[i]
            if len(st) == 5:
                _inputs(&a[i], st[0], st[1], st[2], st[3], st[4], coeffs[i], cands[i])
            elif len(st) == 7:
                _inputs(&a[i], st[0], st[1], st[2], st[3], st[4], coeffs[i], cands[i], st[5],
                        st[6])
            elif len(st) == 8:
                _inputs(&a[i], st[0], st[1], st[2], st[3], st[4], coeffs[i], cands[i], st[5],
                        st[6], st[7])
            else:
                raise ValueError(f"states[{i}] must have 5, 7 or 8 arrays, got {len(st)}")
            if not _tables_ok(&a[i]):
                _raise_invalid((st[0], st[1], st[2], st[3], st[4], coeffs[i], cands[i],
                                (st[5], st[6]) if len(st) >= 7 and st[5] is not None
                                else None, st[7] if len(st) == 8 else None))
            n = a[i].n_run + a[i].n_wait + a[i].n_pend + 1 + a[i].n_fut
            if n > n_max:
                n_max = n
        buf = workspace.ensure(SLOTS * n_max)
        with nogil:
            for i in range(k):
                _init(&s, &a[i], buf, False)
                _run(&s)
                out[i, 0] = s.ttft
                out[i, 1] = s.e2e
                out[i, 2] = s.queue_s
    finally:
        free(a)
    return out.base


def compiled():
    """True: this is the compiled kernel (the twin has no such function)."""
    return True
