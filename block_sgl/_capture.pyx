# cython: language_level=3, boundscheck=False, wraparound=False
"""Compiled twin of ``block_sgl.hooks.capture`` (the specification: ``capture_requests_py`` and
``same_requests_py`` there; same results, same errors). What the scheduler thread reads off
SGLang's request lists at every published snapshot: one C loop per list instead of one
C-level pass per attribute plus a Python-level comprehension (measured: 64 running requests,
≈ 25 µs → ≈ 10 µs on the bench's 2-core VM; ``benchmarks/micro/README_hooks.md``)."""

from cpython.dict cimport PyDict_GetItemWithError
from cpython.list cimport PyList_GET_ITEM, PyList_GET_SIZE
from cpython.long cimport PyLong_FromVoidPtr
from cpython.object cimport PyObject
from cpython.tuple cimport PyTuple_GET_ITEM, PyTuple_GET_SIZE


def capture_requests(list reqs not None, bint skip_finished):
    """(requests, prefix_len, output_len) of ``reqs``, new lists: requests in order (without
    those whose ``finished_reason`` is set when ``skip_finished``); per request
    ``max(cached_tokens, prefix_len)`` and ``len(output_ids)``."""
    cdef Py_ssize_t i, n = PyList_GET_SIZE(reqs)
    cdef list kept = [], prefix = [], output = []
    cdef object req, cached, matched
    for i in range(n):
        req = <object>PyList_GET_ITEM(reqs, i)
        if skip_finished and req.finished_reason is not None:
            continue
        cached = req.cached_tokens
        matched = req.prefix_len
        prefix.append(matched if matched > cached else cached)
        output.append(len(req.output_ids))
        kept.append(req)
    return kept, prefix, output


def same_requests(list a not None, list b not None):
    """True when ``a`` and ``b`` hold the same objects in the same order (identity)."""
    cdef Py_ssize_t i, n = PyList_GET_SIZE(a)
    if n != PyList_GET_SIZE(b):
        return False
    for i in range(n):
        if PyList_GET_ITEM(a, i) != PyList_GET_ITEM(b, i):
            return False
    return True


def gather_static(list reqs not None, tuple sources not None, dict into not None):
    """The static columns ``(rid, input_len, max_new_tokens, ignore_eos)`` of ``reqs``. Each
    request's row ``(rid, input_len, max_new_tokens, ignore_eos, req)`` is taken from the first
    dict of ``sources`` (dicts keyed by ``id(req)``) that has it, else read from the request;
    every row is stored in ``into``."""
    cdef Py_ssize_t i, j, n = PyList_GET_SIZE(reqs), m = PyTuple_GET_SIZE(sources)
    cdef list rid = [], input_len = [], max_new = [], ignore_eos = []
    cdef object req, key, params
    cdef tuple row
    cdef PyObject *found
    for j in range(m):
        if type(<object>PyTuple_GET_ITEM(sources, j)) is not dict:
            raise TypeError(f"sources[{j}] must be a dict, got "
                            f"{type(<object>PyTuple_GET_ITEM(sources, j)).__name__}")
    for i in range(n):
        req = <object>PyList_GET_ITEM(reqs, i)
        key = PyLong_FromVoidPtr(<void *>req)  # == id(req)
        found = NULL
        for j in range(m):
            found = PyDict_GetItemWithError(<object>PyTuple_GET_ITEM(sources, j), key)
            if found != NULL:
                break
        if found != NULL:
            row = <tuple>found
        else:
            params = req.sampling_params
            row = (req.rid, len(req.origin_input_ids), params.max_new_tokens,
                   bool(params.ignore_eos), req)
        into[key] = row
        rid.append(<object>PyTuple_GET_ITEM(row, 0))
        input_len.append(<object>PyTuple_GET_ITEM(row, 1))
        max_new.append(<object>PyTuple_GET_ITEM(row, 2))
        ignore_eos.append(<object>PyTuple_GET_ITEM(row, 3))
    return rid, input_len, max_new, ignore_eos
