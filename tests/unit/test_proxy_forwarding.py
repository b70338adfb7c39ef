"""The proxy's forwarding path against an in-process upstream (aiohttp test servers, no
SGLang): what runs before the request's body leaves for the instance."""

from __future__ import annotations

import asyncio
import time

import pytest
import uvloop
from aiohttp import ClientSession, client_reqrep, web
from aiohttp.test_utils import TestServer

from block_sgl import protocol as p
from block_sgl.router.config import RouterConfig
from block_sgl.router.core import Router
from block_sgl.router.proxy import RouterApp
from tests.unit.test_router_core import FakeSubscriber

ENDPOINT = "tcp://127.0.0.1:7000"


def _upstream_app() -> web.Application:
    async def generate(request: web.Request):
        await request.read()
        return web.json_response({"text": "ok", "meta_info": {"id": "rid-1",
                                                               "completion_tokens": 1}})

    async def health(_request):
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/generate", generate)
    app.router.add_get("/health", health)
    return app


def _router(url: str) -> Router:
    router = Router(RouterConfig(worker_urls=(url,), policy="lmetric"),
                    subscriber_factory=FakeSubscriber)
    router.attach_streams([ENDPOINT])
    st = router.subscriber.states[ENDPOINT]
    st.hello = p.Hello(instance_id="i0", url=url, model="m", page_size=16,
                       max_total_num_tokens=65536, max_running_requests=64,
                       chunked_prefill_size=4096, max_prefill_tokens=16384,
                       schedule_policy="fcfs", hardware_profile="h100-llama2-7b", time_scale=1.0)
    st.snapshot = p.Snapshot(instance_id="i0", time=time.time(), forward_ct=1,
                             running=p.RequestColumns(), waiting=p.RequestColumns(),
                             free_tokens=65536, evictable_tokens=0, max_total_num_tokens=65536,
                             new_token_ratio=0.7)
    st.last_message_at = time.monotonic()
    return router


@pytest.mark.parametrize("run", [asyncio.run, uvloop.run], ids=["asyncio", "uvloop"])
def test_the_prompt_is_hashed_for_speculative_entries_after_its_body_is_sent(monkeypatch, run):
    """Hashing the whole prompt (``Router.remember_prefix``) must not delay the request: aiohttp
    writes the body from a task that ``session.post`` schedules, so a callback scheduled just
    before the post would run first. On both event loops the router can run on."""
    events: list[str] = []
    upstream_port: list[int] = []
    write_bytes = client_reqrep.ClientRequest.write_bytes

    async def recording_write_bytes(self, *args, **kwargs):
        result = await write_bytes(self, *args, **kwargs)
        if self.url.port in upstream_port:  # the router's request to the instance
            events.append("body sent")
        return result

    monkeypatch.setattr(client_reqrep.ClientRequest, "write_bytes", recording_write_bytes)

    async def scenario():
        upstream = TestServer(_upstream_app())
        await upstream.start_server()
        upstream_port.append(upstream.port)
        url = str(upstream.make_url("")).rstrip("/")
        router = _router(url)
        remember = router.remember_prefix

        def recording_remember(decision):
            events.append("prefix remembered")
            remember(decision)

        router.remember_prefix = recording_remember
        app = RouterApp(router.config, router, tokenizer=None)
        front = TestServer(app.app)
        await front.start_server()
        try:
            async with ClientSession() as client:
                body = {"input_ids": list(range(1, 801)), "sampling_params": {"max_new_tokens": 1}}
                for _ in range(2):  # the second one goes over the router's pooled connection
                    events.clear()
                    async with client.post(front.make_url("/generate"), json=body) as r:
                        assert r.status == 200, await r.text()
                        assert (await r.json())["text"] == "ok"
        finally:
            await front.close()
            await upstream.close()
        return router

    router = run(scenario())
    assert events == ["body sent", "prefix remembered"]
    # ... and the speculative entries are there: the 50 full pages of the prompt.
    assert len(router.workers[0].speculative) == 50
