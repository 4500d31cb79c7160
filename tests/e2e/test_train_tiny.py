"""The compact loop end to end on CPU: it learns, it balances, it writes what it promises."""

import json

import pytest

from megatron_dsv3.training.__main__ import main

pytestmark = pytest.mark.slow


def test_tiny_trains_balances_and_writes_metrics_and_plots(tmp_path, capsys):
    run_dir = tmp_path / "run"
    code = main(["--steps", "120", "--micro-batch-size", "4", "--num-microbatches", "2", "--warmup-steps", "10",
                 "--corpus-bytes", "1000000", "--run-dir", str(run_dir), "--no-progress", "--check"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    summary = json.loads(printed.strip().splitlines()[-1])
    assert summary["final_lm_loss"] < 0.6 * summary["first_lm_loss"]
    assert summary["max_violation_last_10pct"] < summary["max_violation_first_10pct"]

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 121))
    for key in ("lm_loss", "mtp_loss", "seq_balance_loss", "max_violation", "grad_norm", "lr"):
        assert all(r[key] is not None for r in records), key
    assert set(records[0]["expert_load"]) == {"decoder.2", "decoder.3", "mtp.1"}
    # gamma follows the token schedule: 10x the paper's 0.001, then 0 for the last 500/14800
    assert records[0]["gamma"] == 0.01 and records[-1]["gamma"] == 0.0
    assert records[0]["mtp_lambda"] == 0.3 and records[-1]["mtp_lambda"] == 0.1
    for plot in ("loss.png", "expert_load.png"):
        assert (run_dir / plot).stat().st_size > 10_000
