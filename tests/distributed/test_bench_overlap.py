"""`python -m megatron_dsv3.bench overlap` on its smallest layout: the JSON it promises, and the
accounting its figures rest on. No speed is asserted (targets live in the benchmark's output).

References: the link's own formula for the chosen bandwidth (matched: a MoE layer's four
all-to-alls take its measured compute), the payload formulas for bytes per token copy, and
the definition of sequential FB, which waits for every exchange as soon as it is issued:
its blocked time is its communication time, whatever the link.
"""

import argparse
import json
import math

import pytest

from megatron_dsv3.bench import overlap
from megatron_dsv3.config import preset


@pytest.mark.slow
def test_overlap_benchmark_reports_both_modes_on_a_matched_link(capfd):
    parser = argparse.ArgumentParser()
    overlap.add_parser(parser.add_subparsers())
    args = parser.parse_args(["overlap", "--layouts", "ep2", "--microbatches", "3", "--seq-length", "32", "--steps", "1"])
    assert args.main(args) == 0
    result = json.loads(capfd.readouterr().out.strip().splitlines()[-1])

    row = result["layouts"]["ep2"]
    calibration, link = row["calibration"], row["link"]
    assert calibration["comm_per_moe_layer_s"] == pytest.approx(calibration["compute_per_moe_layer_s"])
    assert calibration["comm_per_moe_layer_s"] == pytest.approx(
        calibration["wire_bytes_per_moe_layer"] / (link["gbps"] * 1e9) + 4 * link["latency_us"] * 1e-6)
    sequential, overlapped = row["sequential"], row["overlapped"]
    assert sequential["exposed_fraction"] > 0.9 and sequential["fb_comm_s"] > 0
    assert 0 <= overlapped["exposed_fraction"] and overlapped["fb_comm_s"] > 0
    assert row["step_ratio"] == pytest.approx(overlapped["step_s"] / sequential["step_s"])
    assert row["ratio_target_met"] == (row["step_ratio"] <= 0.65)
    assert row["bubble"]["simulated_s"] >= 0 and set(row["bubble"]["costs"]) == {"F", "B", "W", "FB"}

    hidden = preset("tiny-fp8").hidden_size
    assert result["bytes_per_token_copy"] == {"fp32": 4 * hidden + 4, "bf16": 2 * hidden + 4,
                                              "fp8": hidden + 4 * math.ceil(hidden / 128) + 4, "hidden": hidden}


def test_overlap_benchmark_rejects_a_layout_it_does_not_have(capsys):
    parser = argparse.ArgumentParser()
    overlap.add_parser(parser.add_subparsers())
    args = parser.parse_args(["overlap", "--layouts", "ep4"])
    assert args.main(args) == 2
    assert "layouts ['ep4']: choose from ['ep2', 'ep2_pp2']" in capsys.readouterr().err
