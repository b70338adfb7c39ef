"""The main job's local demo: a small emulated SGLang cluster on this machine.

Starts 2 real SGLang servers (tiny model, H100 + Llama-2-7B speed emulated at a 4x time scale),
sends one request through each, prints what came back, and tears everything down.

    python -m block_sgl.demo [--instances 2] [--time-scale 4]
"""

from __future__ import annotations

import argparse
import json
import time
import urllib.request

from block_sgl.testing.cluster import ClusterConfig, ClusterError, LocalCluster


def _generate(url: str, text: str, max_new_tokens: int) -> dict:
    body = json.dumps({"text": text, "sampling_params": {
        "max_new_tokens": max_new_tokens, "ignore_eos": True, "temperature": 0}}).encode()
    req = urllib.request.Request(f"{url}/generate", data=body, headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--instances", type=int, default=2, help="SGLang servers to start")
    p.add_argument("--emulate", default="h100-llama2-7b", help="GPU profile to emulate")
    p.add_argument("--time-scale", type=float, default=4.0, help="emulated-time stretch factor")
    args = p.parse_args(argv)
    config = ClusterConfig(instances=args.instances, emulate=args.emulate, time_scale=args.time_scale)
    print(f"starting {args.instances} SGLang instances (emulating {args.emulate}, "
          f"time scale {args.time_scale}x) ...", flush=True)
    started = time.monotonic()
    try:
        with LocalCluster(config) as cluster:
            print(f"ready in {time.monotonic() - started:.0f} s: {', '.join(cluster.urls)}")
            for url in cluster.urls:
                out = _generate(url, "Explain what a radix cache does in an LLM server.", 16)
                meta = out["meta_info"]
                print(f"{url}: {meta['prompt_tokens']} prompt tokens -> {meta['completion_tokens']} "
                      f"tokens in {meta['e2e_latency'] * 1e3:.0f} ms "
                      f"({meta['e2e_latency'] * 1e3 / args.time_scale:.0f} ms emulated GPU time)")
    except ClusterError as e:
        raise SystemExit(f"error: {e}") from None
    print("all instances stopped")


if __name__ == "__main__":
    main()
