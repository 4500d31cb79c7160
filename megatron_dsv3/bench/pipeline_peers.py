"""pipeline --peers: measured step time of three pipeline schedules on P CPU processes.

Design note
-----------
What runs. P processes (gloo, one thread each: they share the host's cores) build the
`tiny` preset without MTP, 2P decoder layers (one per DualPipeV stage), at the widths of
`--peers-size` (`SIZES`: tiny's own, where a step of tenths of a second is decided by the
host cost of each action and P2P; or `wide`, where the GEMMs decide and a step takes about a
second on 2 processes), and time one global batch of M micro-batches (forward + backward, no
optimizer step) under
  ours_dualpipev    the registry's DualPipeV executor over `layout.dualpipev_chunks` (2P stages
                    in a V: rank r holds stages r and 2P-1-r);
  torch_dualpipev   torch.distributed.pipelining's `ScheduleDualPipeV`, the same 2P stages
                    on the same ranks;
  torch_1f1b        torch's `Schedule1F1B`, P stages: rank r holds stages 2r and 2r+1 of
                    the same split, run one after the other.
Every stage is a chunk built by `dualpipev_chunks` from the same seed, so all three start
from the weights of one single-process model, and all read the same M micro-batches.
MTP is off: the MTP block (with the head, last stage) uses the embedding of the first
stage. Our DualPipeV shares that module on rank 0 (layout.py); in torch's 1F1B the two
stages are on different ranks, and torch's stages have no way to share a module.

Torch's stages. `_TorchStage` wraps one or two chunks as an nn.Module with one tensor in
and one out: token ids [b, s] -> hidden [s, b, h] (the stage with the embedding), hidden ->
hidden (Megatron's `set_input_tensor`: a GPTModel without `pre_process` ignores
`decoder_input=` and reads the tensor set on its decoder), and -> logits [b, s, V] (the
stage with the head; GPTModel returns logits when given no labels). torch's loss_fn is the
mean token cross-entropy of a micro-batch, what Megatron's loss (loss_mask all ones)
computes; torch then divides the gradients by M (`scale_grads`), Megatron divides each
micro-batch's loss by M. Megatron's forward_step also sets the MoE auxiliary-loss gradient
scale to 1/M, a process-wide setting; torch's runs set it back to 1, so the three produce
the same gradients, not just the same losses.

Timing. Each step starts and ends with a barrier of the pipeline group; its wall time is
the global batch's. The schedules take turns, one step each per round, so that a change in
the host's load falls on all three alike. The first `warmup_steps` rounds (at least one)
are not timed: in the first, Megatron's fused router functions are compiled (torch.compile,
once per process: whichever schedule runs first pays, seconds) and torch sets up its
stages' P2P. No optimizer runs, so every step computes the same thing; the first step's
loss (mean over tokens of the M micro-batches) and total gradient norm are reported per
schedule with their relative difference to ours. Gradients live in `param.grad` (no DDP for
any schedule) and are cleared before each step.

Prediction. After the timed rounds, `cost_steps` steps of ours run with the timeline
recorder on; each (rank, kind, chunk)'s median compute time (wall less time blocked) are
the costs (`simulate.MeasuredCosts`) with which the simulator replays each schedule's order,
P2P free: ours' and torch's DualPipeV (one order), and 1F1B with stage r = DualPipeV's
stages 2r and 2r+1 back to back. Each schedule's measured median is set against its
predicted step (`measured_over_predicted`), with the predicted bubble and ours' recorded
one (both the idlest rank's). The costs are ours: torch's DualPipeV runs the same order with
its own actions and P2P, so its ratio says how much dearer those are (the profile says where:
its model time, which includes the autograd work of its W split, and its waits). The 1F1B
prediction sums two stages' measured actions per 1F1B action, with their per-action overheads
and, where a stage ran no full backward, its B + W: a little high (`_predict`).

Profile (`profile_steps` > 0). Then that many steps of each schedule run under cProfile,
and each function's self time is put in a category (`_category`): the schedule's own Python,
issuing and waiting for communication, this harness, and the model. cProfile adds a cost to
every Python call, to all schedules alike, so the figures compare schedules, not absolute
costs. Overhead per action: (schedule + comm_issue) per step over the rank's actions.
"""

from __future__ import annotations

import contextlib
import cProfile
import dataclasses
import pstats
import statistics
import time
from typing import Callable

