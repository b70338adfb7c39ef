"""The router (python -m block_sgl.launch_router) in front of real SGLang instances.

Instances: the session cluster's two + one more started here (killed by the last test).
Routers run as subprocesses, exactly as an operator starts them (stream discovery through
/server_info included)."""

import concurrent.futures as cf
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

from block_sgl.router.tokenize import PromptTokenizer
from block_sgl.testing.cluster import ClusterConfig, LocalCluster, free_port

from ..conftest import EMULATED_PROFILE, STRICT_HOOKS, TIME_SCALE, publish_endpoints

JSON = {"content-type": "application/json"}


@pytest.fixture(scope="module")
def third(tmp_path_factory):
    endpoint = publish_endpoints(1)[0]
    config = ClusterConfig(instances=1, emulate=EMULATED_PROFILE, time_scale=TIME_SCALE,
                           log_dir=str(tmp_path_factory.mktemp("third")),
                           env=(("BLOCK_SGL_PUBLISH", endpoint),) + STRICT_HOOKS)
    with LocalCluster(config) as c:
        yield c


@pytest.fixture(scope="module")
def instances(cluster, third):
    return cluster.urls + third.urls


class RouterProcess:
    def __init__(self, urls, *args, log_dir):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(os.path.join(log_dir, f"router-{self.port}.log"), "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "block_sgl.launch_router", "--worker-urls", *urls,
             "--port", str(self.port), "--log-level", "warning", *args],
            stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"router exited: {open(self.log.name).read()}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, open(self.log.name).read()
            time.sleep(0.2)

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


@pytest.fixture(scope="module")
def start_router(tmp_path_factory):
    started = []
    log_dir = str(tmp_path_factory.mktemp("routers"))

    def start(urls, *args):
        r = RouterProcess(urls, *args, log_dir=log_dir)
        started.append(r)
        return r
    yield start
    for r in started:
        r.stop()


@pytest.fixture(scope="module")
def block_router(start_router, instances):
    return start_router(instances, "--policy", "block")


