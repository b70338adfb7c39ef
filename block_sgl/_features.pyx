# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, nonecheck=False
"""Compiled response-length inference: the prompt featurizer and the tree walk of
``block_sgl.predictor`` in C.

Specifications (same results, bit for bit; the unit tests compare them on random prompts):

* ``FeatureKernel.analyze`` is ``PurePromptFeaturizer._analyze`` and ``FeatureKernel.row`` is
  ``PurePromptFeaturizer.transform_row`` (``block_sgl.predictor.features``);
* ``TreeKernel.predict2`` is the generated Python code of ``TreeEnsemble`` (``predict2_python``,
  ``block_sgl.predictor.length``).

Why compiled: the router predicts the response length of every request on its critical path.
In Python the featurizer costs a few dozen bytes-method calls, one dict lookup per n-gram word,
three numpy calls (gather and sum the n-gram weights) and a Python loop over the digits; the
trees cost one Python conditional per visited node. Here one pass over the window bytes does
every count, word hashes are zlib's crc32 (the function ``zlib.crc32`` calls), and the weight
rows are summed in a C loop. Costs: ``block_sgl/predictor/README.md``.

Exactness: every feature is computed in double as the Python code computes it, then cast to
float32 (what ``array('f')`` does). The n-gram scores are float32 sums in n-gram order starting
from 0 (what numpy's ``take(...).sum(axis=0)`` does on a C-contiguous (n, targets) float32
block: one row added at a time), times ``float32(1 / sqrt(n))`` in float32 (numpy's rule for a
Python float times a float32 array). ``setup.py`` compiles this file with
``-ffp-contract=off`` so that no multiply-add is fused.

Inputs the fast path does not read itself are handed to the specification: prompts other than
a ``str`` or a ``list``/``tuple`` of plain dicts with ``str`` content go through the Python
``_texts``; texts that are not exact ``str`` (subclasses may override ``count``, ``len``, ...)
go through ``PurePromptFeaturizer._analyze_texts``. Both return what the Python featurizer
returns, since they are its own code.
"""

from cpython.array cimport array, clone
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.complex cimport PyComplex_FromDoubles
from cpython.float cimport PyFloat_AS_DOUBLE
from cpython.list cimport PyList_GET_ITEM, PyList_GET_SIZE
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from cpython.number cimport PyNumber_Float
from libc.math cimport log1p, sqrt
from libc.stdint cimport int64_t, uint8_t, uint64_t
from libc.string cimport memchr, memcpy

cdef extern from "Python.h":
    const Py_ssize_t PY_SSIZE_T_MAX
    bint PyUnicode_IS_ASCII(object o)
    int PyUnicode_READY(object o) except -1
    void *PyUnicode_DATA(object o)
    Py_ssize_t PyUnicode_GET_LENGTH(object o)
    object PyUnicode_AsEncodedString(object o, const char *encoding, const char *errors)
    Py_ssize_t PyUnicode_Count(object s, object sub, Py_ssize_t start, Py_ssize_t end) except -1
    object PyUnicode_Substring(object s, Py_ssize_t start, Py_ssize_t end)
    int PyUnicode_KIND(object o)
    int PyUnicode_1BYTE_KIND

cdef extern from *:
    """
    #if defined(__GNUC__) || defined(__clang__)
    #define block_sgl_prefetch(p) __builtin_prefetch(p)
    #else
    #define block_sgl_prefetch(p) ((void)(p))
    #endif
    """
    void block_sgl_prefetch(const void *p) noexcept nogil

cdef extern from "zlib.h" nogil:
    unsigned long crc32(unsigned long crc, const unsigned char *buf, unsigned int length)

cdef enum:
    # The dense features, in the order of ``features.DENSE_FEATURES`` (checked at construction).
    N_DENSE = 26
    # Byte classes of the window's ratio features: digits, A-Z, code characters, "?"
    OTHER = 0
    DIGIT = 1
    UPPER = 2
    CODE = 3
    QUESTION = 4
    N_CLASSES = 5

# Config sizes above this are refused (they would overflow the C size arithmetic; real configs
# are a few hundred characters or words).
MAX_CONFIG_SIZE = 1 << 40
cdef uint8_t _BYTE_CLASS[256]
for _c in range(256):
    _BYTE_CLASS[_c] = (DIGIT if 48 <= _c <= 57 else UPPER if 65 <= _c <= 90
                       else CODE if bytes([_c]) in b"{}();=<>[]" else QUESTION if _c == 63
                       else OTHER)


# ``bytes.split`` / ``bytes.rstrip`` whitespace (Py_ISSPACE on bytes)
cdef inline bint _is_space(uint8_t c) noexcept nogil:
    return c == 32 or (9 <= c <= 13)


cdef inline bint _is_alnum(uint8_t c) noexcept nogil:
    return (48 <= c <= 57) or (65 <= c <= 90) or (97 <= c <= 122)


