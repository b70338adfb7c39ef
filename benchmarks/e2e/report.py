"""Results of the e2e benchmark: full JSON, summary JSON, markdown table, PNG plots.

    python -m benchmarks.e2e.report benchmarks/results/e2e/e2e_<tag>.json   # re-render
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path


def _best_block(rows):
    plain = [r for r in rows if r["is_block"] and not r["oracle"]]
    named = [r for r in plain if r["policy"] == "block" and not r["args"]]
    if named:
        return named[0]
    return max(plain, key=lambda r: r["capacity_rps"]) if plain else None


def _best_baseline(rows):
    base = [r for r in rows if not r["is_block"] and not r["oracle"]]
    return max(base, key=lambda r: r["capacity_rps"]) if base else None


def _gain(a, b):
    if a is None or b is None:
        return None
    if b["capacity_rps"] > 0:
        return (a["capacity_rps"] - b["capacity_rps"]) / b["capacity_rps"]
    return 0.0 if a["capacity_rps"] == 0 else None


def _at_capacity(row):
    """The measured point at the capacity rate (or the lowest rate when none passed)."""
    pts = row["points"]
    if not pts:
        return None
    cap = row["capacity_rps"]
    same = [p for p in pts if abs(p["rate_rps"] - cap) < 1e-9]
    return same[0] if same else min(pts, key=lambda p: p["rate_rps"])


def summary(results: dict) -> dict:
    meta = results["meta"]
    out = {"meta": {k: v for k, v in meta.items() if k != "workloads"},
           "workloads": {}, "capacity_gain_vs_best_baseline": {},
           "capacity_gain_oracle_vs_best_baseline": {},
           "router_problem_runs": len(results.get("router_problems", []))}
    for name, rows in results["capacity"].items():
        blk, base = _best_block(rows), _best_baseline(rows)
        oracle = [r for r in rows if r["is_block"] and r["oracle"]]
        out["capacity_gain_vs_best_baseline"][name] = _gain(blk, base)
        if oracle:
            out["capacity_gain_oracle_vs_best_baseline"][name] = _gain(
                max(oracle, key=lambda r: r["capacity_rps"]), base)
        table = []
        for r in rows:
            p = _at_capacity(r) or {}
            med = lambda k: (p.get(k) or {}).get("median")  # noqa: E731
            table.append({"router": r["router"], "capacity_rps": r["capacity_rps"],
                          "capacity_gpu_equiv_rps": r["capacity_gpu_equiv_rps"],
                          "capacity_spread_rps": r["capacity_spread_rps"],
                          "capacity_per_seed_rps": r["capacity_per_seed_rps"],
                          "capacity_is_lower_bound": r["capacity_upper_rps"] is None,
                          "rates_tried": [q["rate_rps"] for q in r["points"]],
                          "at_capacity": {"rate_rps": p.get("rate_rps"),
                                          "ttft_p99_s": med("ttft_s_p99"),
                                          "ttft_p50_s": med("ttft_s_p50"),
                                          "tpot_p50_s": med("tpot_s_p50"),
                                          "e2e_p50_s": med("e2e_s_p50"),
                                          "goodput_rps": med("goodput_rps"),
                                          "prefix_hit_ratio": med("prefix_hit_ratio")}})
        wmeta = meta["workloads"].get(name, {})
        first = next(iter(wmeta.values()), {})
        out["workloads"][name] = {
            "block": blk["router"] if blk else None,
            "best_baseline": base["router"] if base else None,
            "scaling": {k: first.get(k) for k in ("length_scale", "block_size_tokens",
                                                  "dropped_over_context", "max_context",
                                                  "arrivals", "prompt_format") if k in first},
            "rows": table}
    for name, sweeps in results.get("sweeps", {}).items():
        out["workloads"].setdefault(name, {})["cache_aware_sweep_best"] = {
            s["kind"]: s["best"] for s in sweeps}
    return out


def _f(x, d=3):
    if x is None:
        return "—"
    if isinstance(x, float) and not math.isfinite(x):
        return "∞"
    return f"{x:.{d}g}"


def markdown(results: dict, summ: dict) -> str:
    m = results["meta"]
    c, slo = m["cluster"], m["slo"]
    lines = [f"# block_sgl e2e benchmark — {m['tag']}", "",
             f"* machine: {m['machine']['host']}, {m['machine']['cpus']} CPUs "
             f"({m['machine']['cpu_model']}), {m['machine']['mem_gib']} GiB",
             f"* git: {m['git']['commit']}{' (dirty)' if m['git']['dirty'] else ''}; "
             f"sglang {m['versions']['sglang']}; sglang-router {m['versions']['sglang_router']}",
             f"* cluster: K = {c['instances']} SGLang instances, {c['model']}, emulating "
             f"{c['emulate']} at time scale {c['time_scale']}; max_total_tokens "
             f"{c['max_total_tokens']}, max_running_requests {c['max_running_requests']}, "
             f"chunked prefill {c['chunked_prefill_size']}, stream interval {c['stream_interval']}",
             f"* SLO: P99 TTFT ≤ {slo['ttft_p99_gpu_s']} s GPU-equivalent "
             f"(= {slo['ttft_p99_testbed_s']:g} s on the test bed); goodput also needs TPOT ≤ "
             f"{slo['tpot_gpu_s']} s GPU ({slo['tpot_testbed_s']:g} s)",
             f"* seeds {m['seeds']}, {m['requests_per_run']} requests per run; capacity = "
             f"highest rate whose P99 TTFT (median over seeds) meets the SLO; spread = min–max "
             f"of per-seed capacities",
             f"* units: {m['units']}",
             f"* runtime: {_f(m.get('runtime_s'), 5)} s" + (" (SMOKE: checks only that the "
                                                           "pipeline works)" if m["smoke"] else ""),
             ""]
    for name, w in summ["workloads"].items():
        if "rows" not in w:
            continue
        gain = summ["capacity_gain_vs_best_baseline"].get(name)
        lines += [f"## {name}", "",
                  f"scaling: {json.dumps(w['scaling'])}", "",
                  "| router | capacity req/s | spread | GPU-equiv req/s | P99 TTFT s | P50 TTFT s "
                  "| P50 TPOT s | P50 E2E s | goodput req/s | prefix hit | rates tried |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in sorted(w["rows"], key=lambda r: -r["capacity_rps"]):
            a = r["at_capacity"]
            lines.append(
                f"| {r['router']} | {'≥ ' if r['capacity_is_lower_bound'] else ''}"
                f"{_f(r['capacity_rps'])} | {_f(r['capacity_spread_rps'][0])}"
                f"–{_f(r['capacity_spread_rps'][1])} | {_f(r['capacity_gpu_equiv_rps'])} | "
                f"{_f(a['ttft_p99_s'])} | {_f(a['ttft_p50_s'])} | {_f(a['tpot_p50_s'])} | "
                f"{_f(a['e2e_p50_s'])} | {_f(a['goodput_rps'])} | {_f(a['prefix_hit_ratio'], 2)} | "
                f"{', '.join(_f(x) for x in r['rates_tried'])} |")
        lines += ["", "≥: no tried rate failed (the capacity is at least that). Latencies at the "
                  "capacity rate (medians over seeds; at the lowest rate when none passed). Block = "
                  f"`{w['block']}`, best baseline = `{w['best_baseline']}`: capacity gain "
                  f"**{_f(gain * 100 if gain is not None else None)} %**.", ""]
        if "cache_aware_sweep_best" in w:
            for kind, best in w["cache_aware_sweep_best"].items():
                lines.append(f"cache_aware sweep ({kind}): best `{best['router']}` (goodput "
                             f"{_f(best['goodput_rps'])} req/s, P99 TTFT {_f(best['ttft_p99_s'])} s)")
            lines.append("")
    probs = results.get("router_problems", [])
    if probs:
        lines += ["## Router log problems", ""]
        for p in probs[:20]:
            lines.append(f"* {p['router']} / {p['workload']} @ {_f(p['rate'])} req/s seed "
                         f"{p['seed']}: `{p['lines'][0]}`" + (f" (+{len(p['lines']) - 1} more)"
                                                             if len(p['lines']) > 1 else ""))
        lines.append("")
    return "\n".join(lines)


def plots(results: dict, summ: dict, out: Path, tag: str) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install matplotlib)", flush=True)
        return []
    m = results["meta"]
    note = (f"{m['machine']['host']} ({m['machine']['cpus']} CPUs), K={m['cluster']['instances']}, "
            f"{m['cluster']['emulate']} x{m['cluster']['time_scale']}, seeds {m['seeds']}, "
            f"SLO P99 TTFT {m['slo']['ttft_p99_testbed_s']:g} s, git {str(m['git']['commit'])[:10]}")
    paths = []
    for name, rows in results["capacity"].items():
        fig, axes = plt.subplots(1, 4, figsize=(20, 4.8))
        panels = (("ttft_s_p99", "P99 TTFT (s)"), ("ttft_s_p50", "P50 TTFT (s)"),
                  ("tpot_s_p50", "P50 TPOT (s)"), ("goodput_rps", "goodput (req/s)"))
        for ax, (key, label) in zip(axes, panels):
            for r in rows:
                pts = [p for p in r["points"] if p.get(key)]
                if not pts:
                    continue
                xs = [p["rate_rps"] for p in pts]
                ys = [p[key]["median"] for p in pts]
                lo = [p[key]["median"] - p[key]["min"] for p in pts]
                hi = [p[key]["max"] - p[key]["median"] for p in pts]
                ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, label=r["router"],
                            linewidth=2.5 if r["is_block"] else 1.2)
            if key == "ttft_s_p99":
                ax.axhline(m["slo"]["ttft_p99_testbed_s"], color="k", linestyle="--",
                           linewidth=1, label="SLO")
                ax.set_yscale("log")
            ax.set_xlabel("arrival rate (req/s, test bed)")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=7)
        fig.suptitle(f"{name}: latency vs rate (median over seeds, bars min–max)\n{note}",
                     fontsize=9)
        fig.tight_layout()
        p = out / f"e2e_{tag}_latency_{name}.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)
    if results["capacity"]:
        names = list(results["capacity"])
        routers = []
        for rows in results["capacity"].values():
            for r in rows:
                if r["router"] not in routers:
                    routers.append(r["router"])
        fig, ax = plt.subplots(figsize=(max(6, 2.2 * len(names) * max(1, len(routers)) / 3), 4.8))
        width = 0.8 / max(1, len(routers))
        for j, router in enumerate(routers):
            xs, ys, err = [], [], [[], []]
            for i, name in enumerate(names):
                row = next((r for r in results["capacity"][name] if r["router"] == router), None)
                if row is None:
                    continue
                xs.append(i + j * width)
                ys.append(row["capacity_rps"])
                err[0].append(max(0.0, row["capacity_rps"] - row["capacity_spread_rps"][0]))
                err[1].append(max(0.0, row["capacity_spread_rps"][1] - row["capacity_rps"]))
            ax.bar(xs, ys, width, yerr=err, capsize=3, label=router)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(names))])
        labels = []
        for n in names:
            g = summ["capacity_gain_vs_best_baseline"].get(n)
            labels.append(f"{n}\nblock vs best baseline: {_f(g * 100 if g is not None else None)} %")
        ax.set_xticklabels(labels, fontsize=8)
        ax.set_ylabel("capacity (req/s at P99 TTFT ≤ SLO, test bed)")
        ax.legend(fontsize=7)
        ax.grid(axis="y", alpha=0.3)
        ax.set_title(f"serving capacity (bars: per-seed min–max)\n{note}", fontsize=9)
        fig.tight_layout()
        p = out / f"e2e_{tag}_capacity.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)
    return paths


def _clean(x):
    """JSON without NaN/Infinity (strict parsers reject them): non-finite -> null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def write_outputs(results: dict, out: Path, tag: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    summ = summary(results)
    full = out / f"e2e_{tag}.json"
    full.write_text(json.dumps(_clean(results), indent=1, default=str, allow_nan=False) + "\n")
    sp = out / f"e2e_{tag}_summary.json"
    sp.write_text(json.dumps(_clean(summ), indent=1, default=str, allow_nan=False) + "\n")
    md = out / f"e2e_{tag}.md"
    md.write_text(markdown(results, summ) + "\n")
    partial = out / f"e2e_{tag}.partial.json"
    if partial.exists():
        partial.unlink()
    return [full, sp, md, *plots(results, summ, out, tag)]


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit("usage: python -m benchmarks.e2e.report RESULTS.json")
    path = Path(argv[0])
    results = json.loads(path.read_text())
    tag = results["meta"]["tag"]
    for p in write_outputs(results, path.parent, tag):
        print(p)


if __name__ == "__main__":
    main()