import torch
import torch.multiprocessing as mp
from megatron.core import parallel_state
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleDualPipeV

from megatron_dsv3 import cpu
from megatron_dsv3.config import preset
from megatron_dsv3.distributed import free_port, init_distributed, local_process_env, seed_everything
from megatron_dsv3.pipeline.dualpipe import TimelineRecorder
from megatron_dsv3.pipeline.registry import SCHEDULES
from megatron_dsv3.pipeline.simulate import MeasuredCosts, Timeline, simulate_schedule
from megatron_dsv3.training.forward_step import forward_step, random_microbatches

DUALPIPEV = SCHEDULES["dualpipev"]

SCHEDULE_NAMES = ("ours_dualpipev", "torch_dualpipev", "torch_1f1b")
# --peers-size: the `tiny` preset's widths (a step of tenths of a second, decided by the host
# cost of each action), or widened until the GEMMs decide (a step of seconds on 2 CPU processes).
SIZES = {
    "tiny": {},
    "wide": dict(hidden_size=640, ffn_hidden_size=1920, num_attention_heads=8, q_lora_rank=480, kv_lora_rank=320,
                 qk_head_dim=64, qk_pos_emb_head_dim=32, v_head_dim=64, moe_ffn_hidden_size=480,
                 moe_shared_expert_intermediate_size=480),
}


@dataclasses.dataclass(frozen=True)
class PeersSetup:
    """What to measure: P ranks, M micro-batches of micro_batch_size x seq_length tokens,
    warm-up and timed rounds; validated on construction (ValueError with the fix)."""

    num_ranks: int = 2
    num_microbatches: int = 8
    micro_batch_size: int = 2
    seq_length: int = 64
    warmup_steps: int = 2
    timed_steps: int = 5
    seed: int = 0
    size: str = "tiny"
    cost_steps: int = 3
    profile_steps: int = 0

    def __post_init__(self):
        if self.size not in SIZES:
            raise ValueError(f"size={self.size!r}: not one of {sorted(SIZES)}. Fix: pass --peers-size tiny (overhead-bound) "
                             "or wide (compute-bound).")
        if self.num_ranks < 2:
            raise ValueError(f"num_ranks={self.num_ranks}: a pipeline needs at least 2 ranks. Fix: pass --peers-pp 2 or more.")
        if self.num_microbatches < 2 * self.num_ranks:
            raise ValueError(
                f"num_microbatches={self.num_microbatches}: torch's ScheduleDualPipeV needs at least one per stage "
                f"(2P = {2 * self.num_ranks}). Fix: pass --peers-microbatches {2 * self.num_ranks} or more."
            )
        for name in ("micro_batch_size", "seq_length", "timed_steps", "cost_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be at least 1. Fix: pass a positive value.")
        if self.warmup_steps < 1:
            raise ValueError(
                f"warmup_steps={self.warmup_steps}: the first round compiles Megatron's fused functions and sets up "
                "torch's stages, seconds that are no step's. Fix: pass --peers-warmup 1 or more."
            )

        if self.profile_steps < 0:
            raise ValueError(f"profile_steps={self.profile_steps}: must be 0 (no profile) or more. Fix: pass --peers-profile N >= 0.")

    @property
    def num_layers(self) -> int:
        return 2 * self.num_ranks  # one decoder layer per DualPipeV stage


