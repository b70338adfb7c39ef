"""Start N real SGLang servers on this machine and tear them all down again.

    with LocalCluster(ClusterConfig(instances=2, emulate="h100-llama2-7b", time_scale=4)) as c:
        print(c.urls)

Each server runs in its own session (process group) so that stopping it kills the whole tree
(the HTTP server, its scheduler and detokenizer); ``stop()`` runs from ``__exit__``, from pytest
fixture finalizers, and from an ``atexit`` handler as a last resort. Logs go to one file per
instance; a server that dies or is not ready in time raises ``ClusterError`` with its log's tail.

    python -m block_sgl.testing.cluster --instances 2 [--emulate h100-llama2-7b --time-scale 4]
"""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path


class ClusterError(RuntimeError):
    """A server could not be started (port clash, missing SGLang, crash, timeout)."""


@dataclasses.dataclass(frozen=True)
class ClusterConfig:
    """How to launch the local SGLang instances (all get the same settings)."""

    instances: int = 2
    model_path: str | None = None
    """Model directory; default: the tiny test model (``block_sgl.testing.tiny_model``)."""
    ports: tuple[int, ...] = ()
    """HTTP ports, one per instance; default: free ports picked at start."""
    max_total_tokens: int = 65536
    """KV-cache capacity in tokens (emulate the GPU's, e.g. ~490k for Llama-3-8B on an H100)."""
    chunked_prefill_size: int = 4096
    page_size: int = 16
    max_running_requests: int | None = None
    dtype: str = "float32"
    """``--dtype``. SGLang's ``auto`` downcasts a float32 checkpoint to float16
    (``sglang/srt/configs/model_config.py``, ``_get_and_verify_dtype``: "we use float16 for
    float32"), and float16 matmuls are emulated on CPUs without AVX512-FP16: the tiny model's
    decode steps ran ≈ 2× slower and its lm_head ≈ 4× slower than in float32 on this test bed."""
    torch_threads: int = 1
    """``OMP_NUM_THREADS`` of every instance (an ``env`` entry overrides it). One: the tiny
    model's matrices are too small to gain from threads, and instances sharing cores each with
    a full OpenMP team stall one another (idle team threads spin, a barrier waits for a
    descheduled thread). Measured on the 2-core test bed, two instances decoding at once:
    1 request 21 → 6 ms per step, 16 requests 58 → 17 ms per step with 1 thread vs torch's
    default of one per core."""
    disable_overlap_schedule: bool = True
    """Non-overlapped steps: clean step timing on CPU (torch is synchronous there anyway)."""
    emulate: str | None = None
    """GPU profile to emulate (BLOCK_SGL_EMULATE), e.g. ``h100-llama2-7b``; None: real CPU speed."""
    time_scale: float = 1.0
    """BLOCK_SGL_TIME_SCALE for emulated step times."""
    extra_args: tuple[str, ...] = ()
    """More ``sglang.launch_server`` arguments, appended as given."""
    env: tuple[tuple[str, str], ...] = ()
    """Extra environment (name, value) pairs for every instance (e.g. BLOCK_SGL_PUBLISH)."""
    per_instance_env: tuple[tuple[tuple[str, str], ...], ...] = ()
    """Optional extra environment per instance index (overrides ``env``)."""
    log_dir: str | None = None
    """Where instance logs go; default: a fresh temporary directory."""
    start_timeout_s: float = 240.0
    python: str = sys.executable


@dataclasses.dataclass
class Instance:
    index: int
    port: int
    log_path: Path
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def _has_sglang(python: str) -> bool:
    if python == sys.executable:
        return importlib.util.find_spec("sglang") is not None
    probe = subprocess.run([python, "-c", "import importlib.util,sys; "
                            "sys.exit(0 if importlib.util.find_spec('sglang') else 1)"])
    return probe.returncode == 0


