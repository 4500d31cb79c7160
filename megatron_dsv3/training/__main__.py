"""`python -m megatron_dsv3.training`: train a preset with the compact loop (the demo's entry point).

One process, or several under torchrun, e.g. DualPipeV on 2 CPU processes:
    torchrun --nproc-per-node 2 -m megatron_dsv3.training --pipeline-schedule dualpipev --pp 2
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from megatron_dsv3.training.loop import PIPELINE_SCHEDULES, TrainArgs, train


def parse_args(argv=None) -> tuple[TrainArgs, bool]:
    defaults = TrainArgs()
    p = argparse.ArgumentParser(prog="python -m megatron_dsv3.training", description=__doc__)
    p.add_argument("--preset", default=defaults.preset, help="model preset (megatron_dsv3.config.PRESETS)")
    p.add_argument("--steps", type=int, default=defaults.steps)
    p.add_argument("--micro-batch-size", type=int, default=defaults.micro_batch_size)
    p.add_argument("--num-microbatches", type=int, default=defaults.num_microbatches)
    p.add_argument("--lr", type=float, default=defaults.lr)
    p.add_argument("--min-lr", type=float, default=defaults.min_lr)
    p.add_argument("--warmup-steps", type=int, default=defaults.warmup_steps)
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--corpus-bytes", type=int, default=defaults.corpus_bytes, help="bytes of stdlib source to train on")
    p.add_argument("--run-dir", type=Path, default=defaults.run_dir)
    p.add_argument("--set", action="append", default=[], metavar="FIELD=JSON",
                   help="override a config field, e.g. --set num_layers=4 --set moe_router_topk=4")
    p.add_argument("--bf16-moments", action="store_true", help="AdamW moments in BF16 (PAPER §5); master weights stay FP32")
    p.add_argument("--pipeline-schedule", choices=PIPELINE_SCHEDULES, default=defaults.pipeline_schedule,
                   help="dualpipev / dualpipe: pipeline over --pp ranks with two chunks per rank (PAPER §6)")
    p.add_argument("--pp", type=int, default=defaults.pipeline_size, help="ranks per pipeline (the rest are data parallel)")
    p.add_argument("--layers-per-stage", type=json.loads, default=None, metavar="JSON",
                   help="uneven pipeline layout, one layer count per stage, e.g. '[1,2,2,1]'")
    p.add_argument("--save-interval", type=int, default=defaults.save_interval,
                   help="write a checkpoint to RUN_DIR/checkpoints every N steps (0: never)")
    p.add_argument("--resume", action="store_true", help="continue from RUN_DIR/checkpoints/latest")
    p.add_argument("--ema-decay", type=float, default=None, help="keep an EMA of the parameters in CPU memory (PAPER §6)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--check", action="store_true",
                   help="exit 1 unless the final LM loss is below 60%% of the first and MaxVio fell")
    a = p.parse_args(argv)
    overrides = {}
    for item in a.set:
        name, sep, value = item.partition("=")
        if not sep:
            p.error(f"--set {item!r}: expected FIELD=JSON, e.g. --set moe_router_topk=4")
        overrides[name] = json.loads(value)
    args = TrainArgs(
        preset=a.preset, overrides=overrides, steps=a.steps, micro_batch_size=a.micro_batch_size,
        num_microbatches=a.num_microbatches, lr=a.lr, min_lr=a.min_lr, warmup_steps=a.warmup_steps,
        seed=a.seed, corpus_bytes=a.corpus_bytes, bf16_moments=a.bf16_moments, run_dir=a.run_dir, progress=not a.no_progress,
        pipeline_schedule=a.pipeline_schedule, pipeline_size=a.pp, layers_per_stage=a.layers_per_stage,
        save_interval=a.save_interval, resume=a.resume, ema_decay=a.ema_decay,
    )
    return args, a.check


def main(argv=None) -> int:
    args, check = parse_args(argv)
    summary = train(args)
    if summary is None:  # not global rank 0: rank 0 reports
        return 0
    loss_ratio = summary["final_lm_loss"] / summary["first_lm_loss"]
    vio_first, vio_last = summary["max_violation_first_10pct"], summary["max_violation_last_10pct"]
    loss_ok = loss_ratio < 0.6
    vio_ok = vio_first is not None and vio_last < vio_first
    print(f"LM loss: first step {summary['first_lm_loss']:.4f}, last 10% of steps {summary['final_lm_loss']:.4f} "
          f"= {100 * loss_ratio:.1f}% of the first (target < 60%): {'ok' if loss_ok else 'FAILED'}")
    if vio_first is not None:
        print(f"MaxVio: first 10% of steps {vio_first:.3f}, last 10% {vio_last:.3f} (target: lower): {'ok' if vio_ok else 'FAILED'}")
    plots = [args.run_dir / name for name in ("loss.png", "expert_load.png", "pipeline_timeline.png") if (args.run_dir / name).exists()]
    print(f"metrics: {args.run_dir / 'metrics.jsonl'}; plots: {', '.join(map(str, plots))}")
    print(json.dumps(summary))
    return 0 if not check or (loss_ok and vio_ok) else 1


if __name__ == "__main__":
    sys.exit(main())