def run_peers(setup: PeersSetup) -> dict:
    """Spawn the P processes, time the three schedules; the "peers" JSON object.

    keys: P, microbatches, micro_batch_size, seq_length, num_layers, size, model (the widths),
    warmup_steps, timed_steps, cost_steps, threads_per_rank, stage_costs_s, schedules ({name:
    mean_step_s, median_step_s, step_s, first_step_loss, first_step_grad_norm,
    loss_rel_diff_vs_ours, grad_norm_rel_diff_vs_ours, predicted_step_s, predicted_bubble_s,
    measured_over_predicted; ours also recorded_bubble_s}), and with profile_steps a profile
    ({name: {ranks: per rank {actions, ms_per_step by category, overhead_ms_per_action},
    overhead_ms_per_action}})."""
    port = free_port()
    queue = mp.get_context("spawn").SimpleQueue()
    print(f"peers: spawning {setup.num_ranks} gloo processes ({setup.size} widths); each builds the three schedules, then runs "
          f"{setup.warmup_steps} warm-up and {setup.timed_steps} timed rounds of one step each, {setup.cost_steps} recorded "
          f"steps of ours for the costs" + (f", {setup.profile_steps} profiled steps of each" if setup.profile_steps else ""),
          flush=True)
    mp.spawn(_worker, args=(setup, port, queue), nprocs=setup.num_ranks, join=True)
    measured = queue.get()
    schedules = measured["schedules"]
    ours = schedules["ours_dualpipev"]
    for row in schedules.values():
        row["loss_rel_diff_vs_ours"] = abs(row["first_step_loss"] - ours["first_step_loss"]) / abs(ours["first_step_loss"])
        row["grad_norm_rel_diff_vs_ours"] = abs(row["first_step_grad_norm"] - ours["first_step_grad_norm"]) / ours["first_step_grad_norm"]
    stage_costs = _predict(measured["timelines"], schedules, setup)
    result = {
        "P": setup.num_ranks,
        "microbatches": setup.num_microbatches,
        "micro_batch_size": setup.micro_batch_size,
        "seq_length": setup.seq_length,
        "num_layers": setup.num_layers,
        "size": setup.size,
        "model": measured["model"],
        "warmup_steps": setup.warmup_steps,
        "timed_steps": setup.timed_steps,
        "cost_steps": setup.cost_steps,
        "threads_per_rank": 1,
        "stage_costs_s": stage_costs,
        "schedules": schedules,
    }
    if "profile" in measured:
        result["profile_steps"] = setup.profile_steps
        result["profile"] = measured["profile"]
    return result


def _predict(timelines: list[Timeline], schedules: dict, setup: PeersSetup) -> list[dict]:
    """Each schedule's step replayed (simulate.py) with the costs measured in our recorded steps,
    next to its measured median (in `schedules`, in place); returns the per-stage costs.

    Ours and torch's DualPipeV run the same order on the same chunks: one prediction. torch's
    1F1B stage r is DualPipeV's stages 2r and 2r+1 run one after the other: its F and full
    backward are their sums, a stage's full backward its measured BW where the order has one,
    else its B + W (which costs a little more: the W split's own work). Each summed action
    also brings its own per-action overhead, so this prediction is a little high."""
    costs = MeasuredCosts.from_timelines(timelines)
    placement = timelines[0].placement
    holder = {stage: (rank, chunk) for rank, chunks in enumerate(placement.stage_of) for chunk, (_, stage) in enumerate(chunks)}

    def of(kind: str, stage: int) -> float:
        rank, chunk = holder[stage]
        return costs.of(rank, kind, chunk)

    stage_costs = [{"stage": stage, "rank": holder[stage][0], "F": of("F", stage), "B": of("B", stage), "W": of("W", stage),
                    "FB": of("FB", stage)} for stage in range(placement.num_stages)]
    def full_backward(stage: int) -> float:
        rank, chunk = holder[stage]
        return costs.seconds.get((rank, "BW", chunk)) or of("B", stage) + of("W", stage)

    halves = {rank: (2 * rank, 2 * rank + 1) for rank in range(setup.num_ranks)}
    one_f_one_b = MeasuredCosts({
        **{(rank, "F", 0): sum(of("F", stage) for stage in stages) for rank, stages in halves.items()},
        **{(rank, "BW", 0): sum(full_backward(stage) for stage in stages) for rank, stages in halves.items()},
    })
    replays = {
        "dualpipev": simulate_schedule(DUALPIPEV, setup.num_ranks, setup.num_microbatches, costs),
        "1f1b": simulate_schedule(SCHEDULES["1f1b"], setup.num_ranks, setup.num_microbatches, one_f_one_b),
    }
    for name, row in schedules.items():
        replay = replays["1f1b" if name == "torch_1f1b" else "dualpipev"]
        row["predicted_step_s"] = replay.makespan()
        row["predicted_bubble_s"] = replay.bubble()
        row["measured_over_predicted"] = row["median_step_s"] / replay.makespan()
    schedules["ours_dualpipev"]["recorded_bubble_s"] = statistics.median(t.bubble() for t in timelines)
    return stage_costs


