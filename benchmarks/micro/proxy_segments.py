"""Where a proxied request's time goes inside the proxy process, measured in place.

``bench_router.py proxy`` measures what a client sees; this splits the proxy's own part of one
sequential streaming request into segments, inside the running process, for the block_sgl
router and for the bare aiohttp proxy (``bare_proxy.py``) side by side, in front of one real
SGLang CPU instance (the targets interleaved request by request, as in the paired cells of
``bench_router.py proxy``). Each proxy runs under an instrumented launcher (this file with
``--serve``) that wraps a few aiohttp entry points (the server's request handler, the client
session's request, the streamed response's ``prepare`` / ``write``) and the router's stages
with ``perf_counter`` marks; the wrappers cost ≈ 1 µs each. Tied to aiohttp's internals
(3.14): a renamed method raises at start rather than measuring nothing.

Why it exists: in-process micro-benchmarks of the routing path (≈ 150 µs per request) say
little about its cost in place, where each request's code runs cold between others on a busy
2-core machine (the same tokenizer call: 13 µs hot, ≈ 170 µs after 5 ms of other work).

    python benchmarks/micro/proxy_segments.py [--requests 300] [--router-arg=--policy=block ...]

Prints the median of every segment (µs) per proxy and the client-side paired added time to
first byte (ms) of each.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

# Marks in the order a streamed request passes them (router-only ones are absent for the bare
# proxy). "t0": the aiohttp server starts handling the request. "client_prepare": the response
# to the client is started — block_sgl does it when the first chunk arrives (until then a
# failed instance can be retried elsewhere), the bare proxy as soon as the upstream's headers
# are in, so its "first_written" segment includes the wait for the first chunk.
ORDER = ("read", "parsed", "viewed", "decide_start", "views", "predicted", "decided",
         "forward", "upstream_sent", "upstream_headers", "client_prepare", "first_written")


def _instrument(out_file: str, router: bool) -> None:
    """Wrap aiohttp's (and the router's) entry points with marks; write the rows of every
    finished request to ``out_file`` (JSON) when the process exits."""
    from aiohttp import client, web_protocol, web_response

    pc = time.perf_counter
    marks: dict = {}
    rows: list = []

    def mark(key: str) -> None:
        d = marks.get(asyncio.current_task())
        if d is not None and key not in d:
            d[key] = pc()

    def wrap_async(cls, name, before=None, after=None):
        f = getattr(cls, name)

        async def g(*a, **k):
            if before:
                mark(before)
            r = await f(*a, **k)
            if after:
                mark(after)
            return r
        setattr(cls, name, g)

    def wrap_sync(cls, name, before=None, after=None):
        f = getattr(cls, name)

        def g(*a, **k):
            if before:
                mark(before)
            r = f(*a, **k)
            if after:
                mark(after)
            return r
        setattr(cls, name, g)

    handle = web_protocol.RequestHandler._handle_request

    async def handle_request(self, request, start_time, request_handler):
        task = asyncio.current_task()
        marks[task] = {"t0": pc()}
        try:
            return await handle(self, request, start_time, request_handler)
        finally:
            d = marks.pop(task, None)
            if d and "first_written" in d:
                rows.append({k: (v - d["t0"]) * 1e6 for k, v in d.items()})

    web_protocol.RequestHandler._handle_request = handle_request
    # The rows are written when the process exits: at SIGTERM (the parent stops it so) too.
    atexit.register(lambda: Path(out_file).write_text(json.dumps(rows)))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    wrap_async(client.ClientSession, "_request", "upstream_sent", "upstream_headers")
    wrap_async(web_response.StreamResponse, "prepare", "client_prepare")
    wrap_async(web_response.StreamResponse, "write", None, "first_written")
    if router:
        from block_sgl.router import core, proxy

        wrap_async(proxy.RouterApp, "_read_json", None, "read")
        wrap_sync(proxy.RouterApp, "parse_generate", None, "parsed")
        wrap_sync(core.Router, "request_view", None, "viewed")
        wrap_sync(core.Router, "decide", "decide_start", "decided")
        wrap_sync(core.Router, "views", None, "views")
        wrap_sync(core.Router, "_predict", None, "predicted")
        wrap_async(proxy.RouterApp, "_forward", "forward", None)


def serve(kind: str, out_file: str, argv: list[str]) -> None:
    _instrument(out_file, router=kind == "router")
    if kind == "router":
        from block_sgl import launch_router

        launch_router.main(argv)
    else:
        import runpy

        sys.argv = [str(Path(__file__).with_name("bare_proxy.py"))] + argv
        runpy.run_path(sys.argv[0], run_name="__main__")


def segments(rows: list[dict]) -> list[tuple[str, float]]:
    """Median time of every segment between consecutive marks present in all rows (µs)."""
    keys = [k for k in ORDER if all(k in r for r in rows)]
    out, prev = [], "t0"
    for k in keys:
        out.append((f"{prev} → {k}", statistics.median(r[k] - r.get(prev, 0.0) for r in rows)))
        prev = k
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    ap.add_argument("--serve", choices=("router", "bare"), help=argparse.SUPPRESS)
    ap.add_argument("--marks-file", help=argparse.SUPPRESS)
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--router-arg", action="append", default=[],
                    help="extra launch_router argument, e.g. --router-arg=--policy=round_robin")
    args, rest = ap.parse_known_args(argv)
    if args.serve:
        return serve(args.serve, args.marks_file, rest)

    from bench_router import _measure_paired, _wait_http, paired_added
    from block_sgl.testing.cluster import ClusterConfig, LocalCluster, free_port

    publish = f"tcp://127.0.0.1:{free_port()}"
    tmp = Path(tempfile.mkdtemp(prefix="proxy_segments_"))
    with LocalCluster(ClusterConfig(instances=1, env=(("BLOCK_SGL_PUBLISH", publish),))) as c:
        worker = c.urls[0]
        procs, targets = {}, {"direct": worker}
        for name, kind, extra in (
                ("bare_aiohttp_proxy", "bare", ["--upstream", worker]),
                ("block_sgl", "router", ["--worker-urls", worker, "--log-level", "warning"]
                 + args.router_arg)):
            port = free_port()
            procs[name] = subprocess.Popen(
                [sys.executable, __file__, "--serve", kind, "--marks-file",
                 str(tmp / f"{name}.json"), "--port", str(port)] + extra)
            targets[name] = f"http://127.0.0.1:{port}"
        try:
            for url in targets.values():
                _wait_http(f"{url}/health")
            samples = asyncio.run(_measure_paired(targets, args.requests, stream=True))
        finally:
            for proc in procs.values():
                proc.terminate()
                proc.wait(15)
    for name in procs:
        med, lo, hi = paired_added(samples[name], samples["direct"])
        marks = tmp / f"{name}.json"
        if not marks.is_file():
            raise SystemExit(f"{name} wrote no marks to {marks} (exit code "
                             f"{procs[name].returncode}): did it start and stop cleanly?")
        rows = json.loads(marks.read_text())
        print(f"{name}: added time to first byte {med:+.2f} ms [{lo:+.2f}, {hi:+.2f}] "
              f"(paired, n={len(samples[name])}); segments over {len(rows)} requests (µs):")
        for label, us in segments(rows):
            print(f"  {label:36s} {us:8.0f}")


if __name__ == "__main__":
    main()
