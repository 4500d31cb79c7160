"""overlap: DualPipe's FB overlap of the expert-parallel all-to-alls, measured on an emulated link
(report §3.2.1).

Design note
-----------
What runs. For each layout, its processes (gloo, one thread each) build the `tiny-fp8`
preset (MLA, DeepSeekMoE with 8 experts top-2, MTP, emulated block FP8, so the dispatch
travels in FP8) as DualPipeV chunks with expert parallelism, and train on the same random
micro-batches without an optimizer step (every step computes the same kind of work):
  ep2        EP = 2 on 2 processes, P = 1: the V turns on each rank, so its FB steps pair
             the rank's two chunks; 6 layers as [4, 2] (dense + 3 MoE | 2 MoE + MTP);
  ep2_pp2    EP = 2 x DualPipeV P = 2 on 4 processes; 8 layers as [3, 2, 2, 1], every
             stage with two MoE layers (the MTP block's counts on the last).
The two chunks of an FB step then have as many all-to-alls each: a hand-over finds the
other micro-batch with a segment to compute.

The link (overlap/link.py). Unless `--emulate-link GBPS,LATENCY_US` is given, it is chosen so that
a layer's all-to-all time matches its compute: on the real (unemulated) transport, each rank
times one of its MoE decoder layers alone, forward and backward on one micro-batch (wall time
minus time blocked), and counts in one sequential step the wire bytes of its MoE layers' four
all-to-alls per micro-batch (dispatch, combine and their backwards); the bandwidth is such that
those bytes / bandwidth + 4 latencies equal `--comm-compute-ratio` (1.0) times that compute,
averaged over the ranks. Both are printed.

Timing. One untimed step of each mode, then `--steps` rounds of one sequential-FB step and
one overlapped-FB step (the same model, the same micro-batches; the expert biases move
between steps as in training, and the modes alternate so that both see the same routing
drift and host load). A step's time is between barriers of all ranks. From each step's
recorded timeline (dualpipe.TimelineRecorder), over the FB actions of all ranks:
  exposed fraction = time blocked on all-to-alls / communication time of those all-to-alls
(issue to done); sequential FB exposes all of it by construction. Bytes per dispatched
token copy are measured by the link's counter on one exchange of the same rows in FP32,
BF16 and FP8. The simulator's prediction: the medians of the measured F, B (input
gradients), W, BW (full backward) and FB action times, minus their pipeline-receive waits,
as `simulate.Costs`, replayed by `simulate_schedule`, next to the measured bubble (the
largest per-rank makespan minus time in actions minus their pipeline-receive waits).

Targets (issue 13): overlapped FB's exposed communication at most 10% of its communication
time; overlapped step time at most 0.65x sequential with communication and compute matched.
The JSON says whether each layout meets them; nothing is tuned to them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time

import torch
import torch.multiprocessing as mp
from megatron.core.transformer.moe.moe_layer import MoELayer

from megatron_dsv3 import cpu
from megatron_dsv3.config import preset
from megatron_dsv3.distributed import free_port, init_distributed, local_process_env, seed_everything
from megatron_dsv3.overlap import link
from megatron_dsv3.overlap.dispatch import DISPATCH, exchange_rows
from megatron_dsv3.overlap.link import LinkSpec, link_flag
from megatron_dsv3.pipeline.dualpipe import TimelineRecorder
from megatron_dsv3.pipeline.registry import SCHEDULES
from megatron_dsv3.pipeline.simulate import Costs, simulate_schedule
from megatron_dsv3.routing import expert_load_counts, finalize_model_grads_with_load
from megatron_dsv3.training.forward_step import forward_step, random_microbatches

DUALPIPEV = SCHEDULES["dualpipev"]
EXPOSED_TARGET, RATIO_TARGET = 0.10, 0.65
EXCHANGES_PER_MOE_LAYER = 4  # dispatch and combine, forward and backward


@dataclasses.dataclass(frozen=True)
class Layout:
    processes: int
    pipeline_size: int
    expert_parallel_size: int
    num_layers: int
    layers_per_stage: tuple[int, ...]


LAYOUTS = {
    "ep2": Layout(2, 1, 2, 6, (4, 2)),
    "ep2_pp2": Layout(4, 2, 2, 8, (3, 2, 2, 1)),
}


@dataclasses.dataclass(frozen=True)
class OverlapSetup:
    """What to measure; validated on construction (ValueError with the fix)."""

    layouts: tuple[str, ...] = tuple(LAYOUTS)
    num_microbatches: int = 8
    micro_batch_size: int = 2
    seq_length: int = 64
    timed_steps: int = 3
    comm_compute_ratio: float = 1.0
    latency_us: float = 20.0
    link: LinkSpec | None = None  # None: matched to the compute (the design note)
    seed: int = 0

    def __post_init__(self):
        unknown = [name for name in self.layouts if name not in LAYOUTS]
        if unknown or not self.layouts:
            raise ValueError(f"layouts {list(self.layouts)}: choose from {sorted(LAYOUTS)}. Fix: pass --layouts ep2 ep2_pp2.")
        for name in ("num_microbatches", "micro_batch_size", "seq_length", "timed_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be at least 1. Fix: pass a positive value.")
        for name in self.layouts:
            DUALPIPEV.validate(LAYOUTS[name].pipeline_size, self.num_microbatches)
        if not self.comm_compute_ratio > 0:
            raise ValueError(f"comm_compute_ratio={self.comm_compute_ratio}: must be positive. Fix: pass e.g. 1.0.")
        if not self.latency_us >= 0:
            raise ValueError(f"latency_us={self.latency_us}: must be >= 0. Fix: pass e.g. 20.")


def run(setup: OverlapSetup) -> dict:
    """Every layout of `setup`, then the bytes per token; the benchmark's JSON object.

    keys: benchmark, setup, bytes_per_token_copy ({fp32, bf16, fp8}, hidden), layouts ({name:
    processes, P, EP, layers_per_stage, link, calibration, sequential, overlapped, step_ratio,
    exposed_target_met, ratio_target_met, bubble}), targets."""
    layouts = {}
    for name in setup.layouts:
        layout = LAYOUTS[name]
        print(f"overlap: {name}: spawning {layout.processes} gloo processes (EP={layout.expert_parallel_size}, "
              f"DualPipeV P={layout.pipeline_size}), {setup.timed_steps} timed rounds", flush=True)
        queue = mp.get_context("spawn").SimpleQueue()
        mp.spawn(_worker, args=(layout, setup, free_port(), queue), nprocs=layout.processes, join=True)
        layouts[name] = queue.get()
    payload = [row.pop("bytes_per_token_copy") for row in layouts.values()][0]  # the same rows in every layout
    return {
        "benchmark": "overlap",
        "setup": {"num_microbatches": setup.num_microbatches, "micro_batch_size": setup.micro_batch_size,
                  "seq_length": setup.seq_length, "timed_steps": setup.timed_steps,
                  "comm_compute_ratio": setup.comm_compute_ratio, "preset": "tiny-fp8", "threads_per_rank": 1},
        "bytes_per_token_copy": payload,
        "layouts": layouts,
        "targets": {"exposed_fraction_at_most": EXPOSED_TARGET, "step_ratio_at_most": RATIO_TARGET,
                    "all_met": all(r["exposed_target_met"] and r["ratio_target_met"] for r in layouts.values())},
    }


def format_table(result: dict) -> str:
    lines = ["DualPipe's FB overlap on an emulated link (tiny-fp8, DualPipeV with EP; medians of the timed steps)"]
    for name, r in result["layouts"].items():
        c = r["calibration"]
        lines += [
            f"{name}: {r['processes']} processes, EP={r['EP']} x DualPipeV P={r['P']}, layers per stage {r['layers_per_stage']}, "
            f"link {r['link']['gbps']:g} GB/s + {r['link']['latency_us']:g} us ({r['link']['chosen']})",
            f"  one MoE layer and micro-batch, forward + backward: compute {1e3 * c['compute_per_moe_layer_s']:.2f} ms, its "
            f"{EXCHANGES_PER_MOE_LAYER} all-to-alls on the link {1e3 * c['comm_per_moe_layer_s']:.2f} ms",
            f"  {'FB':>11} | {'step s':>8} | {'FB comm s':>9} {'blocked s':>9} {'exposed':>8}",
        ]
        for mode in ("sequential", "overlapped"):
            m = r[mode]
            lines.append(f"  {mode:>11} | {m['step_s']:>8.3f} | {m['fb_comm_s']:>9.3f} {m['fb_blocked_s']:>9.3f} "
                         f"{100 * m['exposed_fraction']:>7.1f}%")
        b = r["bubble"]
        lines += [
            f"  overlapped / sequential step time {r['step_ratio']:.3f} (target <= {RATIO_TARGET}: "
            f"{'met' if r['ratio_target_met'] else 'NOT met'}); overlapped exposed {100 * r['overlapped']['exposed_fraction']:.1f}% "
            f"(target <= {100 * EXPOSED_TARGET:.0f}%: {'met' if r['exposed_target_met'] else 'NOT met'})",
            f"  bubble (overlapped steps): measured {b['measured_s']:.3f} s, simulated {b['simulated_s']:.3f} s from the measured "
            f"costs F={b['costs']['F']:.3f} B={b['costs']['B']:.3f} W={b['costs']['W']:.3f} FB={b['costs']['FB']:.3f} s"
            + (f" ({b['note']})" if b.get("note") else ""),
        ]
    p = result["bytes_per_token_copy"]
    lines.append(f"bytes per dispatched token copy (hidden {p['hidden']}; token + gate weight [+ 1x128 scales]): "
                 f"FP32 {p['fp32']}, BF16 {p['bf16']}, FP8 {p['fp8']} ({p['fp8'] / p['bf16']:.3f}x BF16, {p['fp8'] / p['fp32']:.3f}x FP32)")
    return "\n".join(lines)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("overlap", help="FB overlap of the expert-parallel all-to-alls on an emulated link: "
                                                   "step time and exposed communication, sequential vs overlapped")
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), help=f"from {sorted(LAYOUTS)} (default: all)")
    parser.add_argument("--microbatches", type=int, default=8, help="micro-batches per step and replica (default: 8)")
    parser.add_argument("--micro-batch-size", type=int, default=2, help="sequences per micro-batch (default: 2)")
    parser.add_argument("--seq-length", type=int, default=64, help="tokens per sequence (default: 64)")
    parser.add_argument("--steps", type=int, default=3, help="timed rounds of one step per mode (default: 3)")
    parser.add_argument("--emulate-link", type=link_flag, default=None, metavar="GBPS,LATENCY_US",
                        help="the emulated link (default: one matched to a MoE layer's measured compute, docs/overlap.md)")
    parser.add_argument("--comm-compute-ratio", type=float, default=1.0,
                        help="without --emulate-link: all-to-all time over compute time the link is chosen for (default: 1.0)")
    parser.add_argument("--latency-us", type=float, default=20.0, help="without --emulate-link: its latency (default: 20)")
    parser.set_defaults(main=main)


def main(args: argparse.Namespace) -> int:
    try:
        setup = OverlapSetup(layouts=tuple(args.layouts), num_microbatches=args.microbatches, micro_batch_size=args.micro_batch_size,
                             seq_length=args.seq_length, timed_steps=args.steps, comm_compute_ratio=args.comm_compute_ratio,
                             latency_us=args.latency_us, link=args.emulate_link)
    except ValueError as error:
        print(f"overlap: {error}", file=sys.stderr)
        return 2
    result = run(setup)
    print(format_table(result))
    print(json.dumps(result))
    return 0


# -- in each process of a layout ---------------------------------------------------------


def _worker(rank: int, layout: Layout, setup: OverlapSetup, port: int, queue) -> None:
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    local_process_env(rank, layout.processes, port)
    torch.set_num_threads(1)
    init_distributed(layout.pipeline_size, get_embedding_ranks=DUALPIPEV.get_embedding_ranks, backend="gloo",
                     expert_model_parallel_size=layout.expert_parallel_size)
    pipeline = dict(pipeline_model_parallel_size=layout.pipeline_size, pipeline_dtype=torch.float32) if layout.pipeline_size > 1 else {}
    config = preset("tiny-fp8", num_layers=layout.num_layers, seq_length=setup.seq_length,
                    expert_model_parallel_size=layout.expert_parallel_size, **pipeline)
    config.deallocate_pipeline_outputs = True
    cpu.enable(config)
    seed_everything(setup.seed)
    pp_rank, pp_group = parallel_state.get_pipeline_model_parallel_rank(), parallel_state.get_pipeline_model_parallel_group()
    chunks = [DistributedDataParallel(config, DistributedDataParallelConfig(), chunk)
              for chunk in DUALPIPEV.build_chunks(config, pp_rank, layout.pipeline_size, list(layout.layers_per_stage))]
    config.no_sync_func = [chunk.no_sync for chunk in chunks]
    config.finalize_model_grads_func = finalize_model_grads_with_load
    batches = random_microbatches(setup.seed * 1000 + parallel_state.get_data_parallel_rank(), setup.num_microbatches,
                                  setup.micro_batch_size, setup.seq_length, config.vocab_size)  # one stream per replica

    def step(overlapped: bool) -> tuple[float, list]:
        config.fb_overlap = overlapped
        for chunk in chunks:
            chunk.zero_grad_buffer()
        recorder = TimelineRecorder()
        torch.distributed.barrier()
        start = time.perf_counter()
        DUALPIPEV.forward_backward_func(forward_step_func=forward_step, data_iterator=iter(batches), model=chunks,
                                        num_microbatches=setup.num_microbatches, seq_length=setup.seq_length,
                                        micro_batch_size=setup.micro_batch_size, timeline=recorder)
        torch.distributed.barrier()
        seconds = time.perf_counter() - start
        return seconds, recorder.timeline(pp_group).records

    say = (lambda text: print(f"overlap: {text}", flush=True)) if rank == 0 else (lambda text: None)
    step(False), step(True)  # untimed: first-call compilation, buffers
    say("warm-up done; calibrating the link")
    spec, calibration = _calibrate(setup, chunks, lambda: step(False))
    link.emulate(spec)
    say(f"link {spec.gbps:.4g} GB/s + {spec.latency_us:g} us")
    steps = {"sequential": [], "overlapped": [], "replica": parallel_state.get_data_parallel_rank()}
    for index in range(setup.timed_steps):
        for mode in ("sequential", "overlapped"):
            seconds, records = step(mode == "overlapped")
            steps[mode].append((seconds, [r for r in records if r.rank == pp_rank]))
            say(f"round {index + 1}/{setup.timed_steps} {mode}: {seconds:.3f} s")
    link.emulate(None)
    payload = _bytes_per_token_copy(parallel_state.get_expert_model_parallel_group(), config.hidden_size)
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, steps)
    if rank == 0:
        queue.put({**_summary(layout, setup, spec, calibration, gathered), "bytes_per_token_copy": payload})
    torch.distributed.destroy_process_group()


def _calibrate(setup: OverlapSetup, chunks, sequential_step) -> tuple[LinkSpec, dict]:
    """The link (the design note): a MoE layer's compute, timed alone on the real transport, and
    the wire bytes of its four all-to-alls per micro-batch in a real sequential step."""
    compute = _moe_layer_compute(chunks, setup)
    link.reset()
    sequential_step()
    exchanges = [t for label, t in link.totals().items() if label != link.P2P]
    passes = sum(t.operations for t in exchanges) / EXCHANGES_PER_MOE_LAYER  # MoE layers x micro-batches
    mean = torch.tensor([compute, sum(t.wire_bytes for t in exchanges) / passes], dtype=torch.float64)
    torch.distributed.all_reduce(mean)
    compute, wire_bytes = (mean / torch.distributed.get_world_size()).tolist()
    if setup.link is not None:
        spec, chosen = setup.link, "given"
    else:
        budget = setup.comm_compute_ratio * compute - EXCHANGES_PER_MOE_LAYER * setup.latency_us * 1e-6
        if budget <= 0:
            raise ValueError(f"latency {setup.latency_us} us x {EXCHANGES_PER_MOE_LAYER} all-to-alls already exceeds a MoE "
                             f"layer's compute ({1e3 * compute:.2f} ms). Fix: pass a smaller --latency-us or a larger "
                             "--comm-compute-ratio.")
        spec, chosen = LinkSpec(wire_bytes / budget / 1e9, setup.latency_us), f"matched: comm / compute = {setup.comm_compute_ratio:g}"
    return spec, {
        "chosen": chosen, "compute_per_moe_layer_s": compute, "wire_bytes_per_moe_layer": wire_bytes,
        "comm_per_moe_layer_s": spec.transfer_s(wire_bytes) + EXCHANGES_PER_MOE_LAYER * spec.latency_us * 1e-6,
    }


def _moe_layer_compute(chunks, setup: OverlapSetup, repeats: int = 3) -> float:
    """One MoE decoder layer of this rank, forward and backward on a micro-batch of hidden
    states: the median wall time minus the time blocked on its all-to-alls. The layer's
    gradients and token counts are cleared after."""
    layer = next(layer for chunk in chunks for layer in chunk.module.decoder.layers if isinstance(layer.mlp, MoELayer))
    runs = []
    for _ in range(repeats):
        hidden = torch.randn(setup.seq_length, setup.micro_batch_size, layer.config.hidden_size, requires_grad=True)
        link.reset()
        torch.distributed.barrier()
        start = time.perf_counter()
        output = layer(hidden_states=hidden, attention_mask=None)[0]
        output.backward(torch.ones_like(output))
        seconds = time.perf_counter() - start
        runs.append(seconds - sum(t.blocked_s for label, t in link.totals().items() if label != link.P2P))
    for chunk in chunks:
        chunk.zero_grad_buffer()
        for counts in expert_load_counts(chunk.module):
            counts.zero_()
    return statistics.median(runs)


def _summary(layout: Layout, setup: OverlapSetup, spec: LinkSpec, calibration: dict, gathered: list[dict]) -> dict:
    """The layout's JSON row from every rank's timed steps."""
    modes = {}
    for mode in ("sequential", "overlapped"):
        step_s = [max(rank[mode][index][0] for rank in gathered) for index in range(setup.timed_steps)]
        fb = [r for rank in gathered for _, records in rank[mode] for r in records if r.action.kind == "FB"]
        comm, blocked = sum(r.a2a_comm for r in fb), sum(r.a2a_blocked for r in fb)
        modes[mode] = {"step_s": statistics.median(step_s), "steps_s": step_s, "fb_comm_s": comm / setup.timed_steps,
                       "fb_blocked_s": blocked / setup.timed_steps, "exposed_fraction": blocked / comm if comm else 0.0}
    ratio = modes["overlapped"]["step_s"] / modes["sequential"]["step_s"]
    return {
        "processes": layout.processes, "P": layout.pipeline_size, "EP": layout.expert_parallel_size,
        "layers_per_stage": list(layout.layers_per_stage),
        "link": {"gbps": spec.gbps, "latency_us": spec.latency_us, "chosen": calibration["chosen"]},
        "calibration": calibration, **modes, "step_ratio": ratio,
        "exposed_target_met": modes["overlapped"]["exposed_fraction"] <= EXPOSED_TARGET, "ratio_target_met": ratio <= RATIO_TARGET,
        "bubble": _bubble(layout, setup, gathered),
    }


def _bubble(layout: Layout, setup: OverlapSetup, gathered: list[dict]) -> dict:
    """Measured bubble of the overlapped steps next to the simulator's for their measured costs."""
    records = [(index, r) for rank in gathered if rank["replica"] == 0  # one data-parallel replica's pipeline
               for index, (_, step_records) in enumerate(rank["overlapped"]) for r in step_records]

    def median_of(kind):
        times = [r.end - r.start - r.p2p_blocked for _, r in records if r.action.kind == kind]
        return statistics.median(times) if times else None

    f, b, w, bw, fb = (median_of(kind) for kind in ("F", "B", "W", "BW", "FB"))
    full_backward = bw if bw is not None else b + w
    weight = w if w is not None else 0.0
    measured = []
    for index in range(setup.timed_steps):
        step = [r for i, r in records if i == index]
        makespan = max(r.end for r in step) - min(r.start for r in step)
        measured.append(max(makespan - sum(r.end - r.start - r.p2p_blocked for r in step if r.rank == rank)
                            for rank in range(layout.pipeline_size)))
    note = ""
    fb_cost = fb if fb is not None else f + full_backward
    if not max(f, full_backward) <= fb_cost <= f + full_backward:
        note = f"measured FB {fb_cost:.3f} s outside [max(F, B), F + B]: simulated with the nearer bound"
        fb_cost = min(max(fb_cost, max(f, full_backward)), f + full_backward)
    costs = Costs(F=f, B=full_backward, W=min(weight, full_backward), FB=fb_cost)
    simulated = simulate_schedule(DUALPIPEV, layout.pipeline_size, setup.num_microbatches, costs)
    return {"measured_s": statistics.median(measured), "simulated_s": simulated.bubble(),
            "simulated_makespan_s": simulated.makespan(), "costs": dataclasses.asdict(costs), "note": note}


def _bytes_per_token_copy(group, hidden: int) -> dict:
    """Bytes per dispatched token copy: one exchange of the same rows over the expert-parallel
    group (two ranks) in FP32, BF16 and FP8, counted by the link."""
    sizes = {}
    for name, dtype, fp8 in (("fp32", torch.float32, False), ("bf16", torch.bfloat16, False), ("fp8", torch.float32, True)):
        link.reset()
        rows, probs = torch.randn(16, hidden).to(dtype), torch.rand(16)
        exchange_rows(group, [8, 8], [8, 8], rows, probs, label=DISPATCH, fp8=(fp8, False))
        sent = link.totals()[DISPATCH]
        sizes[name] = sent.bytes_sent // sent.rows_sent
    return {**sizes, "hidden": hidden}