def format_peers(peers: dict) -> str:
    model = peers["model"]
    lines = [
        f"Pipeline schedules, measured: P={peers['P']} gloo processes (1 thread each), tiny preset without MTP at "
        f"{peers['size']} widths (hidden {model['hidden_size']}, ffn {model['ffn_hidden_size']}, experts' ffn "
        f"{model['moe_ffn_hidden_size']}), {peers['num_layers']} layers, M={peers['microbatches']} micro-batches of "
        f"{peers['micro_batch_size']}x{peers['seq_length']} tokens, {peers['timed_steps']} steps each after "
        f"{peers['warmup_steps']} warm-up, in turns",
        f"{'schedule':>16} | {'mean s':>8} {'median s':>8} | {'predicted':>9} {'meas/pred':>9} {'bubble':>8} | "
        f"{'first loss':>10} {'rel diff':>8} | {'grad norm':>10} {'rel diff':>8}",
    ]
    for name, row in peers["schedules"].items():
        lines.append(
            f"{name:>16} | {row['mean_step_s']:>8.4f} {row['median_step_s']:>8.4f} | {row['predicted_step_s']:>9.4f} "
            f"{row['measured_over_predicted']:>9.3f} {row['predicted_bubble_s']:>8.4f} | "
            f"{row['first_step_loss']:>10.6f} {row['loss_rel_diff_vs_ours']:>8.1e} | "
            f"{row['first_step_grad_norm']:>10.6f} {row['grad_norm_rel_diff_vs_ours']:>8.1e}"
        )
    ours = peers["schedules"]["ours_dualpipev"]
    lines += [
        "rel diff: relative to ours_dualpipev (same weights, same data: they compute the same model)",
        f"predicted: the simulator's step (P2P free) and bubble from the costs of {peers['cost_steps']} recorded steps of ours "
        f"(below); ours' recorded bubble {ours['recorded_bubble_s']:.4f} s",
        f"measured costs per DualPipeV stage, s (FB: this stage's forward with its rank's other chunk's full backward):",
        "  " + "  ".join(f"stage {c['stage']} (rank {c['rank']}): F {c['F']:.4f} B {c['B']:.4f} W {c['W']:.4f} FB {c['FB']:.4f}"
                         for c in peers["stage_costs_s"]),
    ]
    for name, profile in peers.get("profile", {}).items():
        for rank, row in enumerate(profile["ranks"]):
            ms = row["ms_per_step"]
            lines.append(f"profile {name:>16} rank {rank}: {row['actions']} actions, ms per step " +
                         " ".join(f"{k} {v:.2f}" for k, v in ms.items()) + f"; overhead per action {row['overhead_ms_per_action']:.3f} ms")
        lines.append(f"profile {name:>16} all ranks: overhead per action {profile['overhead_ms_per_action']:.3f} ms")
    if "profile" in peers:
        lines.append(f"profile: cProfile self time over {peers['profile_steps']} steps of each (it slows Python calls, all alike); "
                     "overhead per action = (schedule + comm_issue) / actions")
    return "\n".join(lines)


# -- in each of the P processes ----------------------------------------------------------


def _worker(rank: int, setup: PeersSetup, port: int, queue) -> None:
    local_process_env(rank, setup.num_ranks, port)
    torch.set_num_threads(1)
    init_distributed(setup.num_ranks, get_embedding_ranks=DUALPIPEV.get_embedding_ranks, backend="gloo")
    config = preset(
        "tiny", **SIZES[setup.size], num_layers=setup.num_layers, seq_length=setup.seq_length, mtp_num_layers=None,
        pipeline_model_parallel_size=setup.num_ranks, pipeline_dtype=torch.float32,
    )
    cpu.enable(config)
    microbatches = random_microbatches(setup.seed, setup.num_microbatches, setup.micro_batch_size, setup.seq_length,
                                       config.vocab_size)
    group = parallel_state.get_pipeline_model_parallel_group()
    builders = {"ours_dualpipev": _ours_dualpipev, "torch_dualpipev": _torch_dualpipev, "torch_1f1b": _torch_1f1b}
    schedules = {name: builders[name](config, rank, setup, microbatches, group) for name in SCHEDULE_NAMES}
    results = {"schedules": _measure(schedules, setup, group, rank),
               "timelines": _recorded_steps(schedules["ours_dualpipev"], setup, group),
               "model": {name: getattr(config, name) for name in ("hidden_size", "ffn_hidden_size", "moe_ffn_hidden_size")}}
    if setup.profile_steps:
        results["profile"] = _profile(schedules, setup, group)
    if rank == 0:
        queue.put(results)
    torch.distributed.destroy_process_group()


