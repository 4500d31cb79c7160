"""pipeline: simulated bubble and activations of 1F1B, ZB1P, DualPipe and DualPipeV (report §3.2.1).

For each number of pipeline ranks P it builds each schedule's order on P ranks
(`megatron_dsv3.pipeline.schedule`), replays it with the given per-stage costs
(`megatron_dsv3.pipeline.simulate`, P2P free) and sets the result next to the paper's table:
  bubble        the largest idle time of a rank in one global batch, vs the formula
                (1F1B (P-1)(F+B), ZB1P (P-1)(F+B-2W), DualPipe (P/2-1)(F&B+B-3W),
                DualPipeV (P-1)(F&B+B-3W) with F, B, W those of one half-size stage);
  activations   the peak (chunk, micro-batch) activations held by a rank, vs the table's
                bound (P; P; P+1; 2P+1 half-size chunks = P + 1/2 full-size stages);
  parameters    per rank, relative to a 1F1B rank of the same model on P ranks.
Costs are those of one stage: F forward, B full backward, W backward for weights, FB a
forward and a full backward overlapped. `formula_holds` says whether the costs are where
the formula is exact (simulate.py's docstring); `agree` whether the replay gives it.

With --peers it also measures, on P gloo processes of this host, the step time of our
DualPipeV executor, torch.distributed.pipelining's ScheduleDualPipeV and its Schedule1F1B
on the same model, weights and data (pipeline_peers.py), and their first-step losses; next
to each, the step and bubble the simulator predicts from the action costs measured in the
same run. --peers-size wide makes the step compute-bound; --peers-profile N adds where each
schedule's host time goes.

The last line of output is one JSON object (see `run`; with --peers it has a "peers" key,
see `pipeline_peers.run_peers`).
"""

from __future__ import annotations

import argparse
import json
import math
import sys

from megatron_dsv3.bench.pipeline_peers import SIZES, PeersSetup, format_peers, run_peers
from megatron_dsv3.pipeline.registry import SCHEDULES
from megatron_dsv3.pipeline.simulate import Costs, simulate_schedule

DEFAULT_PP = (4, 8, 16)


def default_microbatches(num_ranks: int) -> int:
    """4P: enough for every schedule (DualPipeV needs 2P-1, DualPipe an even 2P-2)."""
    return 4 * num_ranks


def measure(name: str, num_ranks: int, num_microbatches: int, costs: Costs) -> dict:
    spec = SCHEDULES[name]
    timeline = simulate_schedule(spec, num_ranks, num_microbatches, costs)
    bubble, formula = timeline.bubble(), spec.bubble_formula(num_ranks, costs)
    peak, bound = timeline.activation_peak(), spec.activation_bound(num_ranks)
    return {
        "schedule": name,
        "P": num_ranks,
        "microbatches": num_microbatches,
        "makespan": timeline.makespan(),
        "bubble": bubble,
        "bubble_fraction": bubble / timeline.makespan(),
        "formula_bubble": formula,
        "agree": math.isclose(bubble, formula, abs_tol=1e-9),
        "formula_holds": spec.formula_holds(num_ranks, num_microbatches, costs),
        "activation_peak": peak,
        "activation_bound": bound,
        "activations_within_bound": peak <= bound,
        "activation_peak_1f1b_stages": peak * timeline.placement.activation_unit,
        "parameter_multiplier": timeline.placement.parameter_multiplier,
    }


def run(costs: Costs, pps=DEFAULT_PP, microbatches: int | None = None) -> dict:
    """The benchmark's JSON object.

    keys: benchmark, costs (F, B, W, FB), rows (one dict per P and schedule: schedule, P,
    microbatches, makespan, bubble, bubble_fraction, formula_bubble, agree, formula_holds, activation_peak,
    activation_bound, activations_within_bound, activation_peak_1f1b_stages,
    parameter_multiplier), agree_where_formula_holds, activations_within_bound.
    Raises ValueError (with the rule) for a P or micro-batch count a schedule cannot run."""
    if microbatches is not None and microbatches < 1:
        raise ValueError(f"microbatches={microbatches}: a step needs at least one micro-batch. Fix: pass --microbatches >= 1, "
                         "or leave it out for 4P")
    rows = [
        measure(name, p, microbatches or default_microbatches(p), costs)
        for p in pps
        for name in SCHEDULES
    ]
    return {
        "benchmark": "pipeline",
        "costs": {"F": costs.F, "B": costs.B, "W": costs.W, "FB": costs.FB},
        "rows": rows,
        "agree_where_formula_holds": all(row["agree"] for row in rows if row["formula_holds"]),
        "activations_within_bound": all(row["activations_within_bound"] for row in rows),
    }


