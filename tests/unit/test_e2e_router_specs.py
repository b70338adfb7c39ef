"""The e2e benchmark's router rows (``benchmarks/e2e/routers.py``): names → configurations."""

import pytest

from benchmarks.e2e.routers import parse_policies


def test_length_model_rows_load_the_model_and_say_so():
    specs = parse_policies(["block_marginal+lm", "block_marginal", "block+oracle",
                            "sgl:cache_aware"], sglang_router=True, length_model="/m")
    lm, plain, oracle, sgl = specs
    assert (lm.name, lm.args, lm.oracle) == ("block_sgl/block_marginal+lm",
                                             ("--length-model", "/m"), False)
    assert (plain.name, plain.args) == ("block_sgl/block_marginal", ())
    assert (oracle.name, oracle.oracle) == ("block_sgl/block+oracle", True)
    assert sgl.name == "sgl-router/cache_aware" and not sgl.is_block
    assert lm.is_block and plain.is_block and oracle.is_block


def test_a_length_model_row_without_a_model_is_refused():
    with pytest.raises(ValueError, match="needs --length-model"):
        parse_policies(["block+lm"], sglang_router=False)


def test_lm_mean_rows_also_ask_for_the_mean_estimate():
    (spec,) = parse_policies(["block_marginal+lm-mean"], sglang_router=False, length_model="/m")
    assert spec.name == "block_sgl/block_marginal+lm-mean" and spec.policy == "block_marginal"
    assert spec.args == ("--length-model", "/m", "--length-estimate", "mean")
    with pytest.raises(ValueError, match="needs --length-model"):
        parse_policies(["block+lm-mean"], sglang_router=False)