class LocalCluster:
    """N local SGLang servers; ``start()`` / ``stop()`` or use as a context manager."""

    def __init__(self, config: ClusterConfig):
        self.config = config
        self.instances: list[Instance] = []

    @property
    def urls(self) -> list[str]:
        return [i.url for i in self.instances]

    def __enter__(self) -> "LocalCluster":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- start ---------------------------------------------------------------------------
    def _command(self, model_path: str, port: int) -> list[str]:
        c = self.config
        cmd = [c.python, "-m", "sglang.launch_server", "--model-path", model_path,
               "--device", "cpu", "--host", "127.0.0.1", "--port", str(port),
               "--max-total-tokens", str(c.max_total_tokens),
               "--chunked-prefill-size", str(c.chunked_prefill_size),
               "--page-size", str(c.page_size), "--dtype", c.dtype,
               "--sleep-on-idle", "--skip-server-warmup"]
        if c.max_running_requests:
            cmd += ["--max-running-requests", str(c.max_running_requests)]
        if c.disable_overlap_schedule:
            cmd.append("--disable-overlap-schedule")
        return cmd + list(c.extra_args)

    def _env(self, index: int) -> dict[str, str]:
        c = self.config
        env = dict(os.environ)
        env["SGLANG_USE_CPU_ENGINE"] = "1"
        env["OMP_NUM_THREADS"] = str(c.torch_threads)
        env.pop("BLOCK_SGL_EMULATE", None)
        if c.emulate:
            env["BLOCK_SGL_EMULATE"] = c.emulate
            env["BLOCK_SGL_TIME_SCALE"] = str(c.time_scale)
        env.update(dict(c.env))
        if index < len(c.per_instance_env):
            env.update(dict(c.per_instance_env[index]))
        ranks = dp_ranks(c.extra_args)
        if ranks > 1 and not env.get("SGLANG_CPU_OMP_THREADS_BIND"):
            # SGLang on CPU refuses more ranks than NUMA nodes unless each rank gets its cores.
            env["SGLANG_CPU_OMP_THREADS_BIND"] = cpu_bind_groups(ranks)
        return env

    def start(self) -> None:
        c = self.config
        if self.instances:
            raise ClusterError("cluster already started")
        if c.torch_threads < 1:
            raise ClusterError(f"torch_threads must be >= 1, got {c.torch_threads}")
        if c.instances < 1:
            raise ClusterError(f"instances must be >= 1, got {c.instances}")
        if c.ports and len(c.ports) != c.instances:
            raise ClusterError(f"{len(c.ports)} ports given for {c.instances} instances")
        if not _has_sglang(c.python):
            raise ClusterError(f"SGLang is not installed for {c.python}; run scripts/setup.sh")
        ports = list(c.ports) or _distinct_free_ports(c.instances)
        for port in ports:
            if port_in_use(port):
                raise ClusterError(f"port {port} on 127.0.0.1 is already in use")
        model_path = c.model_path
        if model_path is None:
            from block_sgl.testing.tiny_model import make_tiny_model

            model_path = str(make_tiny_model())
        log_dir = Path(c.log_dir or tempfile.mkdtemp(prefix="block_sgl_cluster_"))
        log_dir.mkdir(parents=True, exist_ok=True)
        atexit.register(self.stop)
        try:
            for index, port in enumerate(ports):
                inst = Instance(index, port, log_dir / f"instance{index}-{port}.log")
                with open(inst.log_path, "wb") as log:
                    inst.process = subprocess.Popen(
                        self._command(model_path, port), env=self._env(index), stdout=log,
                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                        start_new_session=True)
                self.instances.append(inst)
            deadline = time.monotonic() + c.start_timeout_s
            for inst in self.instances:
                self._wait_ready(inst, deadline)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, inst: Instance, deadline: float) -> None:
        while True:
            code = inst.process.poll()
            if code is not None:
                raise ClusterError(f"SGLang instance {inst.index} (port {inst.port}) exited with "
                                   f"code {code} during start; log {inst.log_path}:\n{inst.log_tail()}")
            if _get_ok(f"{inst.url}/health_generate", timeout=30):
                return
            if time.monotonic() > deadline:
                raise ClusterError(f"SGLang instance {inst.index} (port {inst.port}) not ready after "
                                   f"{self.config.start_timeout_s:.0f} s; log {inst.log_path}:\n"
                                   f"{inst.log_tail()}")
            time.sleep(0.25)

    # -- diagnosis -----------------------------------------------------------------------
    def diagnose(self, lines: int = 12) -> str:
        """What a failing test should print about the cluster: per instance, whether its server
        still runs (or its exit code), the memory its process group holds, and the last lines
        of its log (SGLang's one-line ``server_args=`` dump left out); the host's available
        memory first."""
        out = [f"host MemAvailable: {_mem_available_mb()} MB"]
        for inst in self.instances:
            proc = inst.process
            if proc is None:
                out.append(f"instance {inst.index} ({inst.url}): stopped")
                continue
            code = proc.poll()
            members = [f for _, f in proc_stats() if int(f[2]) == proc.pid and f[0] != "Z"]
            rss_mb = sum(int(f[21]) for f in members) * os.sysconf("SC_PAGE_SIZE") >> 20
            state = "running" if code is None else f"exited with code {code}"
            out.append(f"instance {inst.index} ({inst.url}): server {state}, "
                       f"{len(members)} live processes, {rss_mb} MB RSS; log {inst.log_path}:")
            try:
                log = inst.log_path.read_text(errors="replace").splitlines()
            except OSError:
                log = ["(no log)"]
            out += ["    " + line[:300] for line in log if "server_args=" not in line][-lines:]
        return "\n".join(out)

    # -- stop ----------------------------------------------------------------------------
    def stop_instance(self, index: int, sig: int = signal.SIGTERM, grace_s: float = 15.0) -> None:
        """Kill one instance's whole process group (SIGTERM, then SIGKILL after ``grace_s``)."""
        proc = self.instances[index].process
        if proc is None:
            return
        _kill_group(proc.pid, sig)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
        _kill_group(proc.pid, signal.SIGKILL)  # stragglers in the group, also after a clean exit
        proc.wait()
        deadline = time.monotonic() + grace_s
        while live_group_members(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.05)  # SIGKILL is asynchronous: wait until the kernel has ended them
        self.instances[index].process = None

    def stop(self) -> None:
        for inst in self.instances:
            if inst.process is not None:
                _kill_group(inst.process.pid, signal.SIGTERM)
        for inst in self.instances:
            self.stop_instance(inst.index)
        atexit.unregister(self.stop)


