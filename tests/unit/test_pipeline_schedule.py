"""Pipeline orders (1F1B, ZB1P, DualPipe, DualPipeV) replayed against the report's table (§3.2.1).

The complete orders against the public DualPipe schedule: test_pipeline_reference_orders.py.

Costs are sums of halves, so every time is exact in floating point and bubbles are compared
with ==. The cost sets are where the paper's formulas hold (forward = backward for inputs,
W <= F, as its figure draws them); one test pins what happens outside.
"""

import argparse
import dataclasses
import json
from collections import defaultdict

import pytest

from megatron_dsv3.bench import pipeline as bench_pipeline
from megatron_dsv3.pipeline import schedule
from megatron_dsv3.pipeline.schedule import Action, check_order
from megatron_dsv3.pipeline.registry import SCHEDULES
from megatron_dsv3.pipeline.simulate import Costs, MeasuredCosts, Timeline, plot_timeline, simulate, simulate_schedule

COSTS = {
    "overlap gain": Costs(F=1, B=2, W=1, FB=2.5),  # the bench default: F&B < F + B
    "W = 0": Costs(F=1, B=1, W=0, FB=1.5),
    "paper figure": Costs(F=1, B=2, W=1, FB=3),  # one cell each for F, B-for-inputs, W
    "F&B = B": Costs(F=2, B=2.5, W=0.5, FB=2.5),  # the least an overlapped pair can take
}
RANKS = (2, 4, 8, 16)


def microbatch_counts(name: str, p: int) -> list[int]:
    """The fewest each schedule runs, a few more, and a count that is no multiple of P."""
    fewest = {"1f1b": 1, "zb1p": p, "dualpipe": 2 * p - 2, "dualpipev": 2 * p - 1}[name]
    counts = {fewest, fewest + 2, 2 * p + 6, 3 * p}
    return sorted(m + m % 2 if name == "dualpipe" else m for m in counts)


CASES = [(name, p, m) for name in SCHEDULES for p in RANKS for m in microbatch_counts(name, p) if p < 16 or m <= 2 * p + 6]


@pytest.mark.parametrize("name, p, m", CASES)
def test_simulated_bubble_is_the_papers_formula_and_activations_its_bound(name, p, m):
    spec = SCHEDULES[name]
    for label, costs in COSTS.items():
        timeline = simulate_schedule(spec, p, m, costs)  # runs check_order first
        assert timeline.bubble() == spec.bubble_formula(p, costs), (label, timeline.rank_bubbles())
    peaks = timeline.rank_activation_peaks()  # the same for every cost set: it follows the order
    assert max(peaks) <= spec.activation_bound(p), peaks
    if m >= 2 * p:
        assert max(peaks) == spec.activation_bound(p), peaks  # reached once the pipeline fills


def test_formulas_in_megatron_terms():
    c = Costs(F=1, B=2, W=0.5, FB=2.5)
    assert SCHEDULES["1f1b"].bubble_formula(8, c) == 7 * 3
    assert SCHEDULES["zb1p"].bubble_formula(8, c) == 7 * 2
    assert SCHEDULES["dualpipe"].bubble_formula(8, c) == 3 * 3  # (PP/2-1)(F&B+B-3W), PP = P
    assert SCHEDULES["dualpipev"].bubble_formula(8, c) == 7 * 3  # the same with PP = 2P half-size stages


def test_activation_bounds_in_megatron_terms_and_parameter_multipliers():
    """PP+1 stage activations: P+1 full stages for DualPipe, 2P+1 half-size ones (P + 1/2 full) for DualPipeV."""
    p = 8
    expected = {"1f1b": (8, 8.0, 1.0), "zb1p": (8, 8.0, 1.0), "dualpipe": (9, 9.0, 2.0), "dualpipev": (17, 8.5, 1.0)}
    for name, (bound, full_stages, params) in expected.items():
        spec = SCHEDULES[name]
        placement = spec.placement(p, 4 * p)
        assert spec.activation_bound(p) == bound
        assert bound * placement.activation_unit == full_stages
        assert placement.parameter_multiplier == params


def test_bubble_is_the_idlest_rank_and_the_turn_of_the_v_is_idlest():
    timeline = simulate_schedule(SCHEDULES["dualpipev"], 4, 10, COSTS["overlap gain"])
    bubbles = timeline.rank_bubbles()
    assert bubbles == [3.5, 4.0, 4.5, 4.5]  # ranks with more F&B pairs compute for less time
    assert timeline.bubble() == max(bubbles)
    one_f_one_b = simulate_schedule(SCHEDULES["1f1b"], 4, 10, COSTS["overlap gain"])
    assert one_f_one_b.rank_bubbles() == [9.0] * 4


