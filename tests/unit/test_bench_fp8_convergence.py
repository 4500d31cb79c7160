"""`python -m megatron_dsv3.bench fp8-convergence --seeds N`: the verdict from the runs' final losses
(checked against the statistics written out), and the orchestration over seeds and arms with
the training replaced by a stand-in that writes known loss curves."""

import json
import math

import pytest

from megatron_dsv3.bench import fp8_convergence
from megatron_dsv3.bench.__main__ import main


def _stdev(values):
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def test_final_loss_is_the_mean_of_the_last_tenth_of_steps():
    records = [{"lm_loss": float(step)} for step in range(1, 31)]
    assert fp8_convergence.final_loss(records) == (28 + 29 + 30) / 3


def test_a_gap_inside_the_fp32_seed_spread_passes_one_outside_both_bounds_fails():
    fp32, fp8 = [2.0, 2.1, 1.9], [2.06, 2.16, 1.96]
    verdict = fp8_convergence.compare({"fp32": fp32, "fp8": fp8})
    spread = _stdev(fp32) / 2.0
    assert verdict["arms"]["fp32"]["relative_spread"] == pytest.approx(spread)
    assert verdict["relative_gap"] == pytest.approx(0.06 / 2.0)
    assert verdict["threshold"] == pytest.approx(spread) and verdict["passes"] is True  # 3% gap, 5% spread

    tight = [2.0, 2.0001, 1.9999]  # spread 0.005% < the paper's 0.25%
    verdict = fp8_convergence.compare({"fp32": tight, "fp8": [2.01, 2.01, 2.01]})
    assert verdict["threshold"] == 0.0025
    assert verdict["relative_gap"] == pytest.approx(0.005) and verdict["passes"] is False


def test_run_trains_every_seed_in_both_arms_and_plots_every_curve(tmp_path, monkeypatch, capsys):
    trained = []

    def fake_train(args):  # a curve that depends on the arm and the seed, as metrics.jsonl holds it
        trained.append((args.overrides["fp8_blockwise"], args.seed, args.steps))
        offset = 0.01 * (args.seed - 7) + (0.001 if args.overrides["fp8_blockwise"] else 0.0)
        args.run_dir.mkdir(parents=True)
        lines = [json.dumps({"step": s, "lm_loss": 5.0 / s + 2.0 + offset}) for s in range(1, args.steps + 1)]
        (args.run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")

    monkeypatch.setattr(fp8_convergence, "train", fake_train)
    assert main(["fp8-convergence", "--steps", "20", "--seeds", "3", "--seed", "7", "--run-dir", str(tmp_path)]) == 0
    assert trained == [(fp8, seed, 20) for seed in (7, 8, 9) for fp8 in (None, "emulate")]
    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[-1])
    tail = lambda offset: (5.0 / 19 + 5.0 / 20) / 2 + 2.0 + offset  # noqa: E731
    assert result["arms"]["fp32"]["final_losses"] == pytest.approx([tail(0.0), tail(0.01), tail(0.02)])
    assert result["relative_gap"] == pytest.approx(0.001 / result["arms"]["fp32"]["mean"])
    assert result["passes"] is True and result["seeds"] == [7, 8, 9]
    assert (tmp_path / "curves.png").stat().st_size > 0
    assert any("PASS" in line for line in lines)
