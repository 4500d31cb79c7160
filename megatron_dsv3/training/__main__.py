"""`python -m megatron_dsv3.training`: train a preset with the compact loop (the demo's entry point).

One process, or several under torchrun, e.g. DualPipeV on 2 CPU processes:
    torchrun --nproc-per-node 2 -m megatron_dsv3.training --pipeline-schedule dualpipev --pp 2
Every option is a field of `TrainArgs` (training/loop.py), with its help there.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import types
import typing
from pathlib import Path

from megatron_dsv3.training.loop import TrainArgs, train


def _argparse_settings(field: dataclasses.Field, annotation) -> tuple[str, dict]:
    """The option of a TrainArgs field: its flag, and argparse's settings from the field's type
    and default, then the field's own `cli` metadata."""
    cli = dict(field.metadata["cli"])
    flag = cli.pop("flag", "--" + field.name.replace("_", "-"))
    settings = {"dest": field.name, "help": field.metadata["help"]}
    if annotation is bool:
        if field.default:
            flag, settings["help"] = "--no-" + flag.removeprefix("--"), "no " + settings["help"]
        settings["action"] = "store_false" if field.default else "store_true"
    elif "type" in cli:  # the field says how its option parses (--set)
        pass
    elif typing.get_origin(annotation) is tuple:
        settings.update(nargs=len(typing.get_args(annotation)), type=typing.get_args(annotation)[0])
    elif annotation in (int, float, str, Path):
        settings["type"] = annotation
    elif typing.get_origin(annotation) is types.UnionType and type(None) in typing.get_args(annotation):  # X | None
        inner = next(arg for arg in typing.get_args(annotation) if arg is not type(None))
        if typing.get_origin(inner) is list:
            settings.update(type=json.loads, metavar="JSON")
        else:
            settings["type"] = inner
    else:
        raise TypeError(f"TrainArgs.{field.name}: no command-line form for {annotation}. Fix: give it cli settings (type=...).")
    settings.update(cli)
    if settings.get("action") != "append":
        settings["default"] = field.default
    if "action" not in settings:  # an option with a value
        settings["help"] += " (default: %(default)s)"
    return flag, settings


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m megatron_dsv3.training", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    annotations = typing.get_type_hints(TrainArgs)
    for field in dataclasses.fields(TrainArgs):
        flag, settings = _argparse_settings(field, annotations[field.name])
        parser.add_argument(flag, **settings)
    parser.add_argument("--check", action="store_true",
                        help="exit 1 unless the final LM loss is below 60%% of the first and MaxVio fell")
    return parser


def parse_args(argv=None) -> tuple[TrainArgs, bool]:
    namespace = vars(build_parser().parse_args(argv))
    check = namespace.pop("check")
    namespace["overrides"] = dict(namespace["overrides"] or [])
    namespace["adam_betas"] = tuple(namespace["adam_betas"])
    return TrainArgs(**namespace), check


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
    if "final_val_ppl" in summary:  # --eval-interval
        ema = (f"; EMA weights: LM loss {summary['final_ema_val_lm_loss']:.4f}, perplexity {summary['final_ema_val_ppl']:.3f}"
               if "final_ema_val_ppl" in summary else "")
        print(f"validation after step {summary['final_val_step']}: LM loss {summary['final_val_lm_loss']:.4f}, "
              f"perplexity {summary['final_val_ppl']:.3f}{ema}")
    plots = [args.run_dir / name for name in ("loss.png", "expert_load.png", "pipeline_timeline.png") if (args.run_dir / name).exists()]
    print(f"metrics: {args.run_dir / 'metrics.jsonl'}; plots: {', '.join(map(str, plots))}")
    print(json.dumps(summary))
    return 0 if not check or (loss_ok and vio_ok) else 1


if __name__ == "__main__":
    sys.exit(main())