@dataclasses.dataclass
class _Schedule:
    """One schedule on this rank: `step()` runs a global batch and returns its mean loss on
    the rank that computes the loss, else None; `modules` hold this rank's parameters."""

    step: Callable[..., float | None]
    modules: list[torch.nn.Module]

    def timed_step(self, group, profiler: cProfile.Profile | None = None, **step_kwargs) -> tuple[float, float | None]:
        """(wall seconds of one step, between barriers of the pipeline group; its loss), under
        `profiler` if given."""
        for module in self.modules:
            module.zero_grad(set_to_none=True)
        torch.distributed.barrier(group)
        start = time.perf_counter()
        with profiler or contextlib.nullcontext():
            loss = self.step(**step_kwargs)
        torch.distributed.barrier(group)
        return time.perf_counter() - start, loss


def _measure(schedules: dict[str, _Schedule], setup: PeersSetup, group, rank: int) -> dict:
    """Rounds of one step of each schedule in turn, so that a change in the host's load
    falls on all of them alike; the first `warmup_steps` rounds are not timed. One row per
    schedule: mean_step_s, median_step_s, step_s, first_step_loss, first_step_grad_norm."""
    rows = {name: {"step_s": []} for name in schedules}
    num_rounds = setup.warmup_steps + setup.timed_steps
    for index in range(num_rounds):
        warmup = index < setup.warmup_steps
        for name, schedule in schedules.items():
            seconds, loss = schedule.timed_step(group)
            if index == 0:
                rows[name]["first_step_loss"] = _from_any_rank(loss, group)
                rows[name]["first_step_grad_norm"] = _grad_norm(schedule.modules, group)
            if not warmup:
                rows[name]["step_s"].append(seconds)
            if rank == 0:
                print(f"peers: round {index + 1}/{num_rounds} ({'warm-up' if warmup else 'timed'}) {name}: {seconds:.4f} s", flush=True)
    for row in rows.values():
        row["mean_step_s"] = statistics.mean(row["step_s"])
        row["median_step_s"] = statistics.median(row["step_s"])  # less moved by a busy host's spikes
    return rows


def _recorded_steps(ours: _Schedule, setup: PeersSetup, group) -> list[Timeline] | None:
    """`cost_steps` steps of ours with the timeline recorder on (not timed: recording costs
    a little); every rank's actions, on rank 0 (None elsewhere)."""
    timelines = []
    for _ in range(setup.cost_steps):
        recorder = TimelineRecorder()
        ours.timed_step(group, timeline=recorder)
        timelines.append(recorder.timeline(group))
    return timelines if group.rank() == 0 else None


# --profile: where each schedule's host time goes, by cProfile's self time of each function.
# schedule: the schedule's own Python. Ours: the executor and its P2P (pipeline/, link.py), the
# W split's store and closures (weight_grad.py), Megatron's per-micro-batch forward_step and
# backward_step; torch's: its runtime, stage and W split (pipelining/). The linear that makes a
# weight gradient deferrable replaces Megatron's own linear function (which counts as model
# in torch's runs), so it counts as model in ours.
_SCHEDULE_CODE = {
    "ours_dualpipev": ("megatron_dsv3/pipeline/", "megatron_dsv3/overlap/link.py", "megatron_dsv3/weight_grad.py",
                       "megatron/core/pipeline_parallel/"),
    "torch_dualpipev": ("torch/distributed/pipelining/",),
    "torch_1f1b": ("torch/distributed/pipelining/",),
}
_LINEAR_CODE = ("megatron_dsv3/weight_grad.py", ("forward_impl", "deferrable_linear", "forward", "backward", "_as_2d", "<lambda>"))
_COMM_CODE = ("torch/distributed/distributed_c10d.py", "torch/distributed/c10d_logger.py")
# Where a wait's time lands: cProfile does not see torch's C++ methods (pybind11), so a wait's
# time is the self time of the Python function that calls `Work.wait()`. A blocking
# `torch.distributed.recv` (in recv_object_list: the loss dicts, pipeline/dualpipe.py) is the
# exception: cProfile books its wait on `_check_not_self_rank`, which recv calls first
# (measured with torch 2.14: a receive posted 50 ms before its send books 48 ms there).
_WAITS = (("megatron_dsv3/overlap/link.py", "wait"), ("torch/distributed/pipelining/schedules.py", "_wait_batch_p2p"),
          ("torch/distributed/distributed_c10d.py", "recv"), ("torch/distributed/distributed_c10d.py", "_check_not_self_rank"))
