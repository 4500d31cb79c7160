"""`python -m megatron_dsv3.bench fp8-error`: the JSON it ends with, on small shapes (not a timing test),
and its parts against independent references (E4M3 / E5M2 written out with math.frexp, the
saturation a known drift must cause)."""

import json
import math

import torch

from megatron_dsv3.bench import fp8_error
from megatron_dsv3.bench.__main__ import main

ROW_KEYS = {"M", "K", "N", "rel_err_per_tensor", "rel_err_tile", "ratio", "token_err_per_tensor", "token_err_tile", "token_ratio"}


def test_run_reports_both_outlier_models_every_shape_the_sweep_and_the_acceptance():
    result = fp8_error.run(shapes=((64, 256, 32), (32, 300, 16)), sweep_factors=(10.0, 1e3), grad_steps=None, delayed_steps=None)
    assert set(result) == {
        "benchmark", "outlier_models", "channels", "massive", "min_token_ratio", "acceptance_ratio", "acceptance_5x",
        "outlier_sweep", "gradients", "delayed_scaling",
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
    sweep = result["outlier_sweep"]
    assert [(r["model"], r["outlier_factor"]) for r in sweep["rows"]] == [
        (m, f) for m in ("channel", "token", "massive") for f in (10.0, 1e3)
    ]
    assert sweep["tile_never_worse"] == all(r["token_err_tile"] <= 1.01 * r["token_err_per_tensor"] for r in sweep["rows"])
    assert result["gradients"] is None and result["delayed_scaling"] is None
    json.dumps(result)


def test_massive_activations_cost_per_tensor_scaling_the_quiet_tokens():
    """The effect the benchmark measures, at a size a test can afford: 1e5x outliers."""
    row = fp8_error.run(shapes=((256, 512, 64),), sweep_factors=(), grad_steps=None, delayed_steps=None)["massive"][0]
    assert row["token_ratio"] > 3


def test_token_outliers_push_the_other_tokens_into_e4m3_subnormals_under_per_tensor_scaling():
    """1e5x outlier tokens: the per-tensor scale is ~1e5 amax / 448, so a quiet token's values
    fall below E4M3's smallest normal (2**-6) and keep a few bits at most; tiles keep them."""
    sweep = fp8_error.outlier_sweep((128, 256, 64), (1e5,), torch.Generator().manual_seed(0), models=("token",))
    row = sweep["rows"][0]
    quiet_codes = 448 / 1e5 * 3  # a quiet |x| ~ 3 against an outlier token's amax ~ 1e5 x 3
    assert quiet_codes < 2**-6
    assert row["token_err_per_tensor"] > 0.25 and row["token_err_tile"] < 0.05 and sweep["tile_never_worse"]


def _round_to_bits(v: float, bits: int) -> float:
    """v to `bits` significant bits, round to nearest even, by math.frexp (the reference)."""
    if v == 0:
        return 0.0
    m, e = math.frexp(v)
    return round(m * 2**bits) * 2.0 ** (e - bits)


def test_per_tensor_e5m2_is_three_significant_bits_with_amax_at_57344():
    x = torch.randn(64, 96, generator=torch.Generator().manual_seed(0), dtype=torch.float32) * 1e-4  # gradient-sized
    got = fp8_error.quantize_per_tensor(x, torch.float8_e5m2)
    scale = float(x.abs().max()) / 57344.0
    for v, q in zip(x.flatten().tolist(), got.flatten().tolist()):
        code = v / scale
        if abs(code) >= 2.0**-14:  # E5M2's normal range: 2 stored bits + the implicit one
            assert math.isclose(q, _round_to_bits(code, 3) * scale, rel_tol=1e-6), (v, q)
    assert math.isclose(float(got.abs().max()), float(x.abs().max()), rel_tol=1e-6)  # amax maps to 57344 exactly


def test_e5m2_per_tensor_has_about_twice_the_error_of_e4m3_tiles_on_gaussian_gradients():
    """One mantissa bit fewer halves the rounding step: the ratio is ~2 where the range is no issue."""
    dy = torch.randn(256, 384, generator=torch.Generator().manual_seed(1))
    row = fp8_error.gradient_errors(dy)
    assert 1.7 < row["ratio"] < 2.4 and 1.7 < row["token_ratio"] < 2.4


def test_delayed_scaling_saturates_what_a_doubling_scale_puts_beyond_the_stale_amax():
    """Each step doubles the same activations: the delayed scale is the previous amax / 448,
    half the current one, so exactly the values above amax / 2 saturate (step 1, with scale 1:
    those above 448)."""
    base = torch.randn(32, 256, generator=torch.Generator().manual_seed(2)) * 300
    activations = [base * 2.0**t for t in range(4)]
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(3)) / 16
    per_step, saturated = fp8_error.delayed_scaling_errors(activations, w, histories=(16,))
    expected_later = float((base.abs() > base.abs().max() / 2).float().mean())
    assert saturated["delayed_16"][0] == float((base.abs() > 448).float().mean())
    assert saturated["delayed_16"][1:] == [expected_later] * 3
    assert all(d > t for d, t in zip(per_step["delayed_16"][1:], per_step["tile"][1:]))


def test_cli_prints_a_table_then_one_json_line(capsys):
    assert main(["fp8-error", "--shape", "32", "128", "16", "--seed", "1", "--grad-steps", "0", "--delayed-steps", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert "per-tensor" in lines[1]
    result = json.loads(lines[-1])
    assert result["massive"][0]["K"] == 128 and result["delayed_scaling"]["steps"] == 3
    assert any("delayed_16" in line for line in lines)


def test_cli_without_subcommand_prints_usage_listing_them(capsys):
    assert main([]) == 2
    err = capsys.readouterr().err
    assert "fp8-error" in err and "fp8-accumulation" in err
