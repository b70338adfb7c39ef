"""block_sgl's instance-side settings: ``BLOCK_SGL_*`` environment variables and ``--block-*``
SGLang server flags, from one table.

Environment variables are the contract (spawned SGLang processes inherit them; they also serve
``sglang serve`` and the Python ``Engine``). The server flags are a front door to the same
variables: an AFTER hook on ``ServerArgs.add_cli_args`` adds them to SGLang's parser and an AFTER
hook on ``ServerArgs.from_cli_args`` validates them and copies them into the environment before
SGLang spawns its scheduler processes.

Every value is validated; a bad one raises ``SettingsError`` naming the variable and what is
valid, and the server refuses to start (never runs silently without what was asked).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import re
from typing import Any, Callable, Mapping
from urllib.parse import urlsplit


class SettingsError(ValueError):
    """A BLOCK_SGL_* value (or its --block-* flag) is invalid."""


def _positive_float(name: str, raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not a number; expected a positive number") from None
    if not math.isfinite(value) or value <= 0:
        raise SettingsError(f"{name}={raw!r} must be a finite number > 0")
    return value


def _int(name: str, raw: str) -> int:
    try:
        return int(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not an integer") from None


def _bool(name: str, raw: str) -> bool:
    low = raw.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off", ""):
        return False
    raise SettingsError(f"{name}={raw!r} is not a boolean; use 1/0, true/false, yes/no or on/off")


def _profile(name: str, raw: str) -> str:
    from block_sgl.predictor.gpu_profiles import PROFILES

    if raw not in PROFILES:
        raise SettingsError(
            f"{name}={raw!r} is not a known emulation profile; valid values: {', '.join(sorted(PROFILES))}")
    return raw


DP_POLICIES = ("block", "block_marginal", "block_ttft", "cache_aware", "least_tokens",
               "round_robin")
"""Policies ``--block-dp-policy`` accepts (same names and semantics as the router's)."""


def _dp_policy(name: str, raw: str) -> str:
    value = raw.strip()
    if value not in DP_POLICIES:
        raise SettingsError(f"{name}={raw!r} is not a DP routing policy; valid values: "
                            f"{', '.join(DP_POLICIES)}")
    return value


def _length_model_dir(name: str, raw: str) -> str:
    path = os.path.expanduser(raw.strip())
    if not os.path.isfile(os.path.join(path, "metadata.json")):
        raise SettingsError(f"{name}={raw!r} is not a length-model directory (no metadata.json); "
                            "train one with python -m block_sgl.predictor.train_length")
    return path


_ZMQ_ENDPOINT = re.compile(r"^tcp://(?P<host>\[[^\]]+\]|[^:/\[\]]+):(?P<port>\d{1,5})$")


def parse_endpoint(name: str, raw: str) -> tuple[str, int]:
    """Split ``tcp://host:port`` into (host, port); anything else is a SettingsError."""
    m = _ZMQ_ENDPOINT.match(raw.strip())
    if not m or not 0 < int(m.group("port")) < 65536:
        raise SettingsError(f"{name}={raw!r} is not a ZMQ TCP endpoint; expected tcp://HOST:PORT "
                            "(e.g. tcp://127.0.0.1:5600)")
    return m.group("host").strip("[]"), int(m.group("port"))


def _endpoint(name: str, raw: str) -> str:
    parse_endpoint(name, raw)
    return raw.strip()


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclasses.dataclass(frozen=True)
class Setting:
    env: str
    flag: str
    parse: Callable[[str, str], Any]
    default: Any
    help: str
    metavar: str = "VALUE"


SETTINGS: tuple[Setting, ...] = (
    Setting("BLOCK_SGL_PUBLISH", "--block-publish", _endpoint, None,
            "Publish this instance's scheduler, queue and radix-cache state on this ZMQ endpoint "
            "(tcp://HOST:PORT, bound by the instance). Under --dp-size N, rank r uses PORT+r.",
            "tcp://HOST:PORT"),
    Setting("BLOCK_SGL_PUBLISH_ALLOW_REMOTE", "--block-publish-allow-remote", _bool, False,
            "Allow binding the publish endpoint on a non-loopback address (off by default: the "
            "stream is unauthenticated).", "BOOL"),
    Setting("BLOCK_SGL_STRICT", "--block-strict", _bool, False,
            "Refuse to start the server if block_sgl cannot run (e.g. the publish endpoint cannot "
            "be bound). Default: log an ERROR, disable block_sgl and keep serving.", "BOOL"),
    Setting("BLOCK_SGL_SNAPSHOT_INTERVAL_MS", "--block-snapshot-interval-ms", _positive_float, 10.0,
            "Minimum interval between published snapshots while the scheduler is busy.", "MS"),
    Setting("BLOCK_SGL_HEARTBEAT_INTERVAL_MS", "--block-heartbeat-interval-ms", _positive_float, 1000.0,
            "Interval between heartbeats (with a snapshot) while the scheduler is idle.", "MS"),
    Setting("BLOCK_SGL_INSTANCE_ID", "--block-instance-id", lambda n, r: r.strip() or None, None,
            "Instance id used as the stream topic (default: the server's http://HOST:PORT).", "ID"),
    Setting("BLOCK_SGL_EMULATE", "--block-emulate", _profile, None,
            "CPU test beds only: make every forward step last as long as on this GPU profile "
            "(e.g. h100-llama2-7b), sampling the profile's measured variability.", "PROFILE"),
    Setting("BLOCK_SGL_TIME_SCALE", "--block-time-scale", _positive_float, 1.0,
            "Multiply emulated step times by this factor (stretches time so CPU overhead stays "
            "small against step time; report it with every number).", "FACTOR"),
    Setting("BLOCK_SGL_EMULATE_SEED", "--block-emulate-seed", _int, None,
            "Seed of the emulator's step-time sampling (default: fresh entropy).", "INT"),
    Setting("BLOCK_SGL_DP_POLICY", "--block-dp-policy", _dp_policy, None,
            "Under --dp-size N: SGLang's DataParallelController dispatches each request with this "
            f"block_sgl routing policy ({', '.join(DP_POLICIES)}) over the DP ranks' state "
            "streams. Needs --block-publish; sets --load-balance-method total_tokens (the hooked "
            "method).", "NAME"),
    Setting("BLOCK_SGL_DP_LENGTH_MODEL", "--block-dp-length-model", _length_model_dir, None,
            "With --block-dp-policy: predict output lengths with this length model "
            "(python -m block_sgl.predictor.train_length) instead of the running mean.", "DIR"),
)


@dataclasses.dataclass(frozen=True)
class HookSettings:
    """Validated instance-side settings (one field per entry of ``SETTINGS``)."""

    publish: str | None = None
    publish_allow_remote: bool = False
    strict: bool = False
    snapshot_interval_ms: float = 10.0
    heartbeat_interval_ms: float = 1000.0
    instance_id: str | None = None
    emulate: str | None = None
    time_scale: float = 1.0
    emulate_seed: int | None = None
    dp_policy: str | None = None
    dp_length_model: str | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "HookSettings":
        environ = os.environ if environ is None else environ
        values = {}
        for s in SETTINGS:
            raw = environ.get(s.env)
            values[_field(s)] = s.default if raw is None or raw == "" else s.parse(s.env, raw)
        settings = cls(**values)
        if settings.publish:
            host, _ = parse_endpoint("BLOCK_SGL_PUBLISH", settings.publish)
            if not is_loopback(host) and not settings.publish_allow_remote:
                raise SettingsError(
                    f"BLOCK_SGL_PUBLISH={settings.publish!r} binds a non-loopback address; set "
                    "BLOCK_SGL_PUBLISH_ALLOW_REMOTE=1 (--block-publish-allow-remote) to allow it")
        if settings.dp_policy and not settings.publish:
            raise SettingsError(
                f"BLOCK_SGL_DP_POLICY={settings.dp_policy!r} needs the DP ranks' state streams: "
                "set BLOCK_SGL_PUBLISH (--block-publish tcp://127.0.0.1:PORT; rank r publishes "
                "on PORT+r)")
        if settings.dp_length_model and not settings.dp_policy:
            raise SettingsError("BLOCK_SGL_DP_LENGTH_MODEL is only used with BLOCK_SGL_DP_POLICY "
                                "(--block-dp-policy); set both or neither")
        return settings


def _field(setting: Setting) -> str:
    return setting.env.removeprefix("BLOCK_SGL_").lower()


def add_cli_args(parser) -> None:
    """Add the ``--block-*`` flags to an argparse parser (SGLang's or block_sgl's wrapper)."""
    group = parser.add_argument_group("block_sgl", "block_sgl instance hooks (env: BLOCK_SGL_*)")
    for s in SETTINGS:
        group.add_argument(s.flag, dest=_dest(s), default=None, metavar=s.metavar,
                           help=f"{s.help} Env: {s.env}.")


def _dest(setting: Setting) -> str:
    return "block_sgl_" + _field(setting)


def export_cli_args(args, environ=None) -> HookSettings:
    """Copy given ``--block-*`` values into the environment, then validate everything."""
    environ = os.environ if environ is None else environ
    for s in SETTINGS:
        value = getattr(args, _dest(s), None)
        if value is not None:
            environ[s.env] = str(value)
    return HookSettings.from_env(environ)