PROFILE_CATEGORIES = ("schedule", "comm_issue", "comm_wait", "harness", "model")


def _category(filename: str, function: str, schedule_code: tuple[str, ...]) -> str:
    """comm_wait: waiting for sends and receives (`_WAITS`); comm_issue: the other
    torch.distributed calls (posting sends and receives) and pickling loss dicts, but not the
    model's all-reduces (Megatron's cross-entropy reduces over its tensor-parallel group, of
    one rank here); schedule: the schedule's own Python (above); harness: this benchmark's step
    functions and torch stage adapter; model: the rest (the chunks' forward and backward,
    autograd)."""
    path = filename.replace("\\", "/")
    if any(path.endswith(file) and function == name for file, name in _WAITS):
        return "comm_wait"
    if path.endswith(_LINEAR_CODE[0]) and function in _LINEAR_CODE[1]:
        return "model"
    if (any(code in path for code in _COMM_CODE) and function != "all_reduce") or (filename == "~" and "_pickle" in function):
        return "comm_issue"
    if any(code in path for code in schedule_code):
        return "schedule"
    return "harness" if path.endswith("megatron_dsv3/bench/pipeline_peers.py") else "model"


def _profile(schedules: dict[str, _Schedule], setup: PeersSetup, group) -> dict | None:
    """`profile_steps` steps of each schedule under cProfile; on rank 0 (None elsewhere), per
    schedule: `ranks`, each rank's actions per step, ms per step by category and host overhead
    per action, (schedule + comm_issue) / actions; and `overhead_ms_per_action`, the same over
    all ranks together (their overhead over their actions)."""
    # torch's schedules run the compute actions of these orders (ScheduleDualPipeV's per-rank
    # operations, torch 2.14: as many F, B, W and overlapped F&B as ours; 1F1B: M forwards, M backwards)
    orders = {"ours_dualpipev": DUALPIPEV, "torch_dualpipev": DUALPIPEV, "torch_1f1b": SCHEDULES["1f1b"]}
    rows = {}
    for name, schedule in schedules.items():
        profiler = cProfile.Profile()
        for _ in range(setup.profile_steps):
            schedule.timed_step(group, profiler=profiler)
        seconds = dict.fromkeys(PROFILE_CATEGORIES, 0.0)
        for (filename, _, function), (_, _, self_time, _, _) in pstats.Stats(profiler).stats.items():
            seconds[_category(filename, function, _SCHEDULE_CODE[name])] += self_time
        actions = len(orders[name].order(setup.num_ranks, setup.num_microbatches)[group.rank()])
        ms = {category: 1000 * value / setup.profile_steps for category, value in seconds.items()}
        row = {"actions": actions, "ms_per_step": ms, "overhead_ms_per_action": (ms["schedule"] + ms["comm_issue"]) / actions}
        ranks = [None] * group.size()
        torch.distributed.all_gather_object(ranks, row, group=group)
        overhead = sum(r["ms_per_step"]["schedule"] + r["ms_per_step"]["comm_issue"] for r in ranks)
        rows[name] = {"ranks": ranks, "overhead_ms_per_action": overhead / sum(r["actions"] for r in ranks)}
    return rows if group.rank() == 0 else None


def _from_any_rank(value: float | None, group) -> float:
    """The value the one rank that has it holds, on every rank."""
    tensor = torch.tensor(0.0 if value is None else value, dtype=torch.float64)
    torch.distributed.all_reduce(tensor, group=group)
    return float(tensor)


def _grad_norm(modules: list[torch.nn.Module], group) -> float:
    """The L2 norm of all gradients of the model (each parameter lives on one rank)."""
    squares = sum(float(p.grad.double().pow(2).sum()) for m in modules for p in m.parameters() if p.grad is not None)
    return _from_any_rank(squares, group) ** 0.5