def test_outside_its_assumptions_the_formula_misses_the_replayed_bubble():
    """Forward != backward for inputs: DualPipeV on 4 ranks idles 14, not (P-1)(F&B+B-3W) = 15."""
    costs = Costs(F=1, B=2, W=0, FB=3)
    spec = SCHEDULES["dualpipev"]
    assert not spec.formula_holds(4, 8, costs)
    assert simulate_schedule(spec, 4, 8, costs).bubble() == 14
    assert spec.bubble_formula(4, costs) == 15


def test_dualpipe_feeds_half_the_microbatches_into_each_direction():
    p, m = 8, 20
    order = schedule.dualpipe_order(p, m)
    def forwarded(rank, chunk):
        return {mb for a in order[rank] for kind, c, mb in a.computations() if kind == "F" and c == chunk}

    assert forwarded(0, 0) == forwarded(p - 1, 0) == set(range(10))  # direction 0 enters on rank 0
    assert forwarded(p - 1, 1) == forwarded(0, 1) == set(range(10, 20))  # direction 1 on rank P-1


def test_every_rank_runs_each_forward_backward_and_weight_gradient_once():
    order = schedule.zb1p_order(4, 6)
    counts = {}
    for rank_order in order:
        for action in rank_order:
            for kind, _, _ in action.computations():
                counts[kind] = counts.get(kind, 0) + 1
    assert counts == {"F": 24, "B": 24, "W": 24}


@pytest.mark.parametrize(
    "build, p, m, words",
    [
        (schedule.dualpipev_order, 4, 6, ["2 * num_ranks - 1", "num_microbatches=6", "num_ranks=4"]),
        (schedule.dualpipev_order, 0, 6, ["num_ranks must be an integer >= 1", "0"]),
        (schedule.dualpipe_order, 3, 8, ["even number of ranks", "num_ranks=3"]),
        (schedule.dualpipe_order, 4, 7, ["even number of micro-batches", "num_microbatches=7"]),
        (schedule.dualpipe_order, 4, 4, ["2 * num_ranks - 2", "num_microbatches=4", "num_ranks=4"]),
        (schedule.one_f_one_b_order, 4, 0, ["num_microbatches must be an integer >= 1", "0"]),
        (schedule.zb1p_order, 0, 4, ["num_stages must be an integer >= 1"]),
        (schedule.dualpipe_placement, 4, 7, ["even number of micro-batches"]),
    ],
)
def test_invalid_set_ups_raise_with_the_rule_and_the_numbers(build, p, m, words):
    with pytest.raises(ValueError) as error:
        build(p, m)
    for word in words:
        assert word in str(error.value)


@pytest.mark.parametrize(
    "costs, words",
    [
        (dict(F=1, B=1, W=2, FB=2), ["B >= W >= 0"]),
        (dict(F=1, B=2, W=1, FB=1.5), ["max(F, B) = 2", "FB=1.5"]),
        (dict(F=1, B=2, W=1, FB=3.5), ["F + B = 3", "FB=3.5"]),
    ],
)
def test_impossible_costs_raise(costs, words):
    with pytest.raises(ValueError) as error:
        Costs(**costs)
    for word in words:
        assert word in str(error.value)


def test_check_order_rejects_broken_orders():
    placement = schedule.one_f_one_b_placement(2, 2)
    good = schedule.zb1p_order(2, 2)
    check_order(good, placement)
    broken = {
        "no W": [good[0], [a for a in good[1] if a.kind != "W"]],
        "comes before the F": [good[0], [Action("B", 0, 0)] + [a for a in good[1] if a != Action("B", 0, 0)]],
        "repeats the F": [good[0] + [Action("F", 0, 0)], good[1]],
        "not fed to chunk 0": [good[0] + [Action("F", 0, 5)], good[1]],
        "does not hold": [good[0] + [Action("F", 1, 0)], good[1]],
        "order has 1 ranks": [good[0]],
    }
    for words, order in broken.items():
        with pytest.raises(ValueError, match=words):
            check_order(order, placement)
    v_placement = schedule.dualpipev_placement(1, 1)
    check_order(schedule.dualpipev_order(1, 1), v_placement)
    with pytest.raises(ValueError, match="runs stage 1 forward before stage 0"):
        check_order([[Action("F", 1, 0), Action("F", 0, 0), Action("BW", 1, 0), Action("BW", 0, 0)]], v_placement)


