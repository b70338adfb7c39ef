"""block_sgl's SGLang plugin (entry point group ``sglang.srt.plugins``, name ``block_sgl``).

SGLang calls ``register()`` once in every process that loads plugins (launch_server's main
process before it parses arguments, each scheduler, the detokenizer, the DP controller). It
registers hooks according to the ``BLOCK_SGL_*`` environment (see ``flags.py``); with none set
it only adds the ``--block-*`` server flags, and SGLang behaves exactly as stock.

This package is the only one (with ``block_sgl.testing``) that imports sglang, and only lazily.
"""

from __future__ import annotations

import sys

from block_sgl.hooks.flags import HookSettings, SettingsError

SERVER_ARGS = "sglang.srt.server_args.ServerArgs"
DP_CONTROLLER_MODULE = "sglang.srt.managers.data_parallel_controller"


def register() -> None:
    """Plugin entry point: register block_sgl's hooks for the current environment."""
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    try:
        settings = HookSettings.from_env()
    except SettingsError as e:
        # SGLang catches Exceptions raised by plugins and carries on; a bad setting must stop
        # the server instead of letting it run silently without what was asked for.
        raise SystemExit(f"block_sgl: {e}") from None

    HookRegistry.register(f"{SERVER_ARGS}.add_cli_args", _add_cli_args_hook, HookType.AFTER)
    HookRegistry.register(f"{SERVER_ARGS}.from_cli_args", _from_cli_args_hook, HookType.AFTER)
    if settings.emulate:
        from block_sgl.hooks import cpu_extend, emulate

        emulate.install(settings)
        cpu_extend.install()  # keeps prefix-cached prefills' CPU cost under the emulated time
    try:
        if settings.publish:
            from block_sgl.hooks import scheduler

            scheduler.install(settings)
        if settings.dp_policy and DP_CONTROLLER_MODULE in sys.modules:
            # Only where SGLang's DP controller can run (its process imported the module before
            # loading plugins); elsewhere resolving the hook target would import it for nothing.
            from block_sgl.hooks import dp

            dp.install(settings)
    except ImportError as e:  # e.g. a compiled extension not built: stop, as for a bad setting
        raise SystemExit(f"block_sgl: {e}") from None


def _add_cli_args_hook(result, parser):
    from block_sgl.hooks.flags import add_cli_args

    add_cli_args(parser)
    return None


def _from_cli_args_hook(result, cls, args):
    from block_sgl.hooks.flags import export_cli_args

    try:
        settings = export_cli_args(args)
        if settings.publish and result is not None:
            _route_kv_events_to_block_sgl(result, settings.publish)
        if settings.dp_policy and result is not None:
            require_total_tokens(result, settings.dp_policy)
        if settings.dp_length_model:
            _check_length_model(settings.dp_length_model)
    except SettingsError as e:
        print(f"block_sgl: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    return None


def kv_events_config_for(publish_endpoint: str) -> str:
    """The ``--kv-events-config`` block_sgl sets: its own publisher (cache events enter the
    block_sgl stream in-process) and the stream's endpoint, so that ``GET /server_info``
    (``kv_events_config``) tells a router where to subscribe."""
    import json

    return json.dumps({"publisher": "block_sgl", "endpoint": publish_endpoint})


def _route_kv_events_to_block_sgl(server_args, publish_endpoint: str) -> None:
    """Radix-cache events reach block_sgl through SGLang's KV-event publisher interface."""
    import json

    current = getattr(server_args, "kv_events_config", None)
    ours = kv_events_config_for(publish_endpoint)
    try:
        same_publisher = bool(current) and json.loads(current).get("publisher") == "block_sgl"
    except (ValueError, AttributeError):
        same_publisher = False
    if current and not same_publisher:
        raise SettingsError(
            f"--kv-events-config {current!r} conflicts with BLOCK_SGL_PUBLISH: block_sgl publishes "
            "the radix-cache events itself (same stream as the scheduler state); drop "
            "--kv-events-config or BLOCK_SGL_PUBLISH")
    server_args.kv_events_config = ours


def require_total_tokens(server_args, policy: str) -> None:
    """``--block-dp-policy`` replaces SGLang's total_tokens dispatch: it needs DP ranks and
    ``--load-balance-method total_tokens``, which is set here when the user left the default."""
    ranks = (int(getattr(server_args, "dp_size", 1) or 1)
             * int(getattr(server_args, "attn_dp_size", 1) or 1))
    if ranks < 2:
        raise SettingsError(
            f"BLOCK_SGL_DP_POLICY={policy!r} (--block-dp-policy) routes between data-parallel "
            "ranks: start the server with --dp-size N (N >= 2), or drop the setting")
    if getattr(server_args, "disaggregation_mode", "null") not in (None, "null", "decode"):
        raise SettingsError(
            f"BLOCK_SGL_DP_POLICY={policy!r} (--block-dp-policy) cannot route a PD prefill "
            "server: its DP ranks must follow the bootstrap room")
    method = getattr(server_args, "load_balance_method", "auto")
    if method in (None, "auto"):
        server_args.load_balance_method = "total_tokens"
    elif method != "total_tokens":
        raise SettingsError(
            f"--load-balance-method {method} conflicts with BLOCK_SGL_DP_POLICY={policy!r} "
            "(--block-dp-policy): block_sgl dispatches in place of SGLang's total_tokens method; "
            "drop --load-balance-method (block_sgl sets total_tokens) or pass "
            "--load-balance-method total_tokens, or drop --block-dp-policy")


def _check_length_model(path: str) -> None:
    """Load the length model once at start so that a bad one stops the server here, not in
    the DP controller."""
    try:
        from block_sgl.predictor.length import LengthPredictor

        LengthPredictor.load(path)
    except (ValueError, OSError, ImportError) as e:
        raise SettingsError(f"BLOCK_SGL_DP_LENGTH_MODEL={path!r}: {e}") from None
