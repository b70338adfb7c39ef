import argparse

import pytest

from block_sgl.hooks.flags import SETTINGS, HookSettings, SettingsError, add_cli_args, export_cli_args


def test_defaults_when_nothing_is_set():
    s = HookSettings.from_env({})
    assert s.publish is None and s.emulate is None and s.time_scale == 1.0


@pytest.mark.parametrize("env, needle", [
    ({"BLOCK_SGL_EMULATE": "h200-magic"}, "BLOCK_SGL_EMULATE='h200-magic'.*h100-llama2-7b"),
    ({"BLOCK_SGL_TIME_SCALE": "fast"}, "BLOCK_SGL_TIME_SCALE"),
    ({"BLOCK_SGL_TIME_SCALE": "0"}, "BLOCK_SGL_TIME_SCALE"),
    ({"BLOCK_SGL_TIME_SCALE": "nan"}, "BLOCK_SGL_TIME_SCALE"),
    ({"BLOCK_SGL_PUBLISH": "127.0.0.1:5600"}, "BLOCK_SGL_PUBLISH.*tcp://HOST:PORT"),
    ({"BLOCK_SGL_PUBLISH": "tcp://127.0.0.1:99999"}, "BLOCK_SGL_PUBLISH"),
    ({"BLOCK_SGL_PUBLISH": "tcp://0.0.0.0:5600"}, "BLOCK_SGL_PUBLISH_ALLOW_REMOTE"),
    ({"BLOCK_SGL_STRICT": "maybe"}, "BLOCK_SGL_STRICT"),
    ({"BLOCK_SGL_EMULATE_SEED": "1.5"}, "BLOCK_SGL_EMULATE_SEED"),
])
def test_bad_values_name_the_variable(env, needle):
    with pytest.raises(SettingsError, match=needle):
        HookSettings.from_env(env)


def test_remote_bind_needs_opt_in():
    s = HookSettings.from_env({"BLOCK_SGL_PUBLISH": "tcp://0.0.0.0:5600",
                               "BLOCK_SGL_PUBLISH_ALLOW_REMOTE": "1"})
    assert s.publish == "tcp://0.0.0.0:5600"


def test_cli_flags_export_to_env():
    parser = argparse.ArgumentParser()
    add_cli_args(parser)
    args = parser.parse_args(["--block-emulate", "h100-llama2-7b", "--block-time-scale", "4"])
    env = {}
    s = export_cli_args(args, env)
    assert env == {"BLOCK_SGL_EMULATE": "h100-llama2-7b", "BLOCK_SGL_TIME_SCALE": "4"}
    assert s.emulate == "h100-llama2-7b" and s.time_scale == 4.0


def test_every_setting_is_documented_in_the_readme():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    missing = [s.env for s in SETTINGS if s.env not in readme or s.flag not in readme]
    assert missing == []


def test_dp_rank_publishes_on_port_plus_rank():
    pytest.importorskip("zmq")
    from block_sgl.hooks.scheduler import endpoints_for_rank

    assert endpoints_for_rank("tcp://127.0.0.1:5600", 0) == ("tcp://127.0.0.1:5600", "tcp://127.0.0.1:6600")
    assert endpoints_for_rank("tcp://127.0.0.1:5600", 3) == ("tcp://127.0.0.1:5603", "tcp://127.0.0.1:6603")
    assert endpoints_for_rank("tcp://[::1]:5600", 1) == ("tcp://[::1]:5601", "tcp://[::1]:6601")
