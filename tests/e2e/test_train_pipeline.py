"""The training loop pipelined over CPU processes (torchrun, gloo): DualPipeV on 2 and 4
processes against the single-process run, and checkpoints that survive a kill.

Same model, data and seed (tests/e2e/compact_loop.py); the reference is the one-process
loop (tests/e2e/conftest.py runs it, and the 2-process DualPipeV run, once per session).
  - Loss curves: per step, the LM and MTP losses and every layer's tokens per expert of the
    pipelined runs (2 and 4 processes, and 2 data-parallel replicas of a 2-rank pipeline that
    split the experts, EP=2, with the FB overlap) equal the reference's. Bit-identity holds for the first step of one replica; later,
    gradients that sum in another order (the embedding's, used by two chunks; the norm summed
    over ranks) can move the weights by an ulp, so losses are compared at 1e-6 relative.
    So are the validation LM and MTP losses after steps 3 and 6: each layout's schedule run
    forward only, against the single process's forward.
  - DualPipe PP=2 x EP=2 on 4 processes: the same loss curve (validation included), and a
    resume from a checkpoint of its mirrored stages and split experts that reproduces its
    records exactly.
  - Resume: a 2-process DualPipeV run saving every 2 steps is killed (SIGKILL, rank 0) right
    after its second save has written all its data but before it is committed. The step-2
    checkpoint must still be the latest, the killed one left as `.incomplete`; resuming
    from it must reproduce the uninterrupted run's records exactly, steps 3 to the end: the
    validation losses of the weights and of the EMA included.
"""

from pathlib import Path

import pytest
from compact_loop import EVALUATED, STEPS, losses
from compact_loop import records as _records
from compact_loop import run as _run

pytestmark = pytest.mark.slow

KILL_DURING_SAVE = Path(__file__).with_name("kill_during_save.py")


# (processes, pipeline size): PP 2, PP 4, and DP 2 x PP 2 with EP 2 (each replica 4 of the 8
# micro-batches, and half of every MoE layer's experts)
@pytest.mark.parametrize("processes, pp", [(2, 2), (4, 4), (4, 2)])
def test_dualpipev_loss_curve_matches_single_process(compact_runs, processes, pp):
    run_dir = compact_runs / f"pp{pp}" if processes == pp else compact_runs / f"dp{processes // pp}pp{pp}ep2"
    if (processes, pp) != (2, 2):
        microbatches = str(8 * pp // processes)  # the same global batch
        experts = ("--ep", "2", "--fb-overlap") if processes > pp else ()  # FB overlapped at the all-to-alls: the same numbers
        _run(run_dir, processes, "--pipeline-schedule", "dualpipev", "--pp", str(pp), "--num-microbatches", microbatches, *experts)
    reference, pipelined = _records(compact_runs / "single"), _records(run_dir)
    assert [r["step"] for r in pipelined] == list(range(1, STEPS + 1))
    assert [r["step"] for r in pipelined if "val_lm_loss" in r] == [r["step"] for r in reference if "val_lm_loss" in r] == EVALUATED
    identical = 0
    for want, got in zip(reference, pipelined):
        assert losses(got) == pytest.approx(losses(want), rel=1e-6), got["step"]
        assert got["expert_load"].keys() == want["expert_load"].keys()
        identical += got["lm_loss"] == want["lm_loss"]
    if processes == pp:  # one replica: the first step is bit-identical (DP adds its losses in another order)
        assert pipelined[0]["lm_loss"] == reference[0]["lm_loss"]
    assert pipelined[0]["expert_load"] == reference[0]["expert_load"]  # every layer's tokens per expert
    print(f"{processes} processes, P={pp}: {identical}/{STEPS} steps with a bit-identical LM loss")
    assert (run_dir / "pipeline_timeline.png").stat().st_size > 10_000


def test_killed_save_leaves_the_last_checkpoint_and_resume_is_bit_identical(compact_runs, tmp_path):
    run_dir = tmp_path / "resumed"
    pipeline = ("--pipeline-schedule", "dualpipev", "--pp", "2", "--save-interval", "2", "--ema-decay", "0.9")
    killed = _run(run_dir, 2, *pipeline, script=KILL_DURING_SAVE, check=False)
    assert killed.returncode != 0
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / "latest").read_text() == "2"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["iter_0000002", "iter_0000004.incomplete", "latest"]

    _run(run_dir, 2, *pipeline, "--resume")
    reference, resumed = _records(compact_runs / "pp2"), _records(run_dir)
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))
    assert [r["step"] for r in resumed if "ema_val_lm_loss" in r] == EVALUATED
    for want, got in zip(reference, resumed):
        assert got == want, got["step"]  # every metric, bit for bit (validation, the EMA's included)
    assert (checkpoints / "latest").read_text() == str(STEPS)


def test_resume_rejects_a_different_batch_shape(compact_runs):
    rejected = _run(compact_runs / "single", 1, "--save-interval", "3", "--resume", "--micro-batch-size", "4", check=False)
    assert rejected.returncode != 0
    assert "saved with micro_batch_size=2, this run has micro_batch_size=4" in rejected.stderr


def test_dualpipe_trains_like_the_single_process_and_resumes_bit_identically(compact_runs, tmp_path):
    """DualPipe's mirrored stages through the loop, with EP=2 over its 2 data-parallel
    replicas: the loss curve of the single process (the mirrors' gradients are summed, counted
    once in the norm), and checkpoints that write each stage once and read it into both copies,
    each rank's experts by their global index."""
    run_dir = tmp_path / "dualpipe"
    pipeline = ("--pipeline-schedule", "dualpipe", "--pp", "2", "--ep", "2", "--num-microbatches", "4", "--save-interval", "2")
    _run(run_dir, 4, *pipeline)
    uninterrupted = _records(run_dir)
    for want, got in zip(_records(compact_runs / "single"), uninterrupted):
        assert losses(got) == pytest.approx(losses(want), rel=1e-6), got["step"]
    assert [r["step"] for r in uninterrupted if "val_lm_loss" in r] == EVALUATED
    (run_dir / "checkpoints" / "latest").write_text("2")  # as if the run had stopped after step 2
    _run(run_dir, 4, *pipeline, "--resume")
    assert _records(run_dir) == uninterrupted
