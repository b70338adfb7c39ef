"""What the scheduler thread reads off SGLang's request lists at every published snapshot.

``capture_requests(reqs, skip_finished)`` → ``(requests, prefix_len, output_len)``: new lists
(SGLang mutates its own after the hook returns; the publisher thread reads ours later), the
requests in order — without those whose ``finished_reason`` is set when ``skip_finished``
(``Req.finished()`` is ``finished_reason is not None``, sglang/srt/managers/schedule_batch.py;
finished requests stay in ``running_batch.reqs`` until the next round filters them) — and per
request ``max(cached_tokens, prefix_len)`` (the prompt tokens served from cache: ``cached_tokens``
once admitted, ``prefix_len`` = the latest prefix match while waiting) and ``len(output_ids)``.
``same_requests(a, b)``: the same objects in the same order.
``gather_static(reqs, sources, into)`` (on the publisher thread) → the static columns ``(rid,
input_len, max_new_tokens, ignore_eos)`` of ``reqs``, each request's row ``(rid, input_len,
max_new_tokens, ignore_eos, req)`` taken from the first dict of ``sources`` (keyed by ``id(req)``)
that holds it or else read from the request, and stored in ``into``.

The compiled ``block_sgl._capture`` is what runs; the functions below are its specification
(same results and errors), selected instead with ``BLOCK_SGL_CAPTURE_PURE=1`` (debugging). A
missing build is an ImportError, never a silent fallback. ``tests/unit/test_snapshot_builder.py``
runs the snapshot path over both.
"""

from __future__ import annotations

import operator
import os

PURE_ENV = "BLOCK_SGL_CAPTURE_PURE"

_FINISHED_REASON = operator.attrgetter("finished_reason")
_CACHED = operator.attrgetter("cached_tokens")
_PREFIX = operator.attrgetter("prefix_len")
_OUTPUT = operator.attrgetter("output_ids")


def capture_requests_py(reqs: list, skip_finished: bool) -> tuple[list, list, list]:
    if type(reqs) is not list:
        raise TypeError(f"Argument 'reqs' has incorrect type (expected list, got {type(reqs).__name__})")
    if skip_finished:
        reasons = list(map(_FINISHED_REASON, reqs))
        kept = ([r for r, f in zip(reqs, reasons) if f is None] if reasons.count(None) != len(reasons)
                else list(reqs))
    else:
        kept = list(reqs)
    prefix = [q if q > c else c for c, q in zip(map(_CACHED, kept), map(_PREFIX, kept))]
    return kept, prefix, list(map(len, map(_OUTPUT, kept)))


def same_requests_py(a: list, b: list) -> bool:
    for name, value in (("a", a), ("b", b)):
        if type(value) is not list:
            raise TypeError(f"Argument '{name}' has incorrect type (expected list, got "
                            f"{type(value).__name__})")
    return len(a) == len(b) and all(map(operator.is_, a, b))


def gather_static_py(reqs: list, sources: tuple, into: dict) -> tuple[list, list, list, list]:
    for name, value, kind in (("reqs", reqs, list), ("sources", sources, tuple), ("into", into, dict)):
        if type(value) is not kind:
            raise TypeError(f"Argument '{name}' has incorrect type (expected {kind.__name__}, got "
                            f"{type(value).__name__})")
    for j, source in enumerate(sources):
        if type(source) is not dict:
            raise TypeError(f"sources[{j}] must be a dict, got {type(source).__name__}")
    columns: tuple[list, list, list, list] = ([], [], [], [])
    for req in reqs:
        key = id(req)
        row = next((source[key] for source in sources if key in source), None)
        if row is None:
            params = req.sampling_params
            # The row holds req: while id(req) is a key, no other object can have that id.
            row = (req.rid, len(req.origin_input_ids), params.max_new_tokens,
                   bool(params.ignore_eos), req)
        into[key] = row
        for column, value in zip(columns, row):
            column.append(value)
    return columns


def implementation() -> str:
    """``"compiled"`` or ``"python"`` (``BLOCK_SGL_CAPTURE_PURE=1``)."""
    return "python" if capture_requests is capture_requests_py else "compiled"


if os.environ.get(PURE_ENV) == "1":
    capture_requests, same_requests, gather_static = (capture_requests_py, same_requests_py,
                                                      gather_static_py)
else:
    try:
        from block_sgl._capture import capture_requests, gather_static, same_requests
    except ImportError as e:
        raise ImportError(
            f"block_sgl._capture (the compiled snapshot capture) is not built ({e}); run `pip "
            f"install -e .` (or `python setup.py build_ext --inplace`), or set {PURE_ENV}=1 to "
            f"use the pure-Python version") from e