def format_table(result: dict) -> str:
    c = result["costs"]
    lines = [
        f"Pipeline schedules, simulated (P2P free), costs per stage F={c['F']:g} B={c['B']:g} W={c['W']:g} F&B={c['FB']:g}",
        f"{'schedule':>9} {'P':>3} {'M':>4} | {'bubble':>8} {'formula':>8} {'agree':>5} {'holds':>5} {'bubble%':>7} | "
        f"{'act peak':>8} {'bound':>5} {'1F1B st':>7} | {'params':>6} {'makespan':>9}",
    ]
    for row in result["rows"]:
        lines.append(
            f"{row['schedule']:>9} {row['P']:>3} {row['microbatches']:>4} | {row['bubble']:>8g} {row['formula_bubble']:>8g} "
            f"{'yes' if row['agree'] else 'NO':>5} {'yes' if row['formula_holds'] else 'no':>5} "
            f"{100 * row['bubble_fraction']:>6.1f}% | "
            f"{row['activation_peak']:>8} {row['activation_bound']:>5} {row['activation_peak_1f1b_stages']:>7g} | "
            f"{row['parameter_multiplier']:>5g}x {row['makespan']:>9g}"
        )
    lines += [
        "holds: the costs are where the paper's formula is exact; bubble%: bubble / makespan",
        "act peak: chunk activations per rank; 1F1B st: the same in 1F1B stages (DualPipeV's chunks are half-size)",
        "costs are per stage of each schedule: DualPipeV's 2P stages are half the others' P, so compare bubble%",
    ]
    verdict = "yes" if result["agree_where_formula_holds"] else "NO"
    lines.append(f"simulated bubble equals the formula wherever it holds: {verdict}; "
                 f"activations within the paper's bound: {'yes' if result['activations_within_bound'] else 'NO'}")
    return "\n".join(lines)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("pipeline", help="simulated bubble and activations of 1F1B, ZB1P, DualPipe, DualPipeV; --peers: measured step times")
    parser.add_argument("--F", type=float, default=1.0, help="forward time of one stage")
    parser.add_argument("--B", type=float, default=2.0, help="full backward time (input and weight gradients)")
    parser.add_argument("--W", type=float, default=1.0, help="backward-for-weights time")
    parser.add_argument("--FB", type=float, default=2.5, help="time of one forward and one full backward overlapped (F&B)")
    parser.add_argument("--pp", type=int, nargs="+", default=list(DEFAULT_PP), help="pipeline ranks P (default: 4 8 16)")
    parser.add_argument("--microbatches", type=int, help="micro-batches per global batch (default: 4P)")
    peers = parser.add_argument_group("measured (--peers): ours and torch's DualPipeV, torch's 1F1B, on P CPU processes")
    peers.add_argument("--peers", action="store_true", help="also measure the step time of the three schedules")
    peers.add_argument("--peers-pp", type=int, default=2, help="pipeline ranks P, one process each (default: 2)")
    peers.add_argument("--peers-microbatches", type=int, help="micro-batches per global batch (default: 4P)")
    peers.add_argument("--peers-warmup", type=int, default=2, help="untimed rounds (one step of each schedule) first (default: 2)")
    peers.add_argument("--peers-steps", type=int, default=5, help="timed steps of each schedule (default: 5)")
    peers.add_argument("--peers-size", choices=sorted(SIZES), default="tiny",
                       help="layer widths: tiny (overhead-bound, default) or wide (compute-bound: a step of seconds)")
    peers.add_argument("--peers-cost-steps", type=int, default=3,
                       help="recorded steps of ours whose action times give the simulator's costs (default: 3)")
    peers.add_argument("--peers-profile", type=int, default=0, metavar="N",
                       help="also profile N steps of each schedule (cProfile): host time by category, overhead per action")
    parser.set_defaults(main=main)


def main(args: argparse.Namespace) -> int:
    try:
        result = run(Costs(F=args.F, B=args.B, W=args.W, FB=args.FB), pps=args.pp, microbatches=args.microbatches)
        peers = PeersSetup(
            num_ranks=args.peers_pp, num_microbatches=args.peers_microbatches or default_microbatches(args.peers_pp),
            warmup_steps=args.peers_warmup, timed_steps=args.peers_steps, size=args.peers_size,
            cost_steps=args.peers_cost_steps, profile_steps=args.peers_profile,
        ) if args.peers else None
    except ValueError as error:
        print(f"pipeline: {error}", file=sys.stderr)
        return 2
    print(format_table(result))
    if peers is not None:
        result["peers"] = run_peers(peers)
        print(format_peers(result["peers"]))
    print(json.dumps(result))
    return 0