def call(url, body=None, headers=JSON, timeout=120, raw=None):
    """(status, headers, body bytes) without raising on HTTP errors."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def sse(url, body, timeout=120):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers=JSON)
    with urllib.request.urlopen(req, timeout=timeout) as r:
        lines = [line.strip()[5:].strip() for line in r if line.strip().startswith(b"data:")]
        return r.headers, lines


def gen_body(text, n=8, **kw):
    return {"text": text, "sampling_params": {"max_new_tokens": n, "temperature": 0,
                                              "ignore_eos": True}, **kw}


def test_every_endpoint_through_the_router(block_router, instances):
    r = block_router.url
    status, headers, body = call(f"{r}/generate", gen_body("The capital of France is"))
    assert status == 200 and headers["X-Block-Instance"] in instances
    assert json.loads(body)["meta_info"]["completion_tokens"] == 8

    headers, events = sse(f"{r}/generate", gen_body("Stream me a story", 5, stream=True))
    assert events[-1] == b"[DONE]" and len(events) == 6
    assert json.loads(events[-2])["meta_info"]["completion_tokens"] == 5

    _, events = sse(f"{r}/v1/completions", {"prompt": "Once upon a time", "max_tokens": 4,
                                           "stream": True, "temperature": 0, "ignore_eos": True})
    assert events[-1] == b"[DONE]" and all(json.loads(e)["object"] == "text_completion"
                                           for e in events[:-1])
    status, _, body = call(f"{r}/v1/chat/completions", {
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "ignore_eos": True})
    assert status == 200 and json.loads(body)["usage"]["completion_tokens"] == 3
    _, events = sse(f"{r}/v1/chat/completions", {
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True,
        "ignore_eos": True})
    assert events[-1] == b"[DONE]" and json.loads(events[0])["object"] == "chat.completion.chunk"

    status, _, body = call(f"{r}/v1/models")
    assert status == 200 and json.loads(body)["data"][0]["max_model_len"] > 0
    status, _, body = call(f"{r}/health")
    assert status == 200 and len(json.loads(body)["healthy_instances"]) == 3
    status, _, body = call(f"{r}/metrics")
    text = body.decode()
    assert status == 200 and 'block_router_decisions_total{instance=' in text
    assert "block_router_decision_seconds_bucket" in text
    status, _, body = call(f"{r}/block/provisioning")
    assert status == 200 and json.loads(body)["recommendation"] in ("scale_in", "hold", "scale_out")


def test_router_tokens_equal_sglangs(block_router, cluster):
    """The router's tokenizer (no transformers) yields SGLang's prompt token counts."""
    model = json.loads(call(f"{cluster.urls[0]}/model_info")[2])["tokenizer_path"]
    tok = PromptTokenizer(model)
    text = "Routing requests: naïve → predictive! 123 \u4e2d\u6587 <s> tokens"
    meta = json.loads(call(f"{cluster.urls[0]}/generate", gen_body(text, 1))[2])["meta_info"]
    assert meta["prompt_tokens"] == len(tok.encode(text))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}]
    usage = json.loads(call(f"{cluster.urls[0]}/v1/chat/completions", {
        "messages": messages, "max_tokens": 1})[2])["usage"]
    assert usage["prompt_tokens"] == len(tok.encode_chat(messages)[1])


def test_openai_client_works_through_the_router(block_router):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{block_router.url}/v1", api_key="unused")
    model = client.models.list().data[0].id
    chat = client.chat.completions.create(model=model, max_tokens=4, temperature=0,
                                          messages=[{"role": "user", "content": "Hello!"}])
    assert chat.usage.completion_tokens >= 1 and chat.choices[0].message.role == "assistant"
    chunks = list(client.completions.create(model=model, prompt="Tell me", max_tokens=4,
                                            stream=True, temperature=0))
    assert len(chunks) >= 1 and chunks[-1].choices[0].finish_reason is not None


def test_sglang_bench_serving_runs_unchanged_against_the_router(block_router, cluster, tmp_path):
    tokenizer = json.loads(call(f"{cluster.urls[0]}/model_info")[2])["tokenizer_path"]
    out = tmp_path / "bench.jsonl"
    proc = subprocess.run(
        [sys.executable, "-m", "sglang.bench_serving", "--backend", "sglang",
         "--base-url", block_router.url, "--dataset-name", "random-ids", "--num-prompts", "12",
         "--random-input-len", "64", "--random-output-len", "8", "--random-range-ratio", "1",
         "--tokenizer", tokenizer, "--model", tokenizer, "--request-rate", "inf",
         "--output-file", str(out), "--disable-tqdm"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text().strip().splitlines()[-1])
    assert result["completed"] == 12 and result["total_output_tokens"] == 12 * 8


def _long_prompt(seed, words=700):
    return " ".join(f"w{seed}x{k}" for k in range(words))


@pytest.mark.parametrize("policy", ["block", "cache_aware", "lmetric"])
def test_cache_aware_policies_send_a_repeated_prefix_to_its_holder(policy, start_router,
                                                                   instances, block_router):
    router = block_router if policy == "block" else start_router(instances, "--policy", policy)
    prefix = _long_prompt(hash(policy) % 1000)
    status, headers, body = call(f"{router.url}/generate", gen_body(prefix + " first?", 4))
    assert status == 200
    holder = headers["X-Block-Instance"]
    for k in range(3):
        status, headers, body = call(f"{router.url}/generate", gen_body(f"{prefix} follow-up {k}?", 4))
        meta = json.loads(body)["meta_info"]
        assert headers["X-Block-Instance"] == holder
        assert meta["cached_tokens"] >= meta["prompt_tokens"] - 32


def test_block_avoids_an_instance_made_busy(block_router, instances, cluster):
    busy = instances[0]
    flood = cf.ThreadPoolExecutor(8)
    futures = [flood.submit(call, f"{busy}/generate", gen_body(_long_prompt(900 + k, 300), 160))
               for k in range(8)]
    try:
        deadline = time.monotonic() + 30
        while True:  # until the router's view of the busy instance shows the load
            view = json.loads(call(f"{block_router.url}/block/instances")[2])["instances"]
            if (view[0]["running"] or 0) + (view[0]["waiting"] or 0) >= 6:
                break
            assert time.monotonic() < deadline, f"{view}\n{cluster.diagnose()}"
            time.sleep(0.05)
        for k in range(4):
            status, headers, _ = call(f"{block_router.url}/generate", gen_body(f"quick {k}", 2))
            assert status == 200 and headers["X-Block-Instance"] != busy
    finally:
        for f in futures:
            assert f.result(timeout=300)[0] == 200
        flood.shutdown()


def test_bad_input_gets_a_clear_4xx(block_router, start_router, instances):
    r = block_router.url
    status, _, body = call(f"{r}/generate", raw=b"{not json")
    assert status == 400 and "not valid JSON" in json.loads(body)["error"]["message"]
    status, _, body = call(f"{r}/v1/completions", {"max_tokens": 3})
    assert status == 400 and "`prompt`" in json.loads(body)["error"]["message"]
    status, _, body = call(f"{r}/v1/chat/completions", {"messages": []})
    assert status == 400 and "messages" in json.loads(body)["error"]["message"]
    status, _, body = call(f"{r}/generate", gen_body("word " * 40000))
    assert status == 400 and "context length" in json.loads(body)["error"]["message"]
    status, _, body = call(f"{r}/v1/completions", {"model": "gpt-9", "prompt": "x"})
    assert status == 404 and "gpt-9" in json.loads(body)["error"]["message"]
    keyed = start_router(instances, "--policy", "round_robin", "--api-key", "s3cret")
    status, _, body = call(f"{keyed.url}/generate", gen_body("hi", 1))
    assert status == 401 and "API key" in json.loads(body)["error"]["message"]
    status, _, _ = call(f"{keyed.url}/generate", gen_body("hi", 1),
                        headers={**JSON, "Authorization": "Bearer s3cret"})
    assert status == 200


def test_startup_errors_name_the_problem(cluster):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "block_sgl.launch_router", *args],
                              capture_output=True, text=True, timeout=120)
    out = run("--worker-urls", "http://127.0.0.1:9", "--startup-timeout", "0.5")
    assert out.returncode != 0 and "http://127.0.0.1:9" in out.stderr and "server_info" in out.stderr
    out = run("--worker-urls", cluster.urls[0], "--policy", "fastest")
    assert out.returncode == 2 and "invalid choice: 'fastest'" in out.stderr
    out = run("--worker-urls", *cluster.urls, "--publish-endpoints", "tcp://127.0.0.1:1")
    assert out.returncode != 0 and "one per worker" in out.stderr


def test_two_replicas_three_instances_lose_nothing(start_router, block_router, instances):
    replicas = [block_router, start_router(instances, "--policy", "block")]

    def one(k):
        r = replicas[k % 2].url
        status, headers, body = call(f"{r}/generate", gen_body(f"request {k} " + "x " * (k * 7), 6))
        return status, headers["X-Block-Instance"], json.loads(body)["meta_info"]["completion_tokens"]

    with cf.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(32)))
    assert all(s == 200 and n == 6 for s, _, n in results)
    assert len({u for _, u, _ in results}) >= 2


def test_client_disconnect_aborts_the_request_on_the_instance(block_router):
    import http.client

    host, port = block_router.url.split("//")[1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.request("POST", "/generate", body=json.dumps(gen_body("a long story", 2000, stream=True)),
                 headers=JSON)
    resp = conn.getresponse()
    served_by = resp.getheader("X-Block-Instance")
    # resp.readline() decodes the chunked transfer encoding (resp.fp would not)
    assert resp.readline().startswith(b"data:")  # it is generating
    conn.sock.close()  # the client goes away mid-stream
    conn.close()
    deadline = time.monotonic() + 15  # 2000 tokens would take ~50 s if not aborted
    while True:
        view = {v["url"]: v for v in json.loads(call(f"{block_router.url}/block/instances")[2])["instances"]}
        if view[served_by]["running"] == 0 and view[served_by]["waiting"] == 0 \
                and view[served_by]["in_flight"] == 0:
            break
        assert time.monotonic() < deadline, view[served_by]
        time.sleep(0.1)


def test_slo_admission_rejects_with_retry_after(start_router, instances):
    router = start_router(instances, "--policy", "block", "--slo-ttft-ms", "0.001")
    status, headers, body = call(f"{router.url}/generate", gen_body("hello", 4))
    assert status == 429 and int(headers["Retry-After"]) >= 1
    assert "exceeds the SLO" in json.loads(body)["error"]["message"]
    metrics = call(f"{router.url}/metrics")[2].decode()
    assert "block_router_slo_rejections_total 1.0" in metrics
    report = json.loads(call(f"{router.url}/block/provisioning")[2])
    assert report["recommendation"] == "scale_out" and report["slo_ttft_s"] == 1e-6


def test_killed_instance_costs_no_unstarted_request(start_router, instances, third):
    """Concurrency 8 of streaming and non-streaming requests; one instance is SIGKILLed
    mid-run. Requests that had received no byte are retried elsewhere; streams already
    relaying end with an error event; the dead instance gets nothing new after 1 s."""
    router = start_router(instances, "--policy", "round_robin")
    dead = third.urls[0]
    killed_at = []
    stop = threading.Event()
    outcomes = []

    def worker(k):
        n = 0
        while not stop.is_set():
            n += 1
            started = time.monotonic()
            if (k + n) % 2:
                status, headers, body = call(f"{router.url}/generate", gen_body(f"k{k}n{n}", 24),
                                             timeout=60)
                outcomes.append(("plain", started, status, headers.get("X-Block-Instance"), body))
            else:
                req = urllib.request.Request(f"{router.url}/generate", headers=JSON, data=json.dumps(
                    gen_body(f"s{k}n{n}", 24, stream=True)).encode())
                with urllib.request.urlopen(req, timeout=60) as r:
                    events = [line.strip()[5:].strip() for line in r if line.startswith(b"data:")]
                    outcomes.append(("stream", started, r.status, r.headers["X-Block-Instance"],
                                     events))

    with cf.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(worker, k) for k in range(8)]
        deadline = time.monotonic() + 60
        while sum(1 for o in outcomes if o[3] == dead) < 3:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        third.stop_instance(0, sig=signal.SIGKILL)
        killed_at.append(time.monotonic())
        while time.monotonic() < killed_at[0] + 5:
            time.sleep(0.1)
        stop.set()
        for f in futures:
            f.result(timeout=120)  # nothing hangs; no worker raised
    plain = [o for o in outcomes if o[0] == "plain"]
    assert plain and all(o[2] == 200 for o in plain), [o[:4] for o in plain if o[2] != 200]
    for kind, started, status, url, events in outcomes:
        if kind == "stream":
            assert status == 200
            done = events[-1] == b"[DONE]"
            broke = b"failed mid-stream" in events[-1]
            assert done or (url == dead and broke), events[-1]
        if started > killed_at[0] + 1.0:
            assert url != dead
    status, _, body = call(f"{router.url}/health")
    assert dead not in json.loads(body)["healthy_instances"]