cdef inline uint64_t _crc32(const uint8_t *data, Py_ssize_t n) noexcept nogil:
    """``zlib.crc32(data)``: zlib's crc32, fed in chunks that fit its ``unsigned int`` length."""
    cdef unsigned long crc = 0
    cdef Py_ssize_t chunk
    while n > 0:
        chunk = n if n < 0x40000000 else 0x40000000
        crc = crc32(crc, data, <unsigned int>chunk)
        data += chunk
        n -= chunk
    return <uint64_t>(crc & 0xFFFFFFFFUL)


cdef Py_ssize_t _count_newlines(str s) except -1:
    """``s.count("\\n")``: memchr over one-byte-per-character strings (ASCII, Latin-1),
    CPython's own count otherwise (which was the kernel's largest cost in a profile, 14 %)."""
    cdef const char *p
    cdef const char *end
    cdef Py_ssize_t n = 0
    if PyUnicode_KIND(s) != PyUnicode_1BYTE_KIND:
        return PyUnicode_Count(s, "\n", 0, PY_SSIZE_T_MAX)
    p = <const char *>PyUnicode_DATA(s)
    end = p + PyUnicode_GET_LENGTH(s)
    while True:
        p = <const char *>memchr(p, 10, end - p)
        if p == NULL:
            return n
        n += 1
        p += 1


cdef Py_ssize_t _count_fences(str s) except -1:
    """``s.count("```")`` (non-overlapping, left to right), as ``_count_newlines``."""
    cdef const char *p
    cdef const char *end
    cdef Py_ssize_t n = 0
    if PyUnicode_KIND(s) != PyUnicode_1BYTE_KIND:
        return PyUnicode_Count(s, "```", 0, PY_SSIZE_T_MAX)
    p = <const char *>PyUnicode_DATA(s)
    end = p + PyUnicode_GET_LENGTH(s)
    while True:
        p = <const char *>memchr(p, 96, end - p)
        if p == NULL or end - p < 3:
            return n
        if p[1] == 96 and p[2] == 96:
            n += 1
            p += 3
        else:
            p += 1


cdef Py_ssize_t _split(const uint8_t *t, Py_ssize_t lo, Py_ssize_t hi, Py_ssize_t *starts,
                       Py_ssize_t *lens, Py_ssize_t max_words) noexcept nogil:
    """``t[lo:hi].split()[:max_words]`` as (start, length) spans into ``t``; returns the count."""
    cdef Py_ssize_t i = lo, n = 0, s
    while i < hi and n < max_words:
        while i < hi and _is_space(t[i]):
            i += 1
        if i >= hi:
            break
        s = i
        while i < hi and not _is_space(t[i]):
            i += 1
        starts[n] = s
        lens[n] = i - s
        n += 1
    return n


cdef inline Py_ssize_t _tail_count(Py_ssize_t n, Py_ssize_t k) noexcept nogil:
    """How many items ``lst[-k:]`` keeps of ``n`` (``k == 0`` keeps them all: ``lst[-0:]``)."""
    if k == 0 or k >= n:
        return n
    return k


cdef inline bint _is_digits(const uint8_t *w, Py_ssize_t n) noexcept nogil:
    """``bytes.isdigit`` (ASCII digits, non-empty)."""
    cdef Py_ssize_t i
    if n == 0:
        return False
    for i in range(n):
        if not (48 <= w[i] <= 57):
            return False
    return True


cdef struct Words:
    # (start, length) spans into a translated buffer
    Py_ssize_t *starts
    Py_ssize_t *lens
    Py_ssize_t n


cdef struct Analysis:
    double dense[N_DENSE]
    bint n_words_is_float  # the Python code's window_words is an int unless estimated
    uint64_t *grams
    Py_ssize_t n_grams
    void *block  # the scratch memory grams point into (the caller frees it)


cdef inline void _copy_words(Words *dst, const Words *src, Py_ssize_t lo,
                             Py_ssize_t hi) noexcept nogil:
    """Append ``src[lo:hi]`` to ``dst``."""
    cdef Py_ssize_t i
    for i in range(lo, hi):
        dst.starts[dst.n] = src.starts[i]
        dst.lens[dst.n] = src.lens[i]
        dst.n += 1