def test_fb_action_needs_its_backward_and_only_fb_has_one():
    with pytest.raises(ValueError, match="FB and only FB"):
        Action("FB", 0, 1)
    with pytest.raises(ValueError, match="FB and only FB"):
        Action("F", 0, 1, backward_chunk=1, backward_microbatch=0)
    with pytest.raises(ValueError, match="not one of"):
        Action("X", 0, 0)
    assert Action("FB", 0, 3, 1, 2).computations() == (("F", 0, 3), ("B", 1, 2), ("W", 1, 2))


def test_a_deadlocking_order_is_reported():
    placement = schedule.one_f_one_b_placement(2, 1)
    order = [[Action("BW", 0, 0), Action("F", 0, 0)], [Action("F", 0, 0), Action("BW", 0, 0)]]
    with pytest.raises(ValueError, match="deadlocks"):
        simulate(order, placement, COSTS["W = 0"])


def _measured(costs: Costs, timeline: Timeline) -> MeasuredCosts:
    """What a recorded step of `timeline` would give: every action of a (rank, kind, chunk) at
    `costs`, each one also blocked on a receive for a while (which is not its cost)."""
    recorded = [dataclasses.replace(r, end=r.end + 0.5 * (i % 3), p2p_blocked=0.5 * (i % 3), a2a_blocked=0.0)
                for i, r in enumerate(timeline.records)]
    return MeasuredCosts.from_timelines([dataclasses.replace(timeline, records=tuple(recorded))])


@pytest.mark.parametrize("name", ["dualpipev", "dualpipe", "1f1b", "zb1p"])
def test_measured_costs_replay_as_the_uniform_costs_they_were_measured_from(name):
    """MeasuredCosts: the median compute time (wall less blocked) of each (rank, kind, chunk)
    of recorded steps; replayed, the same step as the costs they came from."""
    spec, costs = SCHEDULES[name], COSTS["paper figure"]
    uniform = simulate_schedule(spec, 4, 10, costs)
    measured = _measured(costs, uniform)
    assert {value for value in measured.seconds.values()} <= {costs.of(kind) for kind in schedule.KINDS}
    assert simulate_schedule(spec, 4, 10, measured).records == uniform.records
    with pytest.raises(ValueError, match="no measured cost for F of chunk 1 on rank 9"):
        measured.of(9, "F", 1)


def test_measured_costs_are_per_stage():
    """A dearer stage (the head's, DualPipeV's stage 2P-1 on rank 0) lengthens the step by
    what the order makes it wait, which uniform costs cannot express."""
    spec, costs = SCHEDULES["dualpipev"], COSTS["paper figure"]
    measured = _measured(costs, simulate_schedule(spec, 2, 8, costs))
    dearer = MeasuredCosts({key: 2 * value if key[0] == 0 and key[2] == 1 and key[1] == "F" else value
                            for key, value in measured.seconds.items()})
    assert simulate_schedule(spec, 2, 8, dearer).makespan() > simulate_schedule(spec, 2, 8, measured).makespan()


