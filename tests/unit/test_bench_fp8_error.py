"""`python -m megatron_dsv3.bench fp8-error`: the JSON it ends with, on small shapes (not a timing test)."""

import json

from megatron_dsv3.bench import fp8_error
from megatron_dsv3.bench.__main__ import main

ROW_KEYS = {"M", "K", "N", "rel_err_per_tensor", "rel_err_tile", "ratio", "token_err_per_tensor", "token_err_tile", "token_ratio"}


def test_run_reports_both_outlier_models_every_shape_and_the_acceptance():
    result = fp8_error.run(shapes=((64, 256, 32), (32, 300, 16)), sweep_factors=(1.0, 1e3))
    assert set(result) == {
        "benchmark", "outlier_models", "channels", "massive", "sweep", "min_token_ratio", "acceptance_ratio", "acceptance_5x",
    }
    for model in ("channels", "massive"):
        assert [(r["M"], r["K"], r["N"]) for r in result[model]] == [(64, 256, 32), (32, 300, 16)]
        for row in result[model]:
            assert set(row) == ROW_KEYS
            assert row["ratio"] == row["rel_err_per_tensor"] / row["rel_err_tile"]
            assert row["token_ratio"] == row["token_err_per_tensor"] / row["token_err_tile"]
            assert 0 < row["token_err_tile"] < 0.1  # tiles keep every token at E4M3's precision
    assert result["min_token_ratio"] == min(r["token_ratio"] for r in result["massive"])
    assert result["acceptance_5x"] == (result["min_token_ratio"] >= 5.0)
    assert [r["outlier_factor"] for r in result["sweep"]] == [1.0, 1e3]
    json.dumps(result)


def test_massive_activations_cost_per_tensor_scaling_the_quiet_tokens():
    """The effect the benchmark measures, at a size a test can afford: 1e5x outliers."""
    row = fp8_error.run(shapes=((256, 512, 64),), sweep_factors=())["massive"][0]
    assert row["token_ratio"] > 3


def test_cli_prints_a_table_then_one_json_line(capsys):
    assert main(["fp8-error", "--shape", "32", "128", "16", "--seed", "1"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert "per-tensor" in lines[1]
    assert json.loads(lines[-1])["massive"][0]["K"] == 128


def test_cli_without_subcommand_prints_usage_listing_them(capsys):
    assert main([]) == 2
    assert "fp8-error" in capsys.readouterr().err