cdef class FeatureKernel:
    """One ``PurePromptFeaturizer``'s per-prompt work in C. Built from the featurizer and its
    specification module (``block_sgl.predictor.features``): the config, the n-gram weights,
    the word tables and the hash seeds are read from them, so each constant has one source."""

    cdef:
        Py_ssize_t head_chars, tail_chars, head_words, tail_words
        Py_ssize_t context_chars, context_words
        bint has_grams
        uint64_t mask
        Py_ssize_t n_scores, n_features
        object weights_array
        const float *weights  # (buckets, n_scores) C-contiguous, or NULL: no scores
        uint8_t word_table[256]
        dict word_units
        frozenset count_units
        Py_ssize_t max_unit_len
        object texts_of_prompt
        object pure_analyze_texts
        uint64_t bigram_mul, f1, f2, f3, l2, pc, bias_gram, context_gram
        array row_template

    def __init__(self, featurizer, spec):
        cdef Py_ssize_t i
        cdef const float[:, ::1] wview
        if len(spec.DENSE_FEATURES) != N_DENSE:
            raise ValueError(f"block_sgl._features computes {N_DENSE} dense features, the "
                             f"specification {len(spec.DENSE_FEATURES)}: rebuild it")
        cfg = featurizer.config
        for name in ("head_chars", "tail_chars", "head_words", "tail_words", "context_chars",
                     "context_words"):
            value = getattr(cfg, name)
            if isinstance(value, bool) or not isinstance(value, int) or not (
                    0 <= value <= MAX_CONFIG_SIZE):
                raise ValueError(f"feature config field {name!r} must be an int in [0, "
                                 f"{MAX_CONFIG_SIZE}] for the compiled featurizer, got {value!r}")
        self.head_chars, self.tail_chars = cfg.head_chars, cfg.tail_chars
        self.head_words, self.tail_words = cfg.head_words, cfg.tail_words
        self.context_chars, self.context_words = cfg.context_chars, cfg.context_words
        buckets = featurizer.n_gram_buckets
        self.has_grams = buckets > 0
        # grams are < 2 ** 57 (a 32-bit hash times a 25-bit multiplier): a mask of 64 bits or
        # more keeps them whole, as Python's unbounded mask does
        self.mask = <uint64_t>(buckets - 1) if 0 < buckets <= (1 << 63) else <uint64_t>-1
        self.n_scores = featurizer.n_gram_scores
        self.n_features = featurizer.n_features
        if self.n_features != N_DENSE + self.n_scores:
            raise ValueError(f"featurizer has {self.n_features} features, expected "
                             f"{N_DENSE} + {self.n_scores}")
        self.weights = NULL
        w = featurizer._weights
        if w is not None:
            wview = w
            if wview.shape[0] != buckets or wview.shape[1] != self.n_scores:
                raise ValueError(f"gram weights of shape {tuple(w.shape)}, expected "
                                 f"({buckets}, {self.n_scores})")
            self.weights_array = w  # keeps the buffer alive
            self.weights = &wview[0, 0]
        table = spec._WORD_BYTES_TABLE
        if not isinstance(table, bytes) or len(table) != 256:
            raise ValueError("the word byte table must be 256 bytes")
        for i in range(256):
            self.word_table[i] = table[i]
        self.word_units = dict(spec._WORD_UNITS)
        self.count_units = frozenset(spec._COUNT_UNITS)
        units = list(self.word_units) + list(self.count_units)
        if not all(type(u) is bytes for u in units) or not all(
                type(v) is float for v in self.word_units.values()):
            raise ValueError("the unit tables must hold bytes (and map them to floats)")
        self.max_unit_len = max(map(len, units), default=0)
        self.texts_of_prompt = spec._texts
        self.pure_analyze_texts = spec.PurePromptFeaturizer._analyze_texts.__get__(featurizer)
        self.bigram_mul = spec._BIGRAM_MUL
        self.f1, self.f2, self.f3, self.l2 = spec._F1, spec._F2, spec._F3, spec._L2
        self.pc, self.bias_gram, self.context_gram = spec._PC, spec._BIAS_GRAM, spec._CONTEXT_GRAM
        self.row_template = array("f")

    # -- public: the two specifications ----------------------------------------------------
    def analyze(self, prompt, prompt_tokens):
        """``PurePromptFeaturizer._analyze``: (dense features as a list, n-gram buckets)."""
        cdef list texts = self._texts(prompt)
        cdef Analysis a
        cdef Py_ssize_t i
        cdef bint is_int
        if not _all_exact_str(texts):
            return self.pure_analyze_texts(texts, prompt_tokens)
        self._analyze(texts, prompt_tokens, &a)
        try:
            feats = [None] * N_DENSE
            for i in range(N_DENSE):
                is_int = _INT_FEATURE[i] or (i == 7 and not a.n_words_is_float)
                feats[i] = int(a.dense[i]) if is_int else a.dense[i]
            grams = [a.grams[i] for i in range(a.n_grams)]
        finally:
            PyMem_Free(a.block)
        return feats, grams

    def row(self, prompt, prompt_tokens):
        """``PurePromptFeaturizer.transform_row``: the float32 features as an ``array('f')``."""
        cdef list texts = self._texts(prompt)
        cdef Analysis a
        cdef Py_ssize_t i
        cdef array out = clone(self.row_template, self.n_features, False)
        cdef float *x = out.data.as_floats
        cdef uint64_t *grams
        cdef Py_ssize_t n
        if not _all_exact_str(texts):
            feats, gram_list = self.pure_analyze_texts(texts, prompt_tokens)
            for i in range(N_DENSE):
                x[i] = <float>float(feats[i])  # what array('f', feats) does
            n = len(gram_list)
            grams = <uint64_t *>PyMem_Malloc(sizeof(uint64_t) * (n + 1))
            if grams == NULL:
                raise MemoryError()
            try:
                for i in range(n):
                    grams[i] = gram_list[i]
                self._scores(grams, n, x + N_DENSE)
            finally:
                PyMem_Free(grams)
            return out
        self._analyze(texts, prompt_tokens, &a)
        for i in range(N_DENSE):
            x[i] = <float>a.dense[i]
        self._scores(a.grams, a.n_grams, x + N_DENSE)
        PyMem_Free(a.block)
        return out

    # -- the prompt's texts ----------------------------------------------------------------
    cdef list _texts(self, prompt):
        """``features._texts(prompt)``: a plain str and lists/tuples of plain dicts with str
        content are read here, everything else by the Python function itself."""
        cdef list out
        cdef object m, c
        if type(prompt) is str:
            return [prompt]
        if type(prompt) is list or type(prompt) is tuple:
            out = []
            # Python-level iteration: a dict lookup can run Python code (a key's __eq__) that
            # changes the list, and the loop must stay within it
            for m in prompt:
                if type(m) is not dict:
                    return self.texts_of_prompt(prompt)
                c = (<dict>m).get("content")
                if c is None:
                    c = (<dict>m).get("value")
                if type(c) is not str:
                    return self.texts_of_prompt(prompt)
                out.append(c)
            return out
        return self.texts_of_prompt(prompt)

    # -- the n-gram scores -------------------------------------------------------------------
    cdef void _scores(self, const uint64_t *grams, Py_ssize_t n, float *out) noexcept:
        """The ``gram_<target>`` columns: numpy's ``weights.take(grams, 0).sum(0)`` (float32,
        row by row from 0) times ``float32(1 / sqrt(n))``; zeros without weights."""
        cdef Py_ssize_t i, k, T = self.n_scores
        cdef const float *w
        cdef float scale
        for k in range(T):
            out[k] = 0.0
        if self.weights == NULL or n == 0:
            return
        # the rows are scattered over a table of megabytes: ask for all of them first, so
        # that their cache misses overlap instead of coming one after the other
        for i in range(n):
            w = self.weights + <Py_ssize_t>grams[i] * T
            block_sgl_prefetch(w)
            block_sgl_prefetch(w + T - 1)
        for i in range(n):
            w = self.weights + <Py_ssize_t>grams[i] * T
            for k in range(T):
                out[k] = out[k] + w[k]
        scale = <float>(1.0 / sqrt(<double>n))
        for k in range(T):
            out[k] = out[k] * scale

    # -- the features ------------------------------------------------------------------------
    cdef int _analyze(self, list texts, object prompt_tokens, Analysis *a) except -1:
        """``PurePromptFeaturizer._analyze_texts`` of exact-str ``texts`` into ``a``; on success
        ``a.block`` holds scratch memory (``a.grams`` points into it) for the caller to free."""
        cdef Py_ssize_t turns = PyList_GET_SIZE(texts)
        cdef Py_ssize_t i, j, k, n, total, start
        cdef double tokens
        cdef object last, prev, t, tok, ctx = None, window, wb_obj = None, cb_obj = None
        cdef list parts
        cdef Py_ssize_t n_last, n_ctx = 0, ctx_lines = 0, ctx_fences = 0, ctx_list = 0, n_chars
        cdef const uint8_t *cb = NULL
        cdef Py_ssize_t cb_len = 0, cc = self.context_chars
        cdef bint ctx_end_alnum = False
        # texts first, then the token count, as in Python (whose error would come first)
        try:
            tok = PyNumber_Float(prompt_tokens)  # float(x), also for str and bytes
            tokens = PyFloat_AS_DOUBLE(tok)
        except (TypeError, ValueError):
            tokens = 0.0
        if not (0.0 <= tokens and tokens <= 1e9):  # NaN, negative, inf
            tokens = 1e9 if tokens >= 0.0 else 0.0
        for i in range(turns):
            PyUnicode_READY(<object>PyList_GET_ITEM(texts, i))
        last = <object>PyList_GET_ITEM(texts, turns - 1) if turns else ""
        n_last = PyUnicode_GET_LENGTH(last)
        # the context = the earlier messages joined by "\n", read without joining them all
        if turns > 1:
            n_ctx = turns - 2
            ctx_lines = turns - 1  # the separators, + 1
            for i in range(turns - 1):
                t = <object>PyList_GET_ITEM(texts, i)
                n_ctx += PyUnicode_GET_LENGTH(t)
                ctx_lines += _count_newlines(t)
                ctx_fences += _count_fences(t)
            prev = <object>PyList_GET_ITEM(texts, turns - 2)
            n = PyUnicode_GET_LENGTH(prev)
            if n >= cc or turns == 2:
                # prev[-cc:]: all of prev when cc == 0 (prev[-0:]) or cc > len(prev)
                start = n - cc if 0 < cc < n else 0
                if PyUnicode_IS_ASCII(prev):  # its UTF-8 bytes are its characters
                    cb = <const uint8_t *>PyUnicode_DATA(prev) + start
                    cb_len = n - start
                else:
                    ctx = PyUnicode_Substring(prev, start, n)
            else:
                # "\n".join(texts[:-1])[-cc:] with cc > len(prev): only the texts that reach
                # into the last cc characters are joined, the first of them cut to fit
                total = n
                k = turns - 2
                while total < cc and k > 0:
                    k -= 1
                    total += 1 + PyUnicode_GET_LENGTH(<object>PyList_GET_ITEM(texts, k))
                parts = texts[k:turns - 1]
                if total > cc:
                    parts[0] = PyUnicode_Substring(parts[0], total - cc,
                                                   PyUnicode_GET_LENGTH(parts[0]))
                ctx = "\n".join(parts)
            if cb == NULL:
                if PyUnicode_IS_ASCII(ctx):
                    cb = <const uint8_t *>PyUnicode_DATA(ctx)
                    cb_len = PyUnicode_GET_LENGTH(ctx)
                else:
                    cb_obj = PyUnicode_AsEncodedString(ctx, "utf-8", "replace")
                    cb = <const uint8_t *>PyBytes_AS_STRING(cb_obj)
                    cb_len = PyBytes_GET_SIZE(cb_obj)
            j = cb_len - 1  # cb.rstrip()[-1:].isalnum()
            while j >= 0 and _is_space(cb[j]):
                j -= 1
            ctx_end_alnum = j >= 0 and _is_alnum(cb[j])
            for i in range(cb_len - 1):
                if cb[i] == 10 and (cb[i + 1] == 45 or cb[i + 1] == 42 or cb[i + 1] == 49):
                    ctx_list += 1  # "\n-", "\n*", "\n1"
            n_chars = n_ctx + 1 + n_last
        else:
            n_chars = n_last

        # the window: the first head_chars and last tail_chars of the request
        cdef Py_ssize_t hc = self.head_chars, tc = self.tail_chars
        cdef Py_ssize_t L, window_chars, question_marks = 0
        cdef bint ascii_window = PyUnicode_IS_ASCII(last)
        cdef bint cut = n_last > hc + tc
        cdef Py_ssize_t tail_start = n_last - tc if tc else 0  # last[-tc:]
        cdef const uint8_t *src = NULL
        if ascii_window:
            src = <const uint8_t *>PyUnicode_DATA(last)
            L = hc + 1 + (n_last - tail_start) if cut else n_last
            window_chars = L
        else:
            window = (PyUnicode_Substring(last, 0, hc) + "\n"
                      + PyUnicode_Substring(last, tail_start, n_last)) if cut else last
            window_chars = PyUnicode_GET_LENGTH(window)
            question_marks = PyUnicode_Count(window, "?", 0, PY_SSIZE_T_MAX)
            wb_obj = PyUnicode_AsEncodedString(window, "utf-8", "replace")
            L = PyBytes_GET_SIZE(wb_obj)
        cdef Py_ssize_t hw = self.head_words, tw = self.tail_words
        cdef Py_ssize_t hb = 16 * hw, tb = 16 * tw  # bytes that hold that many words (mostly)
        cdef Py_ssize_t cw = self.context_words
        # the context's n-gram words come from cb[-16 * cw:] (all of cb when cw == 0)
        cdef Py_ssize_t ctx_lo = cb_len - 16 * cw if 0 < 16 * cw < cb_len else 0
        cdef Py_ssize_t ctx_bytes = cb_len - ctx_lo

        # scratch, one block: window copy and translation, context translation, word spans
        # (window, used, context), word hashes, grams
        cdef Py_ssize_t max_words = L // 2 + 1
        cdef Py_ssize_t max_ctx_words = ctx_bytes // 2 + 1
        cdef Py_ssize_t max_used = (hw if hw < max_words else max_words) + max_words
        cdef Py_ssize_t max_grams = 2 * max_used + 6 + max_ctx_words
        cdef Py_ssize_t byte_part = (2 * L + ctx_bytes + 7) & ~7
        cdef char *mem = <char *>PyMem_Malloc(
            byte_part + sizeof(Py_ssize_t) * 2 * (max_words + max_used + max_ctx_words)
            + sizeof(uint64_t) * (max_used + max_grams))
        if mem == NULL:
            raise MemoryError()
        cdef uint8_t *wt = <uint8_t *>mem
        cdef uint8_t *wbuf = wt + L
        cdef uint8_t *ct = wbuf + L
        cdef Py_ssize_t *spans = <Py_ssize_t *>(mem + byte_part)
        cdef Words all_words, used, ctx_words
        all_words.starts, all_words.lens, all_words.n = spans, spans + max_words, 0
        used.starts, used.lens, used.n = spans + 2 * max_words, spans + 2 * max_words + max_used, 0
        ctx_words.starts = spans + 2 * (max_words + max_used)
        ctx_words.lens = ctx_words.starts + max_ctx_words
        ctx_words.n = 0
        cdef uint64_t *hashes = <uint64_t *>(ctx_words.lens + max_ctx_words)
        cdef uint64_t *grams = hashes + max_used
        cdef const uint8_t *wb
        cdef const uint8_t *at
        cdef uint8_t c
        cdef Py_ssize_t class_counts[N_CLASSES]
        cdef Py_ssize_t n_digits = 0, n_upper = 0, n_code = 0, word_bytes = 0, list_lines = 0
        cdef Py_ssize_t n_words
        cdef bint last_end_alnum
        cdef double mean_len, n_words_f, req_words = 0.0, req_count = 0.0, max_number = 0.0
        cdef Py_ssize_t nb
        cdef double *d = a.dense
        try:
            if not ascii_window:
                wb = <const uint8_t *>PyBytes_AS_STRING(wb_obj)
            elif cut:
                memcpy(wbuf, src, hc)
                wbuf[hc] = 10
                memcpy(wbuf + hc + 1, src + tail_start, n_last - tail_start)
                wb = wbuf
            else:
                wb = src
            # one pass: the translation (word bytes kept and lowercased, others a space) and
            # every byte count
            for k in range(N_CLASSES):
                class_counts[k] = 0
            for i in range(L):  # no branches: two table lookups and two adds per byte
                c = wb[i]
                wt[i] = self.word_table[c]
                word_bytes += wt[i] != 32
                class_counts[_BYTE_CLASS[c]] += 1
            n_digits = class_counts[DIGIT]
            n_upper = class_counts[UPPER]
            n_code = class_counts[CODE]
            if ascii_window:  # else counted on the str: lone surrogates encode as "?"
                question_marks = class_counts[QUESTION]
            at = wb
            while True:  # "\n-", "\n*", "\n1"
                at = <const uint8_t *>memchr(at, 10, wb + L - at)
                if at == NULL:
                    break
                at += 1
                if at < wb + L and (at[0] == 45 or at[0] == 42 or at[0] == 49):
                    list_lines += 1
            if L == 0 or wb[0] == 45 or wb[0] == 42 or wb[0] == 49:
                list_lines += 1  # wb[:1] in b"-*1" (also true for b"")
            j = L - 1  # wb.rstrip()[-1:].isalnum()
            while j >= 0 and _is_space(wb[j]):
                j -= 1
            last_end_alnum = j >= 0 and _is_alnum(wb[j])
            # the n-gram words: all of them for a short window, else those of its two ends
            if L <= hb + tb:
                all_words.n = _split(wt, 0, L, all_words.starts, all_words.lens, max_words)
                n_words = all_words.n
                if n_words > hw + tw:  # used[:hw] + used[-tw:]
                    _copy_words(&used, &all_words, 0, hw)
                    _copy_words(&used, &all_words, n_words - _tail_count(n_words, tw), n_words)
                else:
                    _copy_words(&used, &all_words, 0, n_words)
            else:  # wt[:hb].split()[:hw] + wt[-tb:].split()[1:][-tw:]
                used.n = _split(wt, 0, hb, used.starts, used.lens, hw)
                all_words.n = _split(wt, L - tb if tb else 0, L, all_words.starts,
                                     all_words.lens, max_words)
                n = all_words.n - 1 if all_words.n else 0  # [1:]
                _copy_words(&used, &all_words, all_words.n - _tail_count(n, tw), all_words.n)
                n_words = 0
            total = 0
            for i in range(used.n):
                total += used.lens[i]
            mean_len = <double>total / <double>used.n if used.n else 0.0
            n_words_f = <double>n_words
            a.n_words_is_float = n_words == 0 and mean_len != 0.0
            if a.n_words_is_float:
                n_words_f = <double>word_bytes / mean_len
            if n_digits:
                self._numbers(wt, &used, &req_words, &req_count, &max_number)
            nb = L if L else 1
            d[0] = tokens
            d[1] = <double>turns
            d[2] = <double>n_chars
            d[3] = <double>n_last
            d[4] = tokens * <double>n_last / <double>n_chars if n_chars else 0.0
            d[5] = <double>(ctx_lines + _count_newlines(last)
                            + (1 if n_chars else 0))
            d[6] = <double>question_marks
            d[7] = n_words_f
            d[8] = tokens / <double>n_chars if n_chars else 0.0
            d[9] = <double>n_digits / <double>nb
            d[10] = <double>(nb - (L - n_upper)) / <double>nb  # 1.0 for an empty window, as
            d[11] = <double>(L - window_chars) / <double>(window_chars if window_chars else 1)
            d[12] = <double>(nb - (L - n_code)) / <double>nb  # in Python (nb = len(wb) or 1)
            d[13] = mean_len
            d[14] = <double>list_lines
            d[15] = req_words
            d[16] = req_count
            d[17] = max_number
            d[18] = 1.0 if last_end_alnum else 0.0
            d[19] = <double>n_ctx
            d[20] = tokens * <double>n_ctx / <double>n_chars if n_chars else 0.0
            d[21] = <double>ctx_lines
            d[22] = <double>ctx_fences
            d[23] = <double>ctx_list
            d[24] = 1.0 if ctx_end_alnum else 0.0
            d[25] = <double>(ctx_fences & 1)
            a.n_grams = 0
            if self.has_grams:
                if turns > 1:
                    for i in range(ctx_bytes):
                        ct[i] = self.word_table[cb[ctx_lo + i]]
                    all_words.n = _split(ct, 0, ctx_bytes, ctx_words.starts, ctx_words.lens,
                                         max_ctx_words)
                    k = _tail_count(all_words.n, cw)  # [-cw:]
                    ctx_words.starts += all_words.n - k
                    ctx_words.lens += all_words.n - k
                    ctx_words.n = k
                a.n_grams = self._grams(wt, &used, hashes, turns > 1, ct, &ctx_words, grams)
        except BaseException:
            PyMem_Free(mem)
            raise
        a.grams = grams
        a.block = mem
        return 0

    cdef int _numbers(self, const uint8_t *wt, const Words *used, double *req_words,
                      double *req_count, double *max_number) except -1:
        """"500 words", "3 ideas": the requested size and count, and log1p(largest number)
        among the n-gram words (nothing when none of them holds a digit)."""
        cdef Py_ssize_t i, j, u, n = used.n
        cdef const uint8_t *w
        cdef bint has_digit = False
        cdef int64_t v, top = 0
        cdef double rw
        for i in range(n):
            w = wt + used.starts[i]
            for j in range(used.lens[i]):
                if 48 <= w[j] <= 57:
                    has_digit = True
                    break
            if has_digit:
                break
        if not has_digit:
            return 0
        for i in range(n):
            w = wt + used.starts[i]
            if used.lens[i] <= 7 and _is_digits(w, used.lens[i]):
                v = 0
                for j in range(used.lens[i]):
                    v = v * 10 + (w[j] - 48)
                if v > top:
                    top = v
                if used.lens[i] <= 5 and i + 1 < n:  # "500 words", "3 5 ideas"
                    u = i + 1
                    if _is_digits(wt + used.starts[u], used.lens[u]) and i + 2 < n:
                        u = i + 2
                    if used.lens[u] <= self.max_unit_len:  # longer words are no unit
                        key = (<char *>wt)[used.starts[u]:used.starts[u] + used.lens[u]]
                        scale = self.word_units.get(key)
                        if scale is not None:
                            rw = <double>v * <double>scale
                            if rw > req_words[0]:
                                req_words[0] = rw
                        elif key in self.count_units:
                            if <double>v > req_count[0]:
                                req_count[0] = <double>v
        max_number[0] = log1p(<double>top)
        return 0

    cdef Py_ssize_t _grams(self, const uint8_t *wt, const Words *used, uint64_t *h,
                           bint has_context, const uint8_t *ct, const Words *ctx_words,
                           uint64_t *grams) noexcept:
        """The n-gram buckets in the Python order (it fixes the float32 sum's rounding):
        unigrams, bigrams, bias, first 1-3 words, last two, then the context ones."""
        cdef Py_ssize_t i, g = 0, n = used.n
        cdef uint64_t mask = self.mask
        for i in range(n):
            h[i] = _crc32(wt + used.starts[i], used.lens[i])
        for i in range(n):
            grams[g] = h[i] & mask
            g += 1
        for i in range(n - 1):
            grams[g] = (((h[i] * self.bigram_mul) ^ h[i + 1]) >> 7) & mask
            g += 1
        grams[g] = self.bias_gram & mask
        g += 1
        if n:
            grams[g] = (self.f1 ^ h[0]) & mask
            grams[g + 1] = (self.l2 ^ h[n - 1] ^ (h[n - 2] * 3 if n > 1 else 0)) & mask
            g += 2
            if n > 1:
                grams[g] = (self.f2 ^ h[0] ^ (h[1] * 3)) & mask
                g += 1
                if n > 2:
                    grams[g] = (self.f3 ^ h[0] ^ (h[1] * 3) ^ (h[2] * 7)) & mask
                    g += 1
        if has_context:
            grams[g] = self.context_gram & mask
            g += 1
            for i in range(ctx_words.n):
                grams[g] = (self.pc ^ _crc32(ct + ctx_words.starts[i], ctx_words.lens[i])) & mask
                g += 1
        return g


