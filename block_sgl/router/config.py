"""The router's configuration: documented dataclasses, validated once at start.

``launch_router`` builds these from its command line; tests and benchmarks build them
directly. Every field has the default an operator would start with.
"""

from __future__ import annotations

import dataclasses
import math
from urllib.parse import urlsplit

from block_sgl.router.policies import POLICY_NAMES, PREDICTIVE_POLICIES

LENGTH_ESTIMATES = ("p50", "mean")
"""``--length-estimate`` choices (see ``RouterConfig.length_estimate``)."""


class ConfigError(ValueError):
    """An invalid router setting or combination; the message names the setting."""


@dataclasses.dataclass(frozen=True)
class CacheAwareSettings:
    """sglang-router's cache_aware thresholds (its defaults), for the ``cache_aware`` policy."""

    cache_threshold: float = 0.3
    balance_abs_threshold: int = 64
    balance_rel_threshold: float = 1.5
    max_tree_size: int = 2 ** 26
    eviction_interval_s: float = 120.0


@dataclasses.dataclass(frozen=True)
class HealthSettings:
    """Per-instance health checks and circuit breaker."""

    interval_s: float = 1.0
    """Seconds between ``GET /health`` checks (SGLang answers it without running a request)."""
    timeout_s: float = 5.0
    failures_to_open: int = 3
    """Consecutive failed checks that take an instance out of rotation. A refused connection
    on a request takes it out at once. A check that times out while the instance's block_sgl
    stream is fresh does not count: its scheduler is demonstrably alive and its HTTP server
    merely slow (a saturated CPU), and taking it out would only shift load onto the others."""
    successes_to_close: int = 1
    """Consecutive passed checks that put it back."""


