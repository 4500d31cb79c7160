"""`python -m megatron_dsv3.bench pipeline --peers` at P = 2: the measured JSON and the adapters.

Our DualPipeV executor, torch's ScheduleDualPipeV and torch's Schedule1F1B run the same
weights on the same micro-batches, so their first-step losses and gradient norms must agree:
an independent check of the torch stage adapters (bench/pipeline_peers.py) and of the
gradient scaling each side applies. The times only have to be positive here.
"""

import argparse
import json

import pytest

from megatron_dsv3.bench import pipeline as bench_pipeline
from megatron_dsv3.bench.pipeline_peers import SCHEDULE_NAMES


@pytest.mark.slow
def test_peers_measure_three_schedules_that_compute_the_same_model(capfd):
    parser = argparse.ArgumentParser()
    bench_pipeline.add_parser(parser.add_subparsers())
    args = parser.parse_args(["pipeline", "--pp", "4", "--peers", "--peers-pp", "2", "--peers-warmup", "1", "--peers-steps", "1",
                              "--peers-cost-steps", "1", "--peers-profile", "1"])
    assert args.main(args) == 0

    lines = capfd.readouterr().out.strip().splitlines()  # the spawned processes' progress lines too
    assert any(line.startswith("peers: round 2/2 (timed) torch_1f1b") for line in lines)
    result = json.loads(lines[-1])
    assert [row["P"] for row in result["rows"]] == [4] * len(result["rows"])  # the simulated part is still there
    peers = result["peers"]
    assert (peers["P"], peers["microbatches"], peers["num_layers"], peers["timed_steps"]) == (2, 8, 4, 1)
    assert tuple(peers["schedules"]) == SCHEDULE_NAMES
    ours = peers["schedules"]["ours_dualpipev"]
    for name, row in peers["schedules"].items():
        assert len(row["step_s"]) == 1 and all(t > 0 for t in row["step_s"]) and row["mean_step_s"] > 0, name
        assert row["first_step_loss"] == pytest.approx(ours["first_step_loss"], rel=1e-5), name
        assert row["loss_rel_diff_vs_ours"] <= 1e-5, name
        # 1e-8: the MoE auxiliary loss's gradient scaled by 1/M twice (Megatron's and torch's) shows as ~4e-7
        assert row["first_step_grad_norm"] == pytest.approx(ours["first_step_grad_norm"], rel=1e-8), name
    assert 4 < ours["first_step_loss"] < 7  # about ln(257) = 5.55 at initialisation

    # the simulator's prediction from the costs of our recorded step: every DualPipeV stage's F,
    # B, W, FB measured; ours and torch's DualPipeV run one order, torch's 1F1B its own
    assert [c["stage"] for c in peers["stage_costs_s"]] == [0, 1, 2, 3]
    assert all(c[k] > 0 for c in peers["stage_costs_s"] for k in ("F", "B", "W", "FB"))
    predicted = {name: row["predicted_step_s"] for name, row in peers["schedules"].items()}
    assert predicted["ours_dualpipev"] == predicted["torch_dualpipev"] != predicted["torch_1f1b"]
    for row in peers["schedules"].values():
        assert row["measured_over_predicted"] == pytest.approx(row["median_step_s"] / row["predicted_step_s"])
        assert 0 < row["predicted_bubble_s"] < row["predicted_step_s"]
    # the profile: each rank's actions, and host time by category that adds up to about the step
    for name, profile in peers["profile"].items():
        ranks = profile["ranks"]
        assert [rank["actions"] for rank in ranks] == ([24, 23] if name != "torch_1f1b" else [16, 16]), name
        for rank in ranks:
            assert set(rank["ms_per_step"]) == {"schedule", "comm_issue", "comm_wait", "harness", "model"}
            assert rank["ms_per_step"]["model"] > rank["ms_per_step"]["schedule"] > 0, name
        per_rank = [rank["overhead_ms_per_action"] for rank in ranks]
        assert min(per_rank) <= profile["overhead_ms_per_action"] <= max(per_rank), name


@pytest.mark.parametrize("flags, fix", [
    (["--peers-microbatches", "3"], "--peers-microbatches 4 or more"),
    (["--peers-cost-steps", "0"], "cost_steps=0: must be at least 1"),
    (["--peers-profile", "-1"], "--peers-profile N >= 0"),
])
def test_peers_reject_a_set_up_with_the_rule(capsys, flags, fix):
    parser = argparse.ArgumentParser()
    bench_pipeline.add_parser(parser.add_subparsers())
    args = parser.parse_args(["pipeline", "--pp", "4", "--peers", "--peers-pp", "2", *flags])
    assert args.main(args) == 2
    assert fix in capsys.readouterr().err