# positions of DENSE_FEATURES the Python code computes as ints (window_words: see analyze)
cdef bint _INT_FEATURE[N_DENSE]
for _i in (1, 2, 3, 5, 6, 14, 19, 21, 22, 23, 25):
    _INT_FEATURE[_i] = True


cdef inline bint _all_exact_str(list texts):
    cdef Py_ssize_t i
    for i in range(PyList_GET_SIZE(texts)):
        if type(<object>PyList_GET_ITEM(texts, i)) is not str:
            return False
    return True


cdef class TreeKernel:
    """``TreeEnsemble.predict2_python`` (the generated Python code) over the ensemble's level
    arrays: two-output trees, padded to complete trees of depth ``depth`` and stored level by
    level (node ``a`` of one level goes to ``2 * a + n_trees + go_right`` of the next; a padded
    leaf repeats its value over its whole span, so padding nodes route either way)."""

    cdef:
        Py_ssize_t n_trees, depth, n_features, leaf_offset
        object refs
        const Py_ssize_t *feature
        const float *threshold
        const double *leaf  # (n_trees << depth, 2): each tree's leaves, without the base
        double base0, base1

    def __init__(self, node_feature, node_threshold, tree_leaves, base, Py_ssize_t n_trees,
                 Py_ssize_t depth, Py_ssize_t n_features):
        cdef const Py_ssize_t[::1] feat = node_feature
        cdef const float[::1] thr = node_threshold
        cdef const double[:, ::1] leaf = tree_leaves
        cdef Py_ssize_t i
        if n_trees < 1 or not 0 <= depth <= 30:
            raise ValueError(f"bad ensemble shape: {n_trees} trees of depth {depth}")
        self.leaf_offset = n_trees * ((1 << depth) - 1)
        if feat.shape[0] != self.leaf_offset or thr.shape[0] != self.leaf_offset:
            raise ValueError(f"{feat.shape[0]} node features / {thr.shape[0]} thresholds for "
                             f"{self.leaf_offset} internal nodes")
        if leaf.shape[0] != n_trees << depth or leaf.shape[1] != 2:
            raise ValueError(f"leaves of shape ({leaf.shape[0]}, {leaf.shape[1]}), expected "
                             f"({n_trees << depth}, 2)")
        for i in range(feat.shape[0]):
            if not 0 <= feat[i] < n_features:
                raise ValueError(f"node {i} splits on feature {feat[i]} of {n_features}")
        if len(base) != 2:
            raise ValueError("base score must have two values")
        self.n_trees, self.depth, self.n_features = n_trees, depth, n_features
        self.refs = (node_feature, node_threshold, tree_leaves)  # keep the buffers alive
        self.feature = &feat[0] if feat.shape[0] else NULL
        self.threshold = &thr[0] if thr.shape[0] else NULL
        self.leaf = &leaf[0, 0]
        self.base0, self.base1 = float(base[0]), float(base[1])

    def predict2(self, x):
        """``complex(out0, out1)`` of one row ``x`` (``n_features`` float32-rounded values,
        e.g. an ``array('f')``): the base plus the trees' leaves, summed in the generated
        code's order (16 trees per statement, left to right) so that the doubles are equal."""
        cdef array row
        cdef const float *xf = NULL
        cdef const double *xd = NULL
        if type(x) is array and (<array>x).ob_descr.typecode == b"f":
            row = x
            xf = row.data.as_floats
        else:
            row = array("d", x)  # any sequence: values compared as Python floats
            xd = row.data.as_doubles
        if len(row) != self.n_features:
            raise ValueError(f"row has {len(row)} values, the trees read {self.n_features}")
        cdef Py_ssize_t lo, t, a, level, n = self.n_trees, leaf_at
        cdef double s0 = self.base0, s1 = self.base1, c0 = 0.0, c1 = 0.0, v
        lo = 0
        while lo < n:
            for t in range(lo, min(lo + 16, n)):
                a = t
                for level in range(self.depth):
                    v = xf[self.feature[a]] if xf != NULL else xd[self.feature[a]]
                    a = 2 * a + n + (v >= self.threshold[a])
                leaf_at = 2 * (a - self.leaf_offset)
                if t == lo:
                    c0, c1 = self.leaf[leaf_at], self.leaf[leaf_at + 1]
                else:
                    c0 += self.leaf[leaf_at]
                    c1 += self.leaf[leaf_at + 1]
            s0 += c0
            s1 += c1
            lo += 16
        return PyComplex_FromDoubles(s0, s1)
