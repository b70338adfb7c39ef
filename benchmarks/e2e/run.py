"""End-to-end benchmark (issue 8): serving capacity of block_sgl's routing policies and
sglang-router on a cluster of real SGLang instances with emulated GPU speed.

    python -m benchmarks.e2e.run --smoke                     # CI-sized: ~2-3 min
    python -m benchmarks.e2e.run --instances 4 --workloads mooncake azure sharegpt gsp \\
        --policies block round_robin least_requests cache_aware --seeds 0 1 2
    python -m benchmarks.e2e.run --worker-urls http://h1:30000 http://h2:30000 ...  # a running cluster

It starts K SGLang instances once (tiny model, ``--emulate`` GPU profile × ``--time-scale``,
block_sgl state stream on), then for every workload and router configuration searches the
serving capacity — the highest arrival rate whose P99 TTFT stays within the SLO — by doubling
and bisection over rates, every rate with several seeds (median decides; spread reported).
Each (router, rate, seed) run gets a freshly started router and flushed radix caches, so runs
do not inherit each other's cache or router state. See benchmarks/e2e/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.e2e import workloads as wl  # noqa: E402
from benchmarks.e2e.client import replay, summarise  # noqa: E402
from benchmarks.e2e.routers import RouterProcess, RouterSpec, parse_policies  # noqa: E402

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "e2e"
DEFAULT_SGR = "/tmp/sgr/bin/python"
# cache_aware threshold grid (--sweep-cache-aware): cache_threshold x (abs, rel) balance pairs
SWEEP_CACHE = (0.1, 0.3, 0.5, 0.8)
SWEEP_BALANCE = ((64, 1.5), (16, 1.2), (4, 1.05))


# -- environment -----------------------------------------------------------------------------

def git_commit() -> dict:
    def run(*a):
        try:
            return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""
    return {"commit": run("rev-parse", "HEAD") or None,
            "dirty": bool(run("status", "--porcelain", "--untracked-files=no"))}


def machine() -> dict:
    cpu = platform.processor()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal"):
                mem = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return {"host": platform.node(), "cpus": os.cpu_count(), "cpu_model": cpu, "mem_gib": mem,
            "python": platform.python_version(), "platform": platform.platform()}


def cpu_times() -> tuple[float, float] | None:
    try:
        f = [float(x) for x in open("/proc/stat").readline().split()[1:]]
    except OSError:
        return None
    idle = f[3] + (f[4] if len(f) > 4 else 0)
    return sum(f), idle


def group_cpu_s(pgids: set[int]) -> float:
    """CPU seconds (user + system) used so far by the live processes of these process groups."""
    from block_sgl.testing.cluster import proc_stats

    tick = os.sysconf("SC_CLK_TCK")
    return sum((int(f[11]) + int(f[12])) / tick for _, f in proc_stats() if int(f[2]) in pgids)


def self_cpu_s() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def cpu_busy(before, after) -> float | None:
    if not before or not after or after[0] <= before[0]:
        return None
    return 1.0 - (after[1] - before[1]) / (after[0] - before[0])


def sglang_router_python(arg: str | None) -> tuple[str | None, str]:
    """(python of a venv with sglang_router, version or the reason it is missing)."""
    path = arg or DEFAULT_SGR
    if arg == "none":
        return None, "disabled (--sglang-router-python none)"
    if not Path(path).exists():
        return None, f"not available: {path} does not exist"
    probe = subprocess.run([path, "-c", "import sglang_router, importlib.metadata as m; "
                            "print(m.version('sglang-router'))"], capture_output=True, text=True)
    if probe.returncode != 0:
        return None, f"not available: {path} cannot import sglang_router"
    return path, probe.stdout.strip()


def package_version(name: str) -> str | None:
    try:
        import importlib.metadata as m
        return m.version(name)
    except Exception:
        return None


# -- cluster ---------------------------------------------------------------------------------

def flush_caches(urls: list[str], timeout_s: float = 120.0) -> None:
    """POST /flush_cache on every instance; SGLang refuses while requests run, so retry."""
    deadline = time.monotonic() + timeout_s
    for url in urls:
        while True:
            try:
                req = urllib.request.Request(f"{url}/flush_cache", data=b"", method="POST")
                with urllib.request.urlopen(req, timeout=10) as r:
                    if r.status == 200:
                        break
            except urllib.error.HTTPError:
                pass
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url}: /flush_cache did not succeed within {timeout_s:.0f} s")
            time.sleep(0.5)


class Bench:
    def __init__(self, args, urls: list[str], sgr_python: str | None, log_dir: Path,
                 instance_pgids: set[int] = frozenset()):
        self.args = args
        self.instance_pgids = set(instance_pgids)
        self.urls = urls
        self.sgr = sgr_python
        self.log_dir = log_dir
        self.router_problems: list[dict] = []
        self.runs: list[dict] = []
        self.t_scale = args.time_scale if args.emulate else 1.0
        self.slo_ttft = args.slo_ttft * self.t_scale
        self.slo_tpot = args.slo_tpot * self.t_scale
        self._run_no = len(list(log_dir.glob("router-*.log"))) if log_dir else 0
        self.previous: dict[tuple, dict] = {}
        if getattr(args, "resume", None):
            old = json.loads(Path(args.resume).read_text())
            for r in old.get("runs", []):
                self.previous[_run_key(r["router"], r["workload"], r["rate_rps"], r["seed"],
                                       r["purpose"])] = r
            print(f"resuming: {len(self.previous)} runs from {args.resume}", flush=True)

    # one (router, workload, rate, seed) run
    def run_once(self, spec: RouterSpec, w: wl.Workload, rate: float, seed: int, *,
                 n: int | None = None, purpose: str = "capacity") -> dict:
        from tqdm import tqdm

        args = self.args
        key = _run_key(spec.name, w.name, rate, seed, purpose)
        if key in self.previous and not (n and self.previous[key]["requests"] != n):
            s = {**self.previous.pop(key), "resumed": True}
            self.runs.append(s)
            print(f"  {w.name} {spec.name} {rate:.3g}/s s{seed}: resumed (p99 TTFT "
                  f"{_fmt(s['ttft_s']['p99'])} s)", flush=True)
            return s
        flush_caches(self.urls)
        self._run_no += 1
        safe = re.sub(r"[^A-Za-z0-9.=,+-]+", "_", spec.name).strip("_")
        log = self.log_dir / f"router-{self._run_no:04d}-{safe}.log"
        router = None
        for attempt in range(2):
            try:
                router = RouterProcess(spec, self.urls, log, seed=seed,
                                       sglang_router_python=self.sgr)
                break
            except RuntimeError as e:
                print(f"  {spec.name}: router start failed (attempt {attempt + 1}): {e}", flush=True)
                self.router_problems.append({"router": spec.name, "workload": w.name, "rate": rate,
                                             "seed": seed, "log": str(log),
                                             "lines": [f"start failed: {str(e)[-600:]}"]})
                time.sleep(3)
        if router is None:
            return self._failed_run(spec, w, rate, seed, n, purpose, log)
        schedule = w.at_rate(rate)[: n or len(w.requests)]
        duration = schedule[-1][0] if schedule else 0.0
        timeout = duration + args.drain_timeout
        desc = f"{w.name} {spec.name} {rate:.3g}/s s{seed}"
        before = cpu_times()
        load0 = os.getloadavg()[0]
        own0 = (group_cpu_s(self.instance_pgids), group_cpu_s({router.proc.pid}), self_cpu_s())
        t_run = time.monotonic()
        try:
            with tqdm(total=len(schedule), desc=desc, unit="req", leave=False,
                      disable=args.no_progress, dynamic_ncols=True) as bar:
                records, info = asyncio.run(replay(
                    router.url, schedule, slo_ttft_s=self.slo_ttft if args.early_stop else None,
                    early_stop=args.early_stop, timeout_s=timeout, progress=bar))
        finally:
            own1 = (group_cpu_s(self.instance_pgids), group_cpu_s({router.proc.pid}), self_cpu_s())
            t_run = max(time.monotonic() - t_run, 1e-9)
            problems = router.problems()
            alive = router.alive()
            router.stop()
        busy = cpu_busy(before, cpu_times())
        s = summarise(records, info, slo_ttft_s=self.slo_ttft, slo_tpot_s=self.slo_tpot)
        s.update({"router": spec.name, "workload": w.name, "rate_rps": rate, "seed": seed,
                  "purpose": purpose, "router_startup_s": round(router.startup_s, 2),
                  "router_alive_at_end": alive, "machine_cpu_busy": busy,
                  "cpu_cores_used": {"instances": (own1[0] - own0[0]) / t_run,
                                     "router": (own1[1] - own0[1]) / t_run,
                                     "client": (own1[2] - own0[2]) / t_run},
                  "loadavg_1m_start": load0, "router_log": str(log)})
        if problems:
            s["router_log_problems"] = problems
            self.router_problems.append({"router": spec.name, "workload": w.name, "rate": rate,
                                         "seed": seed, "log": str(log), "lines": problems})
        if args.save_requests:
            path = self.log_dir / f"requests-{self._run_no:04d}.jsonl"
            with open(path, "w") as f:
                for rec in records:
                    f.write(json.dumps(dataclasses.asdict(rec)) + "\n")
            s["requests_file"] = str(path)
        self.runs.append(s)
        ttft = s["ttft_s"]["p99"]
        print(f"  {desc}: p99 TTFT {_fmt(ttft)} s, goodput {s['goodput_rps']:.2f}/s, "
              f"hit {s['prefix_hit_ratio']:.2f}, done {s['completed']}/{s['requests']}"
              + (f", errors {s['errors']}" if s["errors"] else "")
              + (f", stopped early ({s['early_stopped']})" if s["early_stopped"] else "")
              + (f", machine CPU {busy:.0%}" if busy is not None else "")
              + ", ours (cores): " + "/".join(f"{v:.2f}" for v in s["cpu_cores_used"].values()),
              flush=True)
        if s["errors"]:
            print(f"    errors: {s['error_examples']}", flush=True)
        if problems:
            print(f"    router log ({log.name}): " + " | ".join(problems[:3]), flush=True)
        return s

    def _failed_run(self, spec, w, rate, seed, n, purpose, log) -> dict:
        """A run whose router never started: every request failed (the rate fails)."""
        from benchmarks.e2e.client import Record

        schedule = w.at_rate(rate)[: n or len(w.requests)]
        records = [Record(i, t, r.input_len, r.output_len, error="router did not start")
                   for i, (t, r) in enumerate(schedule)]
        s = summarise(records, {"early_stopped": None, "wall_s": 0.0},
                      slo_ttft_s=self.slo_ttft, slo_tpot_s=self.slo_tpot)
        s.update({"router": spec.name, "workload": w.name, "rate_rps": rate, "seed": seed,
                  "purpose": purpose, "router_start_failed": True, "router_log": str(log)})
        self.runs.append(s)
        return s

    def capacities(self, specs: list[RouterSpec], w_by_seed: dict, on_round=None) -> list[dict]:
        """Capacity of every router, searched side by side: each round, every router still
        searching gets its next rate, and the runs of the round are interleaved (for each
        seed, each router in turn, the order rotating from round to round), so slow drift of
        the machine (other work, thermal) hits every router alike instead of whichever was
        measured last."""
        args = self.args
        points = {spec: {} for spec in specs}
        plans = {spec: search_plan(args, len(self.urls), points[spec]) for spec in specs}
        pending: dict[RouterSpec, float] = {}

        def advance(spec, value=None, first=False):
            """Next new rate of this router's plan (rates already measured are answered from
            ``points``); None when its search is over."""
            plan = plans[spec]
            try:
                rate = next(plan) if first else plan.send(value)
                while round(rate, 4) in points[spec]:
                    rate = plan.send(points[spec][round(rate, 4)]["pass"])
                return round(rate, 4)
            except StopIteration:
                return None

        for spec in specs:
            rate = advance(spec, first=True)
            if rate is not None:
                pending[spec] = rate
        round_no = 0
        while pending:
            active = list(pending)
            print(f"   round {round_no + 1}: " + ", ".join(f"{s.name} @ {pending[s]:g}/s"
                                                         for s in active), flush=True)
            per_seed: dict[RouterSpec, list[dict]] = {s: [] for s in active}
            for i, seed in enumerate(args.seeds):
                shift = (round_no + i) % len(active)
                for spec in active[shift:] + active[:shift]:
                    per_seed[spec].append(self.run_once(spec, w_by_seed[seed], pending[spec], seed))
            for spec in active:
                runs = sorted(per_seed[spec], key=lambda r: args.seeds.index(r["seed"]))
                pt = aggregate_point(pending[spec], runs, self.slo_ttft)
                points[spec][pending[spec]] = pt
                nxt = advance(spec, pt["pass"])
                if nxt is None:
                    del pending[spec]
                else:
                    pending[spec] = nxt
            round_no += 1
            if on_round is not None:  # rows so far, for partial results
                on_round([self.row(spec, points[spec]) for spec in specs])
        return [self.row(spec, points[spec]) for spec in specs]

    def row(self, spec: RouterSpec, points: dict[float, dict]) -> dict:
        lo, hi = bracket(points)
        per_seed_caps = []
        for i, _seed in enumerate(self.args.seeds):
            seed_pass = {r: p["per_seed"][i]["meets_slo"] for r, p in points.items()}
            per_seed_caps.append(bracket_from(seed_pass)[0] or 0.0)
        cap = lo or 0.0
        return {"router": spec.name, "kind": spec.kind, "policy": spec.policy,
                "args": list(spec.args), "oracle": spec.oracle, "is_block": spec.is_block,
                "capacity_rps": cap, "capacity_gpu_equiv_rps": cap * self.t_scale,
                "capacity_upper_rps": hi, "capacity_per_seed_rps": per_seed_caps,
                "capacity_spread_rps": [min(per_seed_caps), max(per_seed_caps)],
                "points": [points[r] for r in sorted(points)]}


def search_plan(args, instances: int, points: dict[float, dict]):
    """One router's rate search, as a generator: yields the next rate to measure and is sent
    whether it passed. The --rates grid upwards (stopping after two failing rates in a row) or
    doubling/halving from --start-rate; then --bisect-steps bisections of the bracket."""
    if args.rates:
        fails = 0
        for r in sorted(args.rates):
            ok = yield r
            fails = 0 if ok else fails + 1
            if fails >= 2:  # two failing rates in a row: higher ones fail too
                break
    else:
        r = args.start_rate or 0.5 * instances
        ok = yield r
        if ok:
            while r * 2 <= args.max_rate:
                if not (yield r * 2):
                    break
                r *= 2
        else:
            while r / 2 >= args.min_rate:
                if (yield r / 2):
                    break
                r /= 2
    for _ in range(args.bisect_steps):
        lo, hi = bracket(points)
        if lo is None or hi is None or hi / lo < 1 + args.bisect_tolerance:
            break
        yield (lo + hi) / 2


def _run_key(router, workload, rate, seed, purpose) -> tuple:
    return (router, workload, round(float(rate), 4), int(seed), purpose)


def bracket_from(passes: dict[float, bool]) -> tuple[float | None, float | None]:
    """(highest passing rate below the lowest failing rate, that failing rate)."""
    fails = sorted(r for r, ok in passes.items() if not ok)
    hi = fails[0] if fails else None
    ok = [r for r, good in passes.items() if good and (hi is None or r < hi)]
    return (max(ok) if ok else None), hi


def bracket(points: dict[float, dict]):
    return bracket_from({r: p["pass"] for r, p in points.items()})


KEYS = (("ttft_s", "p50"), ("ttft_s", "p90"), ("ttft_s", "p99"), ("tpot_s", "p50"),
        ("tpot_s", "p90"), ("tpot_s", "p99"), ("e2e_s", "p50"), ("e2e_s", "p90"),
        ("e2e_s", "p99"))
FLAT = ("throughput_rps", "output_tokens_per_s", "goodput_rps", "slo_attainment",
        "prefix_hit_ratio")


def aggregate_point(rate: float, per_seed: list[dict], slo_ttft: float) -> dict:
    def stat(vals):
        vals = [v for v in vals if v is not None and math.isfinite(v)]
        if not vals:
            return None
        return {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}

    out = {"rate_rps": rate, "seeds": [s["seed"] for s in per_seed]}
    for k, q in KEYS:
        out[f"{k}_{q}"] = stat([s[k][q] for s in per_seed])
    for k in FLAT:
        out[k] = stat([s[k] for s in per_seed])
    # a seed whose run failed for errors or unsent requests counts as over the SLO
    p99 = [s["ttft_s"]["p99"] if s["meets_slo"] else max(s["ttft_s"]["p99"] or math.inf,
                                                          math.nextafter(slo_ttft, math.inf))
           for s in per_seed]
    out["pass"] = statistics.median(p99) <= slo_ttft
    out["early_stopped"] = [s["early_stopped"] for s in per_seed]
    out["errors"] = sum(s["errors"] for s in per_seed)
    out["per_seed"] = [{k: s[k] for k in ("seed", "meets_slo", "early_stopped", "errors",
                                          "completed", "requests")} | {"ttft_p99_s": s["ttft_s"]["p99"]}
                       for s in per_seed]
    return out


def _fmt(x):
    return "n/a" if x is None else f"{x:.3g}"


# -- sweep of cache_aware thresholds ---------------------------------------------------------

def sweep_specs(kind: str, quick: bool) -> list[RouterSpec]:
    caches = (0.3, 0.7) if quick else SWEEP_CACHE
    balances = SWEEP_BALANCE[:2] if quick else SWEEP_BALANCE
    out = []
    for c in caches:
        for a, r in balances:
            args = ("--cache-threshold", str(c), "--balance-abs-threshold", str(a),
                    "--balance-rel-threshold", str(r))
            name = ("sgl-router" if kind == "sglang_router" else "block_sgl") + \
                f"/cache_aware[c={c},abs={a},rel={r}]"
            out.append(RouterSpec(kind, "cache_aware", args, label=name))
    return out


def run_sweep(bench: Bench, kind: str, w: wl.Workload, rate: float) -> dict:
    args = bench.args
    rows = []
    for spec in sweep_specs(kind, args.sweep_quick):
        s = bench.run_once(spec, w, rate, args.seeds[0], n=args.sweep_requests, purpose="sweep")
        rows.append({"router": spec.name, "args": list(spec.args), "goodput_rps": s["goodput_rps"],
                     "ttft_p99_s": s["ttft_s"]["p99"], "meets_slo": s["meets_slo"],
                     "prefix_hit_ratio": s["prefix_hit_ratio"]})

    def score(r):
        return (r["meets_slo"], r["goodput_rps"], -(r["ttft_p99_s"] or math.inf))
    best = max(rows, key=score)
    return {"kind": kind, "workload": w.name, "rate_rps": rate, "seed": args.seeds[0],
            "requests": args.sweep_requests, "rows": rows, "best": best}


# -- main ------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.e2e.run",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("cluster")
    g.add_argument("--instances", "-K", type=int, default=4)
    g.add_argument("--worker-urls", nargs="+", help="use these running instances (each with the "
                   "block_sgl stream on) instead of starting a local cluster")
    g.add_argument("--emulate", default="h100-llama2-7b", help="GPU profile ('' = real CPU speed)")
    g.add_argument("--time-scale", type=float, default=4.0)
    g.add_argument("--max-total-tokens", type=int, default=65536, help="KV capacity per instance")
    g.add_argument("--max-running-requests", type=int, default=32,
                   help="running-batch cap: keep it x ~0.35 ms (CPU cost per decoding request) below "
                        "the emulated step time")
    g.add_argument("--chunked-prefill-size", type=int, default=4096)
    g.add_argument("--health-generation", action="store_true",
                   help="keep SGLang's default GET /health (a 1-token generation that takes >= 1 s "
                        "and longer when busy); default: /health is plain liveness "
                        "(SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION=0), so routers' health checks "
                        "do not time out on busy instances")
    g.add_argument("--start-timeout", type=float, default=900.0,
                   help="s to wait for the instances to be ready (a busy 2-core box is slow)")
    g.add_argument("--stream-interval", type=int, default=8,
                   help="SGLang --stream-interval (first token at once, then every N): fewer "
                        "stream chunks = less CPU on the 2-core test bed")
    g = p.add_argument_group("workloads")
    g.add_argument("--workloads", nargs="+", default=["mooncake", "azure", "sharegpt", "gsp"],
                   choices=wl.WORKLOADS)
    g.add_argument("--requests", "-n", type=int, default=300, help="requests per run")
    g.add_argument("--data-dir", default=str(wl.DATA_DIR), help="Mooncake/Azure trace folder")
    g.add_argument("--mooncake-length-scale", type=float, default=0.125,
                   help="scale of every Mooncake length (prompt, output, 512-token block)")
    g.add_argument("--mooncake-arrivals", choices=("spread", "trace"), default="spread",
                   help="spread: uniform within the trace's 3 s timestamp buckets")
    g.add_argument("--azure-length-scale", type=float, default=1.0)
    g.add_argument("--sharegpt-arrivals", choices=("azure", "poisson"), default="azure")
    g.add_argument("--gsp", type=int, nargs=5, default=[16, 16, 2048, 128, 128],
                   metavar=("GROUPS", "PER_GROUP", "SYSTEM", "QUESTION", "OUTPUT"),
                   help="generated shared prefix shape")
    g.add_argument("--max-context", type=int, default=32768, help="drop longer requests")
    g.add_argument("--prompt-format", choices=("text", "input_ids"), default="text",
                   help="text: token-exact text (text-matching routers see the prefix); "
                        "input_ids: the token ids")
    g = p.add_argument_group("routers")
    g.add_argument("--policies", nargs="+", default=["block", "round_robin", "least_requests",
                                                    "cache_aware"],
                   help="block_sgl policies; NAME+oracle = the router sees output lengths; "
                        "NAME+lm = the router loads --length-model; NAME+lm-mean = the same "
                        "with --length-estimate mean")
    g.add_argument("--length-model", default=None,
                   help="response-length model directory (python -m "
                        "block_sgl.predictor.train_length) for the NAME+lm rows; train it on "
                        "ShareGPT conversations the sharegpt workload does not use: "
                        "--exclude-conversations 4000:8000 (or --limit 4000)")
    g.add_argument("--sglang-router-policies", nargs="*", default=["cache_aware", "round_robin"])
    g.add_argument("--sglang-router-python", default=None,
                   help=f"python with sglang-router 0.3.2 (default {DEFAULT_SGR}; 'none' = skip)")
    g.add_argument("--sweep-cache-aware", action="store_true",
                   help="sweep cache_aware thresholds (both routers) on a short run and add the "
                        "best configuration to the capacity search")
    g.add_argument("--sweep-quick", action="store_true", help="a 2x2 threshold grid, not 4x3")
    g.add_argument("--sweep-requests", type=int, default=150)
    g.add_argument("--sweep-rate", type=float, help="rate of the sweep (default: 1.1 x the best "
                   "baseline capacity found before it)")
    g = p.add_argument_group("load and SLO")
    g.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    g.add_argument("--rates", type=float, nargs="+", help="rates to try (req/s, wall clock); "
                   "default: doubling from --start-rate")
    g.add_argument("--start-rate", type=float, help="default 0.5 x K req/s")
    g.add_argument("--min-rate", type=float, default=0.05)
    g.add_argument("--max-rate", type=float, default=256.0)
    g.add_argument("--bisect-steps", type=int, default=3)
    g.add_argument("--bisect-tolerance", type=float, default=0.05)
    g.add_argument("--slo-ttft", type=float, default=1.0,
                   help="P99 TTFT objective, s of emulated GPU time (x time scale on the test bed)")
    g.add_argument("--slo-tpot", type=float, default=0.1, help="TPOT objective for goodput, s "
                   "of emulated GPU time")
    g.add_argument("--no-early-stop", dest="early_stop", action="store_false",
                   help="run every request even when the P99 TTFT is certainly over the SLO")
    g.add_argument("--drain-timeout", type=float, default=120.0,
                   help="s allowed after the last arrival before unfinished requests are cut")
    g = p.add_argument_group("output")
    g.add_argument("--out", default=None, help=f"output folder (default {DEFAULT_OUT}, "
                   "smoke: <default>/smoke)")
    g.add_argument("--tag", default=None, help="name of this run in the file names")
    g.add_argument("--no-progress", action="store_true")
    g.add_argument("--resume", metavar="JSON", help="reuse the runs recorded in this results file "
                   "(or its .partial.json) for the same (router, workload, rate, seed); the "
                   "workload flags must be the same as in that run")
    g.add_argument("--save-requests", action="store_true",
                   help="write every request's measurements (jsonl) next to the router logs")
    g.add_argument("--smoke", action="store_true",
                   help="CI size: 2 instances, block vs round_robin, 16 Mooncake requests (from "
                        "the trace slice in benchmarks/e2e/data/smoke), one rate, one seed, no "
                        "sglang-router")
    return p


SMOKE_DATA_DIR = Path(__file__).resolve().parent / "data" / "smoke"
"""A 200-request slice of the Mooncake trace kept in the repo (see its README.md): the smoke
run must not depend on the shared data folder being next to the checkout."""


def apply_smoke(args) -> None:
    args.data_dir = str(SMOKE_DATA_DIR)
    args.instances = 2
    args.workloads = ["mooncake"]
    args.policies = ["block", "round_robin"]
    args.sglang_router_policies = []
    args.sglang_router_python = args.sglang_router_python or "none"
    args.requests = 16
    args.rates = args.rates or [1.0]
    args.seeds = [0]
    args.bisect_steps = 0
    args.sweep_cache_aware = False
    args.drain_timeout = 90.0
    args.early_stop = False  # let every request finish: the smoke checks the pipeline, not the SLO
    args.tag = args.tag or "smoke"


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    # SIGTERM (and SIGINT, which a shell ignores for background jobs) end the run cleanly:
    # routers and SGLang instances stopped, what was measured written
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    if args.smoke:
        apply_smoke(args)
    out = Path(args.out) if args.out else (DEFAULT_OUT / "smoke" if args.smoke else DEFAULT_OUT)
    tag = args.tag or time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    log_dir = out / "logs" / tag
    if log_dir.exists() and not args.resume:
        shutil.rmtree(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()

    sgr, sgr_version = sglang_router_python(args.sglang_router_python)
    try:
        specs = parse_policies(args.policies, sglang_router=False, length_model=args.length_model)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    if sgr:
        specs += [RouterSpec("sglang_router", p) for p in args.sglang_router_policies]
    elif args.sglang_router_policies:
        print(f"sglang-router {sgr_version}: skipping its rows "
              f"({', '.join(args.sglang_router_policies)})", flush=True)

    from block_sgl.testing.cluster import ClusterConfig, LocalCluster
    from block_sgl.testing.tiny_model import make_tiny_model

    model = make_tiny_model()
    tokens = wl.TokenSource(model)
    opts = {"mooncake_length_scale": args.mooncake_length_scale, "max_context": args.max_context,
            "mooncake_arrivals": args.mooncake_arrivals, "as_text": args.prompt_format == "text",
            "azure_length_scale": args.azure_length_scale,
            "sharegpt_arrivals": args.sharegpt_arrivals, "gsp": args.gsp,
            "data_dir": Path(args.data_dir)}
    print("building workloads ...", flush=True)
    try:
        built = {name: {seed: _build(name, args, seed, tokens, opts) for seed in args.seeds}
                 for name in args.workloads}
    except FileNotFoundError as e:
        raise SystemExit(f"error: {e}") from None

    meta = {
        "benchmark": "block_sgl e2e (issue 8)", "tag": tag, "smoke": args.smoke,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        "machine": machine(), "git": git_commit(),
        "versions": {"sglang": package_version("sglang"), "block_sgl": package_version("block_sgl"),
                     "sglang_router": sgr_version},
        "cluster": {"instances": args.instances if not args.worker_urls else len(args.worker_urls),
                    "external": bool(args.worker_urls), "emulate": args.emulate or None,
                    "time_scale": args.time_scale if args.emulate else 1.0,
                    "model": "tiny test model (block_sgl.testing.tiny_model), CPU",
                    "max_total_tokens": args.max_total_tokens,
                    "max_running_requests": args.max_running_requests,
                    "chunked_prefill_size": args.chunked_prefill_size, "page_size": 16,
                    "stream_interval": args.stream_interval,
                    "health_endpoint": "SGLang default (1-token generation)" if args.health_generation
                    else "liveness only (SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION=0)"},
        "slo": {"ttft_p99_gpu_s": args.slo_ttft, "tpot_gpu_s": args.slo_tpot,
                "ttft_p99_testbed_s": args.slo_ttft * (args.time_scale if args.emulate else 1),
                "tpot_testbed_s": args.slo_tpot * (args.time_scale if args.emulate else 1),
                "capacity": "highest rate whose P99 TTFT (median over seeds) <= SLO"},
        "seeds": args.seeds, "requests_per_run": args.requests,
        "units": "latencies in seconds and rates in req/s of test-bed wall clock; divide "
                 "latencies (multiply rates) by time_scale for emulated-GPU equivalents",
        "client": "asyncio + aiohttp, streaming /generate, open loop; max_new_tokens = trace "
                  "output length, ignore_eos, temperature 0; block_sgl routers get "
                  "--no-ignore-eos-hint unless the row is labelled +oracle",
        "routers": [s.name for s in specs],
        "resumed_from": args.resume,
        "command": " ".join([sys.executable, "-m", "benchmarks.e2e.run", *(argv if argv is not None else sys.argv[1:])]),
        "workloads": {name: {str(seed): w.info for seed, w in by.items()}
                      for name, by in built.items()},
    }

    cluster = None
    try:
        if args.worker_urls:
            urls = [u.rstrip("/") for u in args.worker_urls]
        else:
            from tests.conftest import publish_endpoints

            pub = publish_endpoints(args.instances)
            extra = ["--stream-interval", str(args.stream_interval)]
            cfg = ClusterConfig(
                instances=args.instances, emulate=args.emulate or None, time_scale=args.time_scale,
                max_total_tokens=args.max_total_tokens,
                max_running_requests=args.max_running_requests,
                chunked_prefill_size=args.chunked_prefill_size, extra_args=tuple(extra),
                env=(() if args.health_generation else
                     (("SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION", "0"),)),
                log_dir=str(log_dir), start_timeout_s=args.start_timeout, per_instance_env=tuple((("BLOCK_SGL_PUBLISH", e),) for e in pub))
            print(f"starting {args.instances} SGLang instances ...", flush=True)
            t = time.monotonic()
            cluster = LocalCluster(cfg)
            cluster.start()
            meta["cluster"]["startup_s"] = round(time.monotonic() - t, 1)
            urls = cluster.urls
            print(f"  ready in {meta['cluster']['startup_s']} s: {' '.join(urls)}", flush=True)
        pgids = {i.process.pid for i in cluster.instances} if cluster is not None else set()
        bench = Bench(args, urls, sgr, log_dir, pgids)
        results = {"meta": meta, "capacity": {}, "sweeps": {}, "runs": bench.runs,
                   "router_problems": bench.router_problems}
        for name, by_seed in built.items():
            print(f"== workload {name}", flush=True)
            rows = results["capacity"].setdefault(name, [])
            print(f"-- capacity search, side by side: {', '.join(s.name for s in specs)}",
                  flush=True)
            def search(searched, rows=rows, by_seed=by_seed):
                """Append the capacity rows of ``searched``, the partial file kept current."""
                base = len(rows)

                def on_round(current):
                    rows[base:] = current
                    _write_partial(out, tag, results)
                rows[base:] = bench.capacities(searched, by_seed, on_round)
                _write_partial(out, tag, results)

            search(specs)
            if args.sweep_cache_aware:
                base_caps = [r["capacity_rps"] for r in rows if not r["is_block"]]
                rate = args.sweep_rate or 1.1 * max(base_caps + [args.start_rate or 0.5 * len(urls)])
                kinds = ["block_sgl"] + (["sglang_router"] if sgr else [])
                results["sweeps"][name] = []
                tuned = []
                for kind in kinds:
                    print(f"-- sweep {kind} cache_aware thresholds at {rate:.3g}/s", flush=True)
                    sw = run_sweep(bench, kind, by_seed[args.seeds[0]], rate)
                    results["sweeps"][name].append(sw)
                    best_args = tuple(sw["best"]["args"])
                    if any(r["kind"] == kind and r["policy"] == "cache_aware" and
                           same_cache_aware(r["args"], best_args) for r in rows):
                        print(f"   best = a configuration already measured: {sw['best']['router']}",
                              flush=True)
                        continue
                    tuned.append(RouterSpec(kind, "cache_aware", best_args,
                                            label=sw["best"]["router"] + " (tuned)"))
                if tuned:
                    print(f"-- capacity search: {', '.join(s.name for s in tuned)}", flush=True)
                    search(tuned)
    except BaseException as e:  # noqa: BLE001 -- interrupted or crashed: keep what was measured
        if not isinstance(e, KeyboardInterrupt):
            import traceback

            traceback.print_exc()
            meta["error"] = f"{type(e).__name__}: {e}"[:2000]
        print(f"interrupted ({type(e).__name__}: {e}): writing what was measured", flush=True)
        results = locals().get("results") or {"meta": meta, "capacity": {}, "sweeps": {},
                                              "runs": [], "router_problems": []}
        meta["interrupted"] = f"{type(e).__name__}: {e}"[:200]
    finally:
        if cluster is not None:
            cluster.stop()
            # steps whose real CPU forward outlasted the emulated GPU step, per instance: a
            # large share means the run measured the CPU, not the emulated GPU
            from block_sgl.hooks.emulate import overshoot_from_log

            meta["cluster"]["emulation_overshoot"] = {
                str(i.index): {k or "scheduler": list(v) for k, v in overshoot_from_log(
                    i.log_path.read_text(errors="replace")).items()}
                for i in cluster.instances if i.log_path.exists()}
            for index, ranks in meta["cluster"]["emulation_overshoot"].items():
                for rank, (n, m) in ranks.items():
                    if n > 0.1 * m:
                        print(f"WARNING instance {index} ({rank}): {n} of {m} steps outlasted the "
                              "emulated GPU step: CPU-bound timings (raise --time-scale)", flush=True)
    meta["runtime_s"] = round(time.time() - started, 1)
    from benchmarks.e2e.report import write_outputs

    paths = write_outputs(results, out, tag)
    print("results:", *[str(p) for p in paths], sep="\n  ")
    return 1 if meta.get("error") else 0


def _build(name, args, seed, tokens, opts):
    w = wl.build(name, args.requests, seed, tokens, opts)
    print(f"  {name} seed {seed}: {len(w.requests)} requests, native {w.native_rate:.2f} req/s, "
          f"input mean {w.info['input_len_mean']:.0f}, output mean {w.info['output_len_mean']:.0f}",
          flush=True)
    return w


def _write_partial(out: Path, tag: str, results: dict) -> None:
    """Keep a partial results file up to date, so a crashed run leaves its numbers."""
    (out / f"e2e_{tag}.partial.json").write_text(json.dumps(results, indent=1, default=str))


CACHE_AWARE_DEFAULTS = {"--cache-threshold": 0.3, "--balance-abs-threshold": 64.0,
                        "--balance-rel-threshold": 1.5}  # sglang-router 0.3.2's launcher defaults


def same_cache_aware(a, b) -> bool:
    """Do two cache_aware argument lists mean the same thresholds (defaults filled in)?"""
    def values(args):
        v = dict(CACHE_AWARE_DEFAULTS)
        for k, x in zip(args[::2], args[1::2]):
            v[k] = float(x)
        return v
    return values(list(a)) == values(list(b))


if __name__ == "__main__":
    sys.exit(main())