def test_plot_writes_a_png(tmp_path):
    path = tmp_path / "dualpipev.png"
    plot_timeline(simulate_schedule(SCHEDULES["dualpipev"], 4, 10, COSTS["paper figure"]), path, title="DualPipeV, 4 ranks")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_prints_a_table_then_the_json(capsys):
    parser = argparse.ArgumentParser()
    bench_pipeline.add_parser(parser.add_subparsers())
    args = parser.parse_args(["pipeline", "--F", "1", "--B", "2", "--W", "1", "--FB", "2.5", "--pp", "2", "4"])
    assert args.main(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert "formula" in lines[1]
    result = json.loads(lines[-1])
    assert [(row["P"], row["schedule"]) for row in result["rows"]] == [(p, n) for p in (2, 4) for n in SCHEDULES]
    assert all(row["agree"] and row["formula_holds"] and row["activations_within_bound"] for row in result["rows"])
    assert result["agree_where_formula_holds"] and result["activations_within_bound"]


@pytest.mark.parametrize("flags, rule", [
    (["--pp", "4", "--microbatches", "5"], "even number of micro-batches"),
    (["--microbatches", "0"], "microbatches=0: a step needs at least one micro-batch"),  # was: 4P, silently
    (["--F", "0", "--B", "0", "--W", "0", "--FB", "0"], "costs need F > 0"),  # was: ZeroDivisionError
])
def test_bench_rejects_a_set_up_with_the_rule(capsys, flags, rule):
    parser = argparse.ArgumentParser()
    bench_pipeline.add_parser(parser.add_subparsers())
    args = parser.parse_args(["pipeline", *flags])
    assert args.main(args) == 2
    assert rule in capsys.readouterr().err


def _link_traffic(order, placement):
    """What each rank sends and receives, in the order it does so, as the executors route
    messages (pipeline/dualpipe.py): a forward takes its input from the holder of the previous
    stage and sends its output to the next; a backward the other way. Returns, per
    (from rank, to rank, stream) and per (from rank, to rank) with both streams merged, the
    messages as issued by the sender and as taken by the receiver."""
    holder = {stage: (rank, chunk) for rank, chunks in enumerate(placement.stage_of) for chunk, stage in enumerate(chunks)}
    issued, taken = defaultdict(list), defaultdict(list)
    for rank, actions in enumerate(order):
        for action in actions:
            for kind, chunk, microbatch in action.computations():
                direction, stage = placement.stage_of[rank][chunk]
                before, after = holder.get((direction, stage - 1)), holder.get((direction, stage + 1))
                if kind == "F":
                    inbound, outbound, stream = before, after, "activation"
                elif kind == "B":
                    inbound, outbound, stream = after, before, "gradient"
                else:
                    continue
                if inbound and inbound[0] != rank:
                    message = (stream, direction, microbatch)
                    taken[inbound[0], rank, stream].append(message)
                    taken[inbound[0], rank].append(message)
                if outbound and outbound[0] != rank:
                    message = (stream, direction, microbatch)
                    issued[rank, outbound[0], stream].append(message)
                    issued[rank, outbound[0]].append(message)
    return issued, taken


@pytest.mark.parametrize("name", ["dualpipe", "dualpipev"])
@pytest.mark.parametrize("num_ranks", [2, 4, 8])
def test_each_stream_of_each_link_is_received_in_the_order_it_is_sent(name, num_ranks):
    """NCCL matches a link's messages in issue order (no tags): with one group per stream and
    direction of travel (pipeline/comm.py), every link's stream must be received in the order
    it is sent. One group for both streams would not do: the two interleave differently on the
    two sides."""
    spec = SCHEDULES[name]
    interleaved_differently = False
    for num_microbatches in (2 * num_ranks, 2 * num_ranks + 4, 3 * num_ranks):
        issued, taken = _link_traffic(spec.order(num_ranks, num_microbatches), spec.placement(num_ranks, num_microbatches))
        assert issued.keys() == taken.keys() and issued
        for link, messages in issued.items():
            if len(link) == 3:  # one stream of one link
                assert taken[link] == messages, link
            else:  # both streams of a link, merged
                interleaved_differently |= taken[link] != messages
    # small pipelines happen to agree; DualPipeV from P = 4 and DualPipe from P = 8 do not
    assert interleaved_differently == (num_ranks >= (4 if name == "dualpipev" else 8))


@pytest.mark.parametrize("name", SCHEDULES)
def test_each_record_places_its_stages_where_its_order_runs_them(name):
    record = SCHEDULES[name]
    for p in (2, 4):
        m = microbatch_counts(name, p)[0]
        placement = record.placement(p, m)
        assert placement.stage_of == record.stages(p) and placement.num_stages == record.num_stages(p)
        check_order(record.order(p, m), placement)


def test_dualpipev_splits_megatrons_per_rank_layers_over_the_v():
    """DeepSeek-V3 on 16 ranks, Megatron-LM's 2 + 14 x 4 + 3 layers (launch/layout.py's note):
    one layer on stages 0, 16 and 31 of the V, two on the other 29."""
    stages = SCHEDULES["dualpipev"].stage_layers([2] + [4] * 14 + [3])
    assert stages == [1] + [2] * 15 + [1] + [2] * 14 + [1] and sum(stages) == 61
    assert SCHEDULES["dualpipe"].stage_layers([2, 4, 3]) == SCHEDULES["1f1b"].stage_layers([2, 4, 3]) == [2, 4, 3]
