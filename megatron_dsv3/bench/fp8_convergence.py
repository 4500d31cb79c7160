"""`python -m megatron_dsv3.bench fp8-convergence`: FP8 (emulated) against FP32 training.

Report §3.3 validates its FP8 framework by training the same model on the same data in
BF16 and in FP8: the relative loss error stays below 0.25%. This benchmark repeats that at
CPU scale: the `tiny-fp8` preset (`tiny` widened so every GEMM's inner dimension is a whole
number of 128-wide tiles), the same seed and the same batches, trained once in FP32
and once with every Linear of the decoder in block-scaled FP8 (`fp8_blockwise='emulate'`:
1x128 activation tiles, 128x128 weight blocks, FP32 promotion every 128, power-of-2
scales after attention). Embedding, output head, router, norms and the attention core
stay in FP32, as in the paper. It prints both loss curves' tails and the relative gap of
the final loss (the mean over the last 10% of steps); the last line is JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from megatron_dsv3.training.loop import TrainArgs, train

PAPER_BOUND = 0.0025  # report §3.3: relative loss error below 0.25%


def final_loss(records: list[dict]) -> float:
    tail = records[-max(1, len(records) // 10):]
    return sum(r["lm_loss"] for r in tail) / len(tail)


def run(steps: int, run_dir: Path, seed: int) -> dict:
    results = {}
    for label, fp8 in (("fp32", None), ("fp8", "emulate")):
        args = TrainArgs(
            preset="tiny-fp8", overrides={"fp8_blockwise": fp8},
            steps=steps, micro_batch_size=4, num_microbatches=2, warmup_steps=steps // 20, seed=seed,
            run_dir=run_dir / label,
        )
        print(f"training {label} for {steps} steps -> {args.run_dir}", flush=True)
        train(args)
        records = [json.loads(line) for line in (args.run_dir / "metrics.jsonl").read_text().splitlines()]
        results[label] = records
    fp32, fp8 = final_loss(results["fp32"]), final_loss(results["fp8"])
    gap = (fp8 - fp32) / fp32
    tail = lambda rs: [round(r["lm_loss"], 4) for r in rs[-10:]]  # noqa: E731
    return {
        "steps": steps,
        "fp32_final_loss": fp32,
        "fp8_final_loss": fp8,
        "relative_gap": gap,
        "within_paper_bound": abs(gap) < PAPER_BOUND,
        "fp32_tail": tail(results["fp32"]),
        "fp8_tail": tail(results["fp8"]),
    }


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("fp8-convergence", help="train tiny-fp8 in FP32 and in FP8 (emulated); the loss gap")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--run-dir", type=Path, default=Path("runs/fp8-convergence"))
    parser.set_defaults(main=main)


def main(args: argparse.Namespace) -> int:
    summary = run(args.steps, args.run_dir, args.seed)
    print(f"final loss (mean of the last 10% of steps): fp32 {summary['fp32_final_loss']:.4f}, "
          f"fp8 {summary['fp8_final_loss']:.4f}, relative gap {100 * summary['relative_gap']:+.3f}% "
          f"(paper: |gap| < {100 * PAPER_BOUND:g}%): {'within' if summary['within_paper_bound'] else 'OUTSIDE'}")
    print(json.dumps(summary))
    return 0
