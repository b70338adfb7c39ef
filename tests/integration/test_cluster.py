"""Real SGLang servers on the CPU test bed: serving, streaming, radix cache, start/stop."""

import json
import os
import subprocess
import sys
import urllib.request

import pytest

from block_sgl.testing.cluster import (ClusterConfig, ClusterError, LocalCluster,
                                      live_group_members, port_in_use)


def post(url, body, timeout=120):
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.read()


def sse_events(url, body, timeout=120):
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    events = []
    with urllib.request.urlopen(req, timeout=timeout) as r:
        for line in r:
            line = line.strip()
            if line.startswith(b"data:"):
                events.append(line[5:].strip())
    return events


def test_generate_on_every_instance(cluster):
    for url in cluster.urls:
        out = json.loads(post(f"{url}/generate", {
            "text": "What is the capital of France?",
            "sampling_params": {"max_new_tokens": 6, "ignore_eos": True, "temperature": 0}}))
        assert out["meta_info"]["completion_tokens"] == 6
        assert out["meta_info"]["prompt_tokens"] > 3
        assert len(out["output_ids"]) == 6


def test_chat_completions_plain_and_streaming(cluster):
    url = cluster.urls[1]
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 5}
    out = json.loads(post(f"{url}/v1/chat/completions", body))
    assert out["object"] == "chat.completion"
    assert out["usage"]["completion_tokens"] == 5
    events = sse_events(f"{url}/v1/chat/completions", {**body, "stream": True})
    assert events[-1] == b"[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len(chunks) >= 2


def test_generate_streaming(cluster):
    events = sse_events(f"{cluster.urls[0]}/generate", {
        "text": "Count to ten", "stream": True,
        "sampling_params": {"max_new_tokens": 8, "ignore_eos": True}})
    assert events[-1] == b"[DONE]"
    finals = [json.loads(e) for e in events[:-1]]
    assert finals[-1]["meta_info"]["completion_tokens"] == 8
    assert len(finals) >= 2  # several chunks, not one


def test_repeated_long_prompt_hits_the_radix_cache(cluster):
    url = cluster.urls[0]
    ids = [(i * 7919) % 20000 + 100 for i in range(800)]
    body = {"input_ids": ids, "sampling_params": {"max_new_tokens": 2, "temperature": 0}}
    first = json.loads(post(f"{url}/generate", body))["meta_info"]
    second = json.loads(post(f"{url}/generate", body))["meta_info"]
    assert first["cached_tokens"] < 100
    # page size 16: every full page of the prompt is cached (the last token is always recomputed)
    assert second["cached_tokens"] >= 800 - 16


def test_port_clash_is_reported_before_starting(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert port_in_use(port)
        with pytest.raises(ClusterError, match=f"port {port}"):
            LocalCluster(ClusterConfig(instances=1, ports=(port,), log_dir=str(tmp_path))).start()


def test_missing_sglang_is_reported(tmp_path):
    with pytest.raises(ClusterError, match="SGLang is not installed"):
        LocalCluster(ClusterConfig(instances=1, python="/usr/bin/python3",
                                   log_dir=str(tmp_path))).start()


def test_bad_emulation_profile_stops_the_server_with_a_message(tmp_path):
    c = LocalCluster(ClusterConfig(instances=1, emulate="h100-llama2-7b",
                                   env=(("BLOCK_SGL_EMULATE", "h200-magic"),), log_dir=str(tmp_path)))
    with pytest.raises(ClusterError) as err:
        c.start()
    message = str(err.value)
    assert "exited" in message
    assert "BLOCK_SGL_EMULATE='h200-magic'" in message and "h100-llama2-7b" in message
    assert c.instances[0].process is None  # torn down after the failed start


def test_server_flag_validates_like_the_env(tmp_path):
    """`--block-emulate` is a real sglang.launch_server flag; a bad value refuses to start."""
    proc = subprocess.run(
        [sys.executable, "-m", "sglang.launch_server", "--help"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "SGLANG_USE_CPU_ENGINE": "1"})
    assert "--block-emulate" in proc.stdout and "--block-time-scale" in proc.stdout
    c = LocalCluster(ClusterConfig(instances=1, extra_args=("--block-time-scale", "-3"),
                                   log_dir=str(tmp_path)))
    with pytest.raises(ClusterError, match="BLOCK_SGL_TIME_SCALE='-3'"):
        c.start()


def test_stock_behaviour_without_block_sgl_settings_and_clean_stop(tmp_path, cluster):
    """Plugin installed, nothing enabled: SGLang as stock (same greedy output, no KV-event
    config, no block_sgl log line); then stop() leaves no process behind."""
    psutil = pytest.importorskip("psutil")
    c = LocalCluster(ClusterConfig(instances=1, log_dir=str(tmp_path)))
    try:
        c.start()
        body = {"input_ids": list(range(300, 340)), "sampling_params": {"max_new_tokens": 12, "temperature": 0}}
        stock = json.loads(post(f"{c.urls[0]}/generate", body))["output_ids"]
        hooked = json.loads(post(f"{cluster.urls[0]}/generate", body))["output_ids"]
        assert stock == hooked
        with urllib.request.urlopen(f"{c.urls[0]}/server_info", timeout=30) as r:
            assert json.loads(r.read())["kv_events_config"] is None
        log = c.instances[0].log_path.read_text()
        assert "block_sgl publishing" not in log and "block_sgl:" not in log
        server = psutil.Process(c.instances[0].process.pid)
        tree = [server] + server.children(recursive=True)
        assert len(tree) >= 3  # http server + scheduler + detokenizer
        pgid = server.pid
    finally:
        c.stop()
    assert live_group_members(pgid) == []
    assert not [p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def test_instances_serve_float32_with_one_torch_thread(cluster):
    """SGLang's ``--dtype auto`` would downcast the float32 tiny model to float16 (slow on CPUs),
    and a full OpenMP team per instance makes instances sharing cores stall one another."""
    for inst in cluster.instances:
        with urllib.request.urlopen(f"{inst.url}/server_info", timeout=30) as r:
            info = json.loads(r.read())
        assert info["dtype"] == "float32"
        # The server's environment, which SGLang's spawned scheduler inherits (the scheduler's own
        # /proc/PID/environ is overwritten by setproctitle, so it cannot be read there).
        with open(f"/proc/{inst.process.pid}/environ", "rb") as f:
            env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
        assert env[b"OMP_NUM_THREADS"] == b"1"


def test_torch_threads_below_one_is_refused():
    with pytest.raises(ClusterError, match="torch_threads"):
        LocalCluster(ClusterConfig(instances=1, torch_threads=0)).start()
