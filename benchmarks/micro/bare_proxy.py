"""The floor of a Python proxy: aiohttp + uvloop, one upstream, no routing, no parsing.

A reference row for ``bench_router.py proxy``: what any aiohttp proxy adds on this machine
before it does any work of its own (read the body, POST it upstream over a keep-alive
connection, relay the answer; SSE chunks relayed as they arrive, TCP_NODELAY on both sides —
aiohttp sets it itself). block_sgl's router is the same stack plus its own work, so its added
latency minus this floor is what the router's own work costs.

    python benchmarks/micro/bare_proxy.py --upstream http://127.0.0.1:30000 --port 8001
"""

from __future__ import annotations

import argparse

import aiohttp
import uvloop
from aiohttp import web

_FORWARD = ("content-type", "authorization", "accept")
_HOP = frozenset(("content-length", "transfer-encoding", "connection", "keep-alive"))


def make_app(upstream: str) -> web.Application:
    app = web.Application()
    state: dict = {}

    async def startup(_app):
        state["session"] = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0), auto_decompress=False)

    async def cleanup(_app):
        await state["session"].close()

    async def relay(request: web.Request):
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() in _FORWARD}
        async with state["session"].post(upstream + request.path, data=body,
                                         headers=headers) as up:
            out_headers = {k: v for k, v in up.headers.items() if k.lower() not in _HOP}
            if not up.headers.get("Content-Type", "").startswith("text/event-stream"):
                return web.Response(body=await up.read(), status=up.status, headers=out_headers)
            resp = web.StreamResponse(status=up.status, headers=out_headers)
            await resp.prepare(request)
            async for chunk in up.content.iter_any():
                await resp.write(chunk)
            await resp.write_eof()
            return resp

    async def health(_request):
        return web.Response(text="ok")

    app.router.add_post("/{path:.*}", relay)
    app.router.add_get("/health", health)
    app.on_startup.append(startup)
    app.on_cleanup.append(cleanup)
    return app


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--upstream", required=True)
    ap.add_argument("--port", type=int, required=True)
    args = ap.parse_args()
    web.run_app(make_app(args.upstream.rstrip("/")), host="127.0.0.1", port=args.port,
                access_log=None, print=None, loop=uvloop.new_event_loop())


if __name__ == "__main__":
    main()
