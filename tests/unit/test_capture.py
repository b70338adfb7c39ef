"""The scheduler-thread capture and the publisher thread's static columns: the compiled
``block_sgl._capture`` gives the same results and errors as its specification in
``block_sgl.hooks.capture``; the snapshot path over both is in test_snapshot_builder.py."""

import importlib
import os
import subprocess
import sys
import types

import pytest
from hypothesis import given, settings, strategies as st

from block_sgl.hooks import capture

COMPILED = capture.implementation() == "compiled"
needs_compiled = pytest.mark.skipif(not COMPILED, reason="BLOCK_SGL_CAPTURE_PURE=1")


def req(rid, input_len, output_len, cached, prefix, max_new, ignore_eos, finished):
    return types.SimpleNamespace(
        rid=rid, origin_input_ids=[0] * input_len, output_ids=[1] * output_len,
        cached_tokens=cached, prefix_len=prefix, finished_reason="stop" if finished else None,
        sampling_params=types.SimpleNamespace(max_new_tokens=max_new, ignore_eos=ignore_eos))


requests = st.lists(st.builds(
    req, rid=st.text(max_size=8), input_len=st.integers(0, 50), output_len=st.integers(0, 50),
    cached=st.integers(0, 2**40), prefix=st.integers(0, 2**40), max_new=st.integers(1, 2**31),
    ignore_eos=st.sampled_from([True, False, 0, 1, None]), finished=st.booleans()), max_size=40)


def reference(reqs, skip_finished):
    kept = [r for r in reqs if not (skip_finished and r.finished_reason is not None)]
    return (kept, [max(r.cached_tokens, r.prefix_len) for r in kept],
            [len(r.output_ids) for r in kept])


@needs_compiled
@settings(max_examples=200, deadline=None)
@given(reqs=requests, skip_finished=st.booleans(), data=st.data())
def test_compiled_equals_the_specification(reqs, skip_finished, data):
    from block_sgl import _capture

    expected = reference(reqs, skip_finished)
    for impl in (_capture.capture_requests, capture.capture_requests_py):
        got = impl(reqs, skip_finished)
        assert got == expected
        assert got[0] is not reqs and all(a is b for a, b in zip(got[0], expected[0]))

    other = data.draw(st.permutations(reqs)) if data.draw(st.booleans()) else list(reqs)
    assert _capture.same_requests(reqs, other) == capture.same_requests_py(reqs, other)
    assert _capture.same_requests(reqs, list(reqs)) and capture.same_requests_py(reqs, list(reqs))
    assert not _capture.same_requests(reqs, reqs + [reqs[0] if reqs else None])

    # Rows found in a source dict are reused (not re-read); the others are read from the request.
    known = data.draw(st.lists(st.sampled_from(reqs), unique_by=id)) if reqs else []
    source = {id(r): (f"cached-{r.rid}", -1, -2, True, r) for r in known}
    results = []
    for impl in (_capture.gather_static, capture.gather_static_py):
        into = {}
        results.append((impl(reqs, ({}, source), into), into))
    assert results[0] == results[1]
    columns, into = results[0]
    assert set(into) == {id(r) for r in reqs}
    for i, r in enumerate(reqs):
        if id(r) in source:
            assert (columns[0][i], columns[1][i]) == (f"cached-{r.rid}", -1)
        else:
            assert [c[i] for c in columns] == [r.rid, len(r.origin_input_ids),
                                               r.sampling_params.max_new_tokens,
                                               bool(r.sampling_params.ignore_eos)]
        assert into[id(r)][4] is r  # the row holds the request: its id() stays unique


@pytest.mark.parametrize("impl", ["compiled", "python"])
def test_bad_arguments_fail_alike(impl):
    if impl == "compiled" and not COMPILED:
        pytest.skip("BLOCK_SGL_CAPTURE_PURE=1")
    if impl == "compiled":
        from block_sgl import _capture as m
        cap, same, gather = m.capture_requests, m.same_requests, m.gather_static
    else:
        cap, same, gather = capture.capture_requests_py, capture.same_requests_py, capture.gather_static_py
    with pytest.raises(TypeError, match=r"Argument 'reqs' has incorrect type \(expected list, got tuple\)"):
        cap((), True)
    with pytest.raises(TypeError, match=r"expected list, got NoneType"):
        cap(None, False)
    with pytest.raises(TypeError, match=r"Argument 'b' has incorrect type"):
        same([], None)
    with pytest.raises(TypeError, match=r"sources\[1\] must be a dict, got list"):
        gather([], ({}, []), {})
    broken = types.SimpleNamespace(rid="x", origin_input_ids=[])  # no sampling_params
    with pytest.raises(AttributeError, match="sampling_params"):
        gather([broken], ({},), {})
    with pytest.raises(AttributeError, match="cached_tokens"):
        cap([types.SimpleNamespace(finished_reason=None)], True)


def test_compiled_capture_is_selected():
    """Fails if the extension did not build (SGLang would then refuse to load the hooks)."""
    if os.environ.get(capture.PURE_ENV) == "1":
        pytest.skip("the pure-Python twin was requested")
    assert capture.implementation() == "compiled"
    assert capture.capture_requests.__module__ == "block_sgl._capture"


def test_env_var_selects_the_twin():
    code = "import block_sgl.hooks.capture as c; print(c.implementation())"
    env = dict(os.environ, BLOCK_SGL_CAPTURE_PURE="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "python"


def test_missing_extension_is_an_import_error(monkeypatch):
    monkeypatch.delenv(capture.PURE_ENV, raising=False)
    monkeypatch.setitem(sys.modules, "block_sgl._capture", None)  # import fails
    monkeypatch.delattr(importlib.import_module("block_sgl"), "_capture", raising=False)
    monkeypatch.delitem(sys.modules, "block_sgl.hooks.capture")
    with pytest.raises(ImportError, match="not built"):
        importlib.import_module("block_sgl.hooks.capture")
    monkeypatch.undo()
    assert importlib.import_module("block_sgl.hooks.capture") is capture


def test_sglang_refuses_to_start_the_hooks_without_the_extension():
    """The plugin's register() stops the server (SystemExit names the cause) instead of letting
    SGLang swallow the ImportError and serve without the stream that was asked for."""
    code = ("import sys; sys.modules['block_sgl._capture'] = None\n"
            "import block_sgl.hooks as h\n"
            "h.register()\n")
    env = dict(os.environ, BLOCK_SGL_PUBLISH="tcp://127.0.0.1:5999")
    env.pop(capture.PURE_ENV, None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 1, out
    assert "block_sgl: block_sgl._capture (the compiled snapshot capture) is not built" in out.stderr