def _kill_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def proc_stats():
    """(pid, the fields of /proc/PID/stat after "pid (comm) ") of every live process: fields[0]
    is the state, [2] the process group, [11] / [12] user / system clock ticks, [21] resident
    pages. Processes that exit while being read are skipped."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        yield int(entry.name), stat[stat.rindex(")") + 2:].split()


def _mem_available_mb() -> int | None:
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) // 1024
    except OSError:
        pass
    return None


def live_group_members(pgid: int) -> list[int]:
    """PIDs in process group ``pgid`` that are still running (zombies excluded), from /proc."""
    return [pid for pid, fields in proc_stats() if int(fields[2]) == pgid and fields[0] != "Z"]


def dp_ranks(args) -> int:
    """The ``--dp-size`` (``--data-parallel-size``) among launch_server arguments (1 if none)."""
    args = list(args)
    for i, a in enumerate(args):
        for flag in ("--dp-size", "--data-parallel-size", "--dp"):
            if a == flag and i + 1 < len(args):
                return int(args[i + 1])
            if a.startswith(flag + "="):
                return int(a.split("=", 1)[1])
    return 1


def cpu_bind_groups(ranks: int) -> str:
    """``SGLANG_CPU_OMP_THREADS_BIND`` for ``ranks`` DP ranks on this machine: the usable cores
    split into ``ranks`` groups (cores shared round-robin when there are fewer cores than ranks).
    SGLang needs it on CPU for more ranks than NUMA nodes (``numa_utils.init_threads_binding``);
    the binding itself only applies with Intel AMX / arm64 kernels."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else \
        list(range(os.cpu_count() or 1))
    if len(cores) < ranks:
        return "|".join(str(cores[r % len(cores)]) for r in range(ranks))
    per = len(cores) // ranks
    return "|".join(",".join(map(str, cores[r * per:(r + 1) * per])) for r in range(ranks))


def _distinct_free_ports(n: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < n:
        p = free_port()
        # SGLang also binds a few ports above its HTTP port (nccl, zmq); keep instances apart.
        if all(abs(p - q) > 100 for q in ports):
            ports.append(p)
    return ports


def _get_ok(url: str, timeout: float) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Start a local cluster of real SGLang servers "
                                "(CPU test bed) and keep it running until Ctrl-C.")
    d = ClusterConfig()
    p.add_argument("--instances", type=int, default=d.instances, help="number of SGLang servers")
    p.add_argument("--model-path", default=None, help="model dir (default: the tiny test model)")
    p.add_argument("--ports", type=int, nargs="*", default=[], help="HTTP ports (default: free ports)")
    p.add_argument("--max-total-tokens", type=int, default=d.max_total_tokens, help="KV capacity per instance")
    p.add_argument("--chunked-prefill-size", type=int, default=d.chunked_prefill_size, help="prefill chunk")
    p.add_argument("--page-size", type=int, default=d.page_size, help="KV page size")
    p.add_argument("--max-running-requests", type=int, default=None, help="running-batch cap")
    p.add_argument("--dtype", default=d.dtype, help="model dtype (SGLang's 'auto' would downcast "
                   "the float32 tiny model to float16, which is slow on CPUs)")
    p.add_argument("--torch-threads", type=int, default=d.torch_threads,
                   help="OMP_NUM_THREADS per instance (instances sharing cores with a full "
                   "OpenMP team each stall one another)")
    p.add_argument("--emulate", default=None, help="GPU profile to emulate, e.g. h100-llama2-7b")
    p.add_argument("--time-scale", type=float, default=1.0, help="stretch emulated step times")
    p.add_argument("--log-dir", default=None, help="instance logs (default: a temp dir)")
    args = p.parse_args(argv)
    config = ClusterConfig(instances=args.instances, model_path=args.model_path,
                           ports=tuple(args.ports), max_total_tokens=args.max_total_tokens,
                           chunked_prefill_size=args.chunked_prefill_size, page_size=args.page_size,
                           max_running_requests=args.max_running_requests, dtype=args.dtype,
                           torch_threads=args.torch_threads, emulate=args.emulate,
                           time_scale=args.time_scale, log_dir=args.log_dir)
    cluster = LocalCluster(config)
    try:
        cluster.start()
    except ClusterError as e:
        sys.exit(f"error: {e}")
    print(json.dumps({"urls": cluster.urls, "logs": [str(i.log_path) for i in cluster.instances]}),
          flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        while True:
            signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()


if __name__ == "__main__":
    main()
