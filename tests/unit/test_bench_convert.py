"""`python -m megatron_dsv3.bench convert` at tiny sizes: the JSON it promises, and that its ratios,
speed-up and projection are computed from the times and sizes it measured. No speed is asserted."""

import json

import pytest

from megatron_dsv3.bench.__main__ import main


def test_convert_benchmark_reports_what_it_measured(capsys):
    assert main(["convert", "--preset", "tiny", "--shard-mb", "0.1", "--release-preset", "tiny"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[2].strip().startswith("copy (limit)")
    result = json.loads(lines[-1])
    assert {"copy", "convert_1", "convert_2", "ratio_bytes", "ratio_input", "speedup", "peak_over_largest_shard",
            "memory_limit_met", "target_met", "release_projection", "input", "output_bytes"} <= set(result)

    size_in, size_out = result["input"]["bytes"], result["output_bytes"]
    assert result["input"]["shards"] >= 3 and size_out > size_in  # FP8 in, BF16 out
    copy, one, two = result["copy"]["seconds"], result["convert_1"]["seconds"], result["convert_2"]["seconds"]
    assert [copy, one, two] == [result["copy"]["all_seconds"][0], result["convert_1"]["all_seconds"][0],
                                result["convert_2"]["all_seconds"][0]]  # one round: its own times
    assert result["ratio_bytes"] == pytest.approx(((size_in + size_out) / one) / (2 * size_in / copy))
    assert result["ratio_input"] == pytest.approx(copy / one)
    assert result["target_met"] == (result["ratio_bytes"] >= 0.5)
    assert result["speedup"] == pytest.approx(one / two)
    peak = max(result["convert_1"]["peak_rss_over_baseline"], result["convert_2"]["peak_rss_over_baseline"])
    assert peak > 0 and result["peak_over_largest_shard"] == pytest.approx(peak / result["input"]["largest_shard"])

    projection = result["release_projection"]  # the "release" is the benchmark's own model here
    release_in, release_out = projection["input_bytes"], projection["output_bytes"]
    assert 0.9 * size_in < release_in <= size_in  # the files' headers aside
    assert projection["hours_1_process"] == pytest.approx(release_in / (size_in / one) / 3600)
    assert projection["hours_2_processes"] == pytest.approx(release_in / (size_in / two) / 3600)
    assert projection["hours_copy_limit"] == pytest.approx((release_in + release_out) / (2 * size_in / copy) / 3600)


def test_convert_benchmark_rejects_a_bad_setting_before_any_work(capsys):
    assert main(["convert", "--processes", "1"]) == 2
    assert "processes=1: the parallel mode needs at least 2" in capsys.readouterr().err
