"""Routers under test, each started as an operator would: block_sgl's ``launch_router`` (every
policy on the same harness) and sglang-router 0.3.2 (a separate venv) as the external baseline.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from block_sgl.router.policies import PREDICTIVE_POLICIES
from block_sgl.testing.cluster import free_port


@dataclasses.dataclass(frozen=True)
class RouterSpec:
    """One router configuration = one row of the results."""

    kind: str
    """``block_sgl`` or ``sglang_router``."""
    policy: str
    args: tuple[str, ...] = ()
    label: str = ""
    oracle: bool = False
    """block_sgl only: let the router see output lengths (ignore_eos hint); labelled 'oracle'."""

    @property
    def name(self) -> str:
        if self.label:
            return self.label
        base = f"{'sgl-router' if self.kind == 'sglang_router' else 'block_sgl'}/{self.policy}"
        return base + ("+oracle" if self.oracle else "")

    @property
    def is_block(self) -> bool:
        return self.kind == "block_sgl" and self.policy in PREDICTIVE_POLICIES


def parse_policies(names: list[str], sglang_router: bool,
                   length_model: str | None = None) -> list[RouterSpec]:
    """``block``, ``round_robin``, ``block+oracle``, ``block+lm``, ``sgl:cache_aware`` ... →
    specs. ``+lm``: the router loads ``length_model`` (``--length-model``) and its row is
    labelled ``block_sgl/NAME+lm``; ``+lm-mean``: the same with ``--length-estimate mean``."""
    out = []
    for n in names:
        if n.startswith("sgl:"):
            if sglang_router:
                out.append(RouterSpec("sglang_router", n[4:]))
            continue
        if n.endswith(("+lm", "+lm-mean")):
            if not length_model:
                raise ValueError(f"policy {n!r} needs --length-model (a train_length directory)")
            base, suffix = n.rsplit("+", 1)
            args = ("--length-model", length_model)
            if suffix == "lm-mean":
                args += ("--length-estimate", "mean")
            out.append(RouterSpec("block_sgl", base, args=args, label=f"block_sgl/{n}"))
            continue
        oracle = n.endswith("+oracle")
        out.append(RouterSpec("block_sgl", n.removesuffix("+oracle"), oracle=oracle))
    return out


class RouterProcess:
    def __init__(self, spec: RouterSpec, worker_urls: list[str], log_path: Path, *,
                 seed: int, sglang_router_python: str | None, startup_timeout: float = 180.0):
        self.spec = spec
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        if spec.kind == "block_sgl":
            cmd = [sys.executable, "-m", "block_sgl.launch_router", "--worker-urls", *worker_urls,
                   "--policy", spec.policy, "--port", str(self.port), "--seed", str(seed),
                   "--log-level", "warning"]
            if not spec.oracle:
                cmd.append("--no-ignore-eos-hint")
        else:
            if not sglang_router_python:
                raise RuntimeError("sglang-router is not available")
            cmd = [sglang_router_python, "-m", "sglang_router.launch_router", "--worker-urls",
                   *worker_urls, "--policy", spec.policy, "--port", str(self.port),
                   "--log-level", "warn", "--worker-startup-check-interval", "1",
                   # its Prometheus exporter binds 0.0.0.0:29000 by default and panics at start
                   # when another sglang-router (or the previous run's, still closing) holds it
                   "--prometheus-port", str(free_port())]
        cmd += list(spec.args)
        self.cmd = cmd
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        self.started = time.monotonic()
        deadline = time.monotonic() + startup_timeout
        # sglang-router answers /health before its workers are registered (its job queue adds
        # them in the background); /readiness is 200 only once they are healthy
        ready_path = "/readiness" if spec.kind == "sglang_router" else "/health"
        while True:
            if self.proc.poll() is not None:
                self.log.flush()
                raise RuntimeError(f"router {spec.name} exited with {self.proc.returncode} at start: "
                                   f"{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}{ready_path}", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"router {spec.name} not healthy after {startup_timeout:.0f} s: "
                                   f"{self.log_tail()}")
            time.sleep(0.2)
        self.startup_s = time.monotonic() - self.started

    def log_tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def problems(self, limit: int = 10) -> list[str]:
        """WARNING/ERROR/Traceback lines of the router's log (reported in the results)."""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return []
        pat = re.compile(r"\b(ERROR|WARNING|WARN|CRITICAL|Traceback|panicked)\b")
        hits = [ln.strip()[:400] for ln in lines if pat.search(ln)]
        return hits[:limit] + ([f"... {len(hits) - limit} more"] if len(hits) > limit else [])

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, 15)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait()
        self.log.close()
