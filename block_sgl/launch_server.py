"""``python -m block_sgl.launch_server`` = ``python -m sglang.launch_server`` with block_sgl's
``--block-*`` flags (the plugin adds them to SGLang's own parser; this wrapper only makes the
intent explicit and fails clearly when the plugin is not installed)."""

from __future__ import annotations

import runpy
import sys


def main() -> None:
    try:
        from importlib.metadata import entry_points

        names = {ep.name for ep in entry_points(group="sglang.srt.plugins")}
    except Exception:  # pragma: no cover
        names = set()
    if "block_sgl" not in names:
        sys.exit("block_sgl's SGLang plugin is not installed (pip install -e . registers the "
                 "sglang.srt.plugins entry point 'block_sgl')")
    sys.argv[0] = "sglang.launch_server"
    runpy.run_module("sglang.launch_server", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
