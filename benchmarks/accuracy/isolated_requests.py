"""fastsim without future arrivals: how close is the simulator when nothing arrives later?

``fastsim_accuracy.py`` predicts at each arrival of a bursty replay; its error mixes the
simulator's own error with the effect of requests that arrive *after* the prediction (each adds
a prefill step and grows the decode batch), which no at-arrival predictor can see. This script
isolates the simulator: one emulated instance, the step model fitted from its own step records
(as in ``fastsim_accuracy.py``), then (a) one request alone and (b) a batch of requests sent at
once, each predicted from the snapshot plus the ones already sent (so the last of the batch is
predicted with full knowledge), compared with the observed TTFT / E2E.

    .venv/bin/python benchmarks/accuracy/isolated_requests.py [--batch 10] [--time-scale 8]

Prints one line per case and a JSON object last (not written to results: a diagnostic).
"""

from __future__ import annotations

import argparse
import json
import threading
import time
import urllib.request

import numpy as np

from block_sgl import fastsim
from block_sgl.predictor import perf_model
from block_sgl.predictor.profile import ProfileGrid, profile
from block_sgl.router.ingest import StreamSubscriber
from block_sgl.router.state import instance_config, instance_state
from block_sgl.testing.cluster import ClusterConfig, LocalCluster, free_port

from fastsim_accuracy import PROFILE, stream_generate  # same directory


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=10, help="requests sent at once in case (b)")
    ap.add_argument("--input-len", type=int, default=500)
    ap.add_argument("--output-len", type=int, default=100)
    ap.add_argument("--time-scale", type=float, default=8.0)
    args = ap.parse_args()
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    config = ClusterConfig(instances=1, emulate=PROFILE, time_scale=args.time_scale,
                           env=(("BLOCK_SGL_PUBLISH", endpoint),))
    out = {"profile": PROFILE, "time_scale": args.time_scale, "cases": []}
    with LocalCluster(config) as cluster:
        url = cluster.urls[0]
        doc = profile(url, endpoint, ProfileGrid(repeats=1), seed=1)
        step_model = perf_model.model_from_json(doc).as_array()
        sub = StreamSubscriber([endpoint])
        sub.start()
        assert sub.wait_until(lambda s: not s.stale(), 30), sub.errors
        state = sub.states[endpoint]
        cfg = instance_config(state.hello)
        urllib.request.urlopen(urllib.request.Request(f"{url}/flush_cache", method="POST")).read()
        n_in, n_out = args.input_len, args.output_len
        for case, size in (("alone", 1), ("batch", args.batch)):
            time.sleep(1.0)  # idle instance, fresh snapshot
            snap = state.snapshot
            sent, sent_at, preds, results, threads = [], [], [], [{} for _ in range(size)], []
            for k in range(size):
                ids = [100 + (7919 * (k + 1) * (i + 1)) % 20000 for i in range(n_in)]  # no sharing
                # replayed from the snapshot: the earlier ones arrive when they were sent
                st = instance_state(cfg, snap, lambda cols: [n_out] * len(cols), time.time())
                if sent:
                    st = st.with_pending(fastsim.RequestTable.from_rows(sent),
                                         np.maximum.accumulate(np.maximum(np.array(sent_at) - snap.time, 0.0)))
                preds.append(fastsim.predict(st, fastsim.Candidate(n_in, 0, n_out, n_out, True),
                                             step_model))
                sent.append((n_in, 0, 0, n_out, 1, n_out))
                sent_at.append(time.time())
                t = threading.Thread(target=stream_generate,
                                     args=(url, f"iso-{case}-{k}", ids, n_out, results[k]))
                t.start()
                threads.append(t)
            for t in threads:
                t.join()
            last = size - 1  # predicted knowing every request of the case
            row = {"case": case, "requests": size, "pred_ttft_s": preds[last].ttft_s,
                   "obs_ttft_s": results[last]["ttft"], "pred_e2e_s": preds[last].e2e_s,
                   "obs_e2e_s": results[last]["e2e"],
                   "e2e_rel_err": preds[last].e2e_s / results[last]["e2e"] - 1.0}
            out["cases"].append(row)
            print(f"{case:6s} x{size:<3d} last request: TTFT {row['pred_ttft_s']:.3f} predicted / "
                  f"{row['obs_ttft_s']:.3f} observed s, E2E {row['pred_e2e_s']:.2f} / "
                  f"{row['obs_e2e_s']:.2f} s ({100 * row['e2e_rel_err']:+.1f} %)", flush=True)
        sub.stop()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