@dataclasses.dataclass(frozen=True)
class RouterConfig:
    worker_urls: tuple[str, ...]
    """SGLang instances, e.g. ``http://10.0.0.1:30000``."""
    publish_endpoints: tuple[str, ...] | None = None
    """Each instance's block_sgl stream (same order as ``worker_urls``); None: discovered
    from each instance's ``/server_info`` (the ``kv_events`` entry the plugin fills in)."""
    policy: str = "block"
    host: str = "127.0.0.1"
    port: int = 8000
    tokenizer_path: str | None = None
    """Local folder with the served model's tokenizer; None: the ``tokenizer_path`` the
    instances report in ``/model_info`` (must be readable from the router's machine)."""
    length_model: str | None = None
    """A length-model file (``python -m block_sgl.predictor.train_length``); None: every
    request's output is predicted as the running mean of completed requests (capped by its
    max tokens)."""
    length_estimate: str = "p50"
    """What a length-model prediction becomes in the simulation: ``p50``, or ``mean``, the
    log-normal mean implied by the model's P50 and P90 (``LengthPredictor.expected_tokens``;
    needs ``length_model``)."""
    slo_ttft_ms: float | None = None
    slo_factor: float = 1.0
    """Admission: refuse when every instance's predicted TTFT exceeds ``slo_factor`` × SLO."""
    slo_action: str = "reject"
    """``reject``: 429 with Retry-After. ``queue``: hold the request at the router until a
    prediction is within the SLO or ``slo_queue_timeout_s`` passes (then route it anyway)."""
    slo_queue_timeout_s: float = 30.0
    api_key: str | None = None
    power_of_k: int = 0
    """0: predict on every instance. k > 0: on k random instances plus the one with the longest
    cached prefix."""
    stale_after_s: float = 2.0
    """An instance whose stream has been silent this long is routed on the router's own
    accounting (documented in README: stale instances)."""
    calibration_refit_interval_s: float = 10.0
    """Each instance's step model is refitted from its step records at most this often, plus
    at most one post-drift fit per interval (a drift is still detected, and rescaled for, every
    64 records). A fit costs 30-200 ms of CPU here; at 2 s with drift-triggered fits
    unthrottled, fits took ~half of a router's CPU in front of one real-CPU instance."""
    speculative_prefix_ttl_s: float = 10.0
    """How long a dispatched prompt's pages count as cached on its instance before the
    instance's own cache events confirm (or never confirm) them."""
    pending_ttl_s: float = 30.0
    """How long a dispatched request is counted as pending when no snapshot shows it."""
    use_ignore_eos_hint: bool = True
    """Predict ``max_new_tokens`` as the output length of ``ignore_eos`` requests (they always
    run to it). Benchmarks that hide output lengths from the router turn this off."""
    default_output_len: int = 256
    """Output length assumed before any request has completed (no length model)."""
    completions_from_stream: bool = False
    """For callers that never learn when a request finishes (the in-engine DP controller,
    ``block_sgl.hooks.dp``): follow requests through the instances' streams instead. Every
    snapshot (not only the latest at decision time) is scanned for arrivals, which end pending
    requests, and departures, whose last seen output lengths feed the mean output length;
    ``InstanceView.in_flight`` (cache_aware's load, the others' tie-break) is running + waiting +
    pending from the stream instead of this router's dispatched-minus-finished count."""
    max_retries: int = 2
    """Other instances tried when an instance fails before sending a byte."""
    request_timeout_s: float = 3600.0
    upstream_keepalive_s: float = 4.0
    """How long an idle connection to an instance is kept for reuse. Must stay below the
    instances' own keep-alive timeout (SGLang: ``SGLANG_TIMEOUT_KEEP_ALIVE``, 5 s): a request
    written on a connection the server is closing fails ("Can not write request body"), which
    looks like an instance failure. With aiohttp's default (15 s) the e2e benchmark saw healthy
    instances taken out of rotation that way."""
    seed: int | None = None
    log_level: str = "info"
    health: HealthSettings = HealthSettings()
    cache_aware: CacheAwareSettings = CacheAwareSettings()

    def __post_init__(self):
        if not self.worker_urls:
            raise ConfigError("--worker-urls: give at least one SGLang instance URL")
        for url in self.worker_urls:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/"):
                raise ConfigError(f"--worker-urls: {url!r} is not an http(s)://host:port URL")
        if len(set(self.worker_urls)) != len(self.worker_urls):
            raise ConfigError("--worker-urls: the same URL is listed twice")
        if self.publish_endpoints is not None:
            if len(self.publish_endpoints) != len(self.worker_urls):
                raise ConfigError(
                    f"--publish-endpoints: got {len(self.publish_endpoints)} endpoints for "
                    f"{len(self.worker_urls)} worker URLs; give one per worker, in the same order")
            from block_sgl.router.ingest import replay_endpoint_for

            for e in self.publish_endpoints:
                try:
                    replay_endpoint_for(e)
                except ValueError as err:
                    raise ConfigError(f"--publish-endpoints: {err}") from None
        if self.policy not in POLICY_NAMES:
            raise ConfigError(f"--policy {self.policy!r} is unknown; valid: {', '.join(POLICY_NAMES)}")
        if self.length_estimate not in LENGTH_ESTIMATES:
            raise ConfigError(f"--length-estimate must be one of {', '.join(LENGTH_ESTIMATES)}, "
                              f"got {self.length_estimate!r}")
        if self.length_estimate == "mean" and not self.length_model:
            raise ConfigError("--length-estimate mean applies to a length model's predictions: "
                              "give --length-model too")
        if not 0 < self.port < 65536:
            raise ConfigError(f"--port {self.port} is not a TCP port")
        if self.slo_ttft_ms is not None:
            if not (math.isfinite(self.slo_ttft_ms) and self.slo_ttft_ms > 0):
                raise ConfigError(f"--slo-ttft-ms must be > 0, got {self.slo_ttft_ms}")
            if self.policy not in PREDICTIVE_POLICIES:
                raise ConfigError("--slo-ttft-ms needs predicted TTFTs: use it with --policy "
                                  f"{' or '.join(PREDICTIVE_POLICIES)} (got {self.policy!r})")
        if not self.slo_factor >= 1.0:
            raise ConfigError(f"--slo-factor must be >= 1, got {self.slo_factor}")
        if self.slo_action not in ("reject", "queue"):
            raise ConfigError(f"--slo-action must be reject or queue, got {self.slo_action!r}")
        if self.power_of_k < 0:
            raise ConfigError(f"--power-of-k must be >= 0, got {self.power_of_k}")
        if self.power_of_k and self.policy not in PREDICTIVE_POLICIES:
            raise ConfigError("--power-of-k applies to the predictive policies "
                              f"({', '.join(PREDICTIVE_POLICIES)}), not {self.policy!r}")
        for name in ("stale_after_s", "speculative_prefix_ttl_s", "pending_ttl_s",
                     "request_timeout_s", "slo_queue_timeout_s", "upstream_keepalive_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        if not self.calibration_refit_interval_s >= 0:
            raise ConfigError("--calibration-refit-interval must be >= 0, got "
                              f"{self.calibration_refit_interval_s}")
        if self.max_retries < 0:
            raise ConfigError(f"--max-retries must be >= 0, got {self.max_retries}")
        if self.default_output_len < 1:
            raise ConfigError(f"default_output_len must be >= 1, got {self.default_output_len}")
        if self.log_level.lower() not in ("debug", "info", "warning", "error", "critical"):
            raise ConfigError(f"--log-level {self.log_level!r}: use debug, info, warning or error")
