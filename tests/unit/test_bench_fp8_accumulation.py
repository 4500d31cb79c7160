"""`python -m megatron_dsv3.bench fp8-accumulation`: the 14-bit accumulator against a reference
written with Python floats (math.frexp, int(), round(), struct's FP32), and the report's
promotion (N_C = 128) lowering the error."""

import json
import math
import struct

import pytest
import torch

from megatron_dsv3.bench import fp8_accumulation as acc
from megatron_dsv3.bench.__main__ import main


def _round_ref(v: float, bits: int, mode: str) -> float:
    if v == 0:
        return 0.0
    m, e = math.frexp(v)  # v = m * 2**e, 0.5 <= |m| < 1
    scaled = m * 2**bits
    return (int(scaled) if mode == "truncate" else round(scaled)) * 2.0 ** (e - bits)  # int: toward zero; round: to even


def _fp32(v: float) -> float:
    return struct.unpack("f", struct.pack("f", v))[0]


@pytest.mark.parametrize("mode", ["truncate", "nearest"])
@pytest.mark.parametrize("bits", [4, 14, 24])
def test_round_significand_equals_the_frexp_reference(mode, bits):
    generator = torch.Generator().manual_seed(bits)
    values = torch.randn(400, generator=generator, dtype=torch.float64) * torch.logspace(-30, 30, 400, dtype=torch.float64)
    ties = torch.tensor([(2**13 + 0.5) / 2**13, -(2**13 + 1.5) / 2**13, 0.0, 1.0, -3.0], dtype=torch.float64)
    x = torch.cat([values, ties])
    got = acc.round_significand(x, bits, mode)
    assert got.tolist() == [_round_ref(v, bits, mode) for v in x.tolist()]


@pytest.mark.parametrize("promote", [None, 128])
@pytest.mark.parametrize("mode", ["truncate", "nearest"])
def test_accumulate_equals_one_product_at_a_time_in_python(promote, mode):
    """The slices are scaled 2**0, 2**12, 2**-12, 2**6 (exactly): partial sums far apart in
    magnitude, so that the FP32 additions of the promotion round too."""
    a, b = acc.e4m3_inputs(3, 2, 500, torch.Generator().manual_seed(0))
    a = a * torch.tensor([2.0**0, 2.0**12, 2.0**-12, 2.0**6], dtype=torch.float64).repeat_interleave(128)[:500]
    got = acc.accumulate(a, b, bits=14, mode=mode, promote_every=promote)
    for i in range(3):
        for j in range(2):
            total, partial = 0.0, 0.0
            for k in range(500):
                partial = _round_ref(partial + a[i, k].item() * b[j, k].item(), 14, mode)
                if promote and (k + 1) % promote == 0:
                    total, partial = _fp32(total + partial), 0.0
            want = _fp32(total + partial) if promote else partial
            assert got[i, j].item() == want


def test_a_53_bit_accumulator_is_float64():
    a, b = acc.e4m3_inputs(4, 5, 200, torch.Generator().manual_seed(1))
    assert torch.allclose(acc.accumulate(a, b, bits=53, promote_every=None), a @ b.T, rtol=1e-14, atol=1e-12)


def test_promotion_every_128_bounds_the_error_that_grows_with_k_without_it():
    result = acc.run(ks=(256, 2048), M=16, N=16, seed=0)
    row = {(r["K"], r["rounding"], r["promotion"]): r for r in result["rows"]}
    assert row[(2048, "truncate", None)]["norm_rel_err"] > 3 * row[(256, "truncate", None)]["norm_rel_err"]
    for K in (256, 2048):
        assert row[(K, "truncate", 128)]["max_err_rms"] < row[(K, "truncate", None)]["max_err_rms"]
    # with promotion, each 128-slice's 14-bit sum errs by at most 127 truncations of 2**-13 relative
    assert row[(2048, "truncate", 128)]["norm_rel_err"] < 128 * 2**-13
    assert result["promotion_lowers_every_max"] is True


def test_cli_prints_a_table_then_one_json_line(capsys):
    assert main(["fp8-accumulation", "--k", "256", "--m", "4", "--n", "4"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert "max err/rms" in lines[1]
    result = json.loads(lines[-1])
    assert [(r["K"], r["rounding"], r["promotion"]) for r in result["rows"]] == [
        (256, "truncate", None), (256, "truncate", 128), (256, "nearest", None), (256, "nearest", 128)
    ]
    assert result["paper"] == {"K": 4096, "max_rel_err": 0.02, "promotion": None}