def _ours_dualpipev(config, rank: int, setup: PeersSetup, microbatches: list[dict], group):
    seed_everything(setup.seed)
    chunks = DUALPIPEV.build_chunks(config, rank, setup.num_ranks)

    def step(timeline: TimelineRecorder | None = None):
        losses = DUALPIPEV.forward_backward_func(
            forward_step_func=forward_step, data_iterator=iter(microbatches), model=chunks,
            num_microbatches=setup.num_microbatches, seq_length=setup.seq_length, micro_batch_size=setup.micro_batch_size,
            timeline=timeline,
        )
        if not losses:  # the loss dicts are returned on Megatron's last pipeline stage only
            return None
        total = torch.stack([d["lm loss"] for d in losses]).sum(dim=0)
        return float(total[0] / total[1])

    return _Schedule(step, chunks)


class _TorchStage(torch.nn.Module):
    """Consecutive GPTModel chunks as one torch pipelining stage (the design note)."""

    def __init__(self, chunks):
        super().__init__()
        self.chunks = torch.nn.ModuleList(chunks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for chunk in self.chunks:
            if chunk.pre_process:
                position_ids = torch.arange(x.shape[1]).expand_as(x)
                x = chunk(x, position_ids, None)
            else:
                chunk.set_input_tensor(x)
                x = chunk(None, None, None)
        return x


def _token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """torch's loss_fn: the mean cross-entropy over a micro-batch's tokens."""
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())


def _torch_pipeline_stage(chunks, stage: int, num_stages: int, config, setup: PeersSetup, group) -> PipelineStage:
    """`chunks` as stage `stage` of `num_stages`, with example inputs and outputs given, so
    torch skips its shape inference. torch reads `requires_grad` from them too: a received
    activation gets a gradient only if its example requires one."""
    b, s, h = setup.micro_batch_size, setup.seq_length, config.hidden_size
    hidden = torch.empty(s, b, h, requires_grad=True)
    return PipelineStage(
        _TorchStage(chunks), stage, num_stages, torch.device("cpu"),
        input_args=torch.empty(b, s, dtype=torch.long) if stage == 0 else hidden,
        output_args=torch.empty(b, s, config.vocab_size, requires_grad=True) if stage == num_stages - 1 else hidden,
        group=group,
    )


def _torch_step(schedule, microbatches: list[dict], has_last_stage: bool):
    """torch's step over the pre-split micro-batches; the mean loss where the last stage is."""
    def step():
        MoEAuxLossAutoScaler.set_loss_scale(torch.ones(()))  # torch scales all gradients by 1/M (design note)
        losses = [] if has_last_stage else None
        schedule.step(arg_mbs=[(mb["tokens"],) for mb in microbatches], target_mbs=[mb["labels"] for mb in microbatches],
                      losses=losses, return_outputs=False)
        return float(torch.stack(losses).detach().mean()) if has_last_stage else None

    return step


def _torch_dualpipev(config, rank: int, setup: PeersSetup, microbatches: list[dict], group):
    num_stages = 2 * setup.num_ranks
    seed_everything(setup.seed)
    chunks = DUALPIPEV.build_chunks(config, rank, setup.num_ranks)
    stages = [_torch_pipeline_stage([chunk], stage, num_stages, config, setup, group)
              for chunk, stage in zip(chunks, (rank, num_stages - 1 - rank))]
    schedule = ScheduleDualPipeV(stages, n_microbatches=setup.num_microbatches, loss_fn=_token_loss)
    return _Schedule(_torch_step(schedule, microbatches, has_last_stage=rank == 0), chunks)


def _split_stage(config, setup: PeersSetup, stage: int):
    """Stage `stage` of the 2P-stage DualPipeV split, built as the rank holding it builds it."""
    p = setup.num_ranks
    holder, chunk = (stage, 0) if stage < p else (2 * p - 1 - stage, 1)
    seed_everything(setup.seed)
    return DUALPIPEV.build_chunks(config, holder, p)[chunk]


def _torch_1f1b(config, rank: int, setup: PeersSetup, microbatches: list[dict], group):
    chunks = [_split_stage(config, setup, stage) for stage in (2 * rank, 2 * rank + 1)]
    stage = _torch_pipeline_stage(chunks, rank, setup.num_ranks, config, setup, group)
    schedule = Schedule1F1B(stage, n_microbatches=setup.num_microbatches, loss_fn=_token_loss)
    return _Schedule(_torch_step(schedule, microbatches, has_last_stage=rank == setup.num_ranks - 1), chunks)
