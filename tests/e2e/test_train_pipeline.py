"""The training loop pipelined over CPU processes (torchrun, gloo): DualPipeV on 2 and 4
processes against the single-process run, and checkpoints that survive a kill.

Same model (tiny: MLA + MoE + MTP, 8 layers so that P = 4 has one per stage of its 2P),
same data, same seed. The reference is the one-process loop.
  - Loss curves: per step, the LM and MTP losses and every layer's tokens per expert of the
    pipelined runs (2 and 4 processes, and 2 data-parallel replicas of a 2-rank pipeline)
    equal the reference's. Bit-identity holds for the first step of one replica; later,
    gradients that sum in another order (the embedding's, used by two chunks; the norm summed
    over ranks) can move the weights by an ulp, so losses are compared at 1e-6 relative.
  - DualPipe on 2 processes: the same loss curve, and a resume from a checkpoint of its
    mirrored stages that reproduces its records exactly.
  - Resume: a 2-process DualPipeV run saving every 2 steps is killed (SIGKILL, rank 0) right
    after its second save has written all its data but before it is committed. The step-2
    checkpoint must still be the latest, the killed one left as `.incomplete`; resuming
    from it must reproduce the uninterrupted run's records exactly, steps 3 to the end.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

STEPS = 6
COMMON = ["--steps", str(STEPS), "--micro-batch-size", "2", "--num-microbatches", "8", "--warmup-steps", "1",
          "--set", "num_layers=8", "--set", "seq_length=32", "--corpus-bytes", "1000000", "--no-progress", "--seed", "7"]
KILL_DURING_SAVE = Path(__file__).with_name("kill_during_save.py")


def _run(run_dir: Path, processes: int, *extra: str, script=None, check=True) -> subprocess.CompletedProcess:
    program = [str(script)] if script else ["-m", "megatron_dsv3.training"]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes)] if processes > 1 else [sys.executable]
    command = [*launcher, *program, *COMMON, "--run-dir", str(run_dir), *extra]
    # not this process's rendezvous (tests/conftest.py joins one): each run makes its own
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    result = subprocess.run(command, capture_output=True, text=True, env={**env, "OMP_NUM_THREADS": "1"}, timeout=600)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    _run(root / "single", 1, "--save-interval", "3")  # saving changes no number; the last test resumes it
    _run(root / "pp2", 2, "--pipeline-schedule", "dualpipev", "--pp", "2")
    return root


# (processes, pipeline size): PP 2, PP 4, and DP 2 x PP 2 (each replica 4 of the 8 micro-batches)
@pytest.mark.parametrize("processes, pp", [(2, 2), (4, 4), (4, 2)])
def test_dualpipev_loss_curve_matches_single_process(runs, processes, pp):
    run_dir = runs / f"pp{pp}" if processes == pp else runs / f"dp{processes // pp}pp{pp}"
    if (processes, pp) != (2, 2):
        microbatches = str(8 * pp // processes)  # the same global batch
        _run(run_dir, processes, "--pipeline-schedule", "dualpipev", "--pp", str(pp), "--num-microbatches", microbatches)
    reference, pipelined = _records(runs / "single"), _records(run_dir)
    assert [r["step"] for r in pipelined] == list(range(1, STEPS + 1))
    identical = 0
    for want, got in zip(reference, pipelined):
        for key in ("lm_loss", "mtp_loss"):
            assert got[key] == pytest.approx(want[key], rel=1e-6), (got["step"], key)
        assert got["expert_load"].keys() == want["expert_load"].keys()
        identical += got["lm_loss"] == want["lm_loss"]
    if processes == pp:  # one replica: the first step is bit-identical (DP adds its losses in another order)
        assert pipelined[0]["lm_loss"] == reference[0]["lm_loss"]
    assert pipelined[0]["expert_load"] == reference[0]["expert_load"]  # every layer's tokens per expert
    print(f"{processes} processes, P={pp}: {identical}/{STEPS} steps with a bit-identical LM loss")
    assert (run_dir / "pipeline_timeline.png").stat().st_size > 10_000


def test_killed_save_leaves_the_last_checkpoint_and_resume_is_bit_identical(runs, tmp_path):
    run_dir = tmp_path / "resumed"
    pipeline = ("--pipeline-schedule", "dualpipev", "--pp", "2", "--save-interval", "2", "--ema-decay", "0.9")
    killed = _run(run_dir, 2, *pipeline, script=KILL_DURING_SAVE, check=False)
    assert killed.returncode != 0
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / "latest").read_text() == "2"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["iter_0000002", "iter_0000004.incomplete", "latest"]

    _run(run_dir, 2, *pipeline, "--resume")
    reference, resumed = _records(runs / "pp2"), _records(run_dir)
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))
    for want, got in zip(reference, resumed):
        assert got == want, got["step"]  # every metric, bit for bit
    assert (checkpoints / "latest").read_text() == str(STEPS)


def test_resume_rejects_a_different_batch_shape(runs):
    rejected = _run(runs / "single", 1, "--save-interval", "3", "--resume", "--micro-batch-size", "4", check=False)
    assert rejected.returncode != 0
    assert "saved with micro_batch_size=2, this run has micro_batch_size=4" in rejected.stderr


def test_dualpipe_trains_like_the_single_process_and_resumes_bit_identically(runs, tmp_path):
    """DualPipe's mirrored stages through the loop: the loss curve of the single process (the
    mirrors' gradients are summed, counted once in the norm), and checkpoints that write each
    stage once and read it into both copies."""
    run_dir = tmp_path / "dualpipe"
    pipeline = ("--pipeline-schedule", "dualpipe", "--pp", "2", "--save-interval", "2")
    _run(run_dir, 2, *pipeline)
    uninterrupted = _records(run_dir)
    for want, got in zip(_records(runs / "single"), uninterrupted):
        for key in ("lm_loss", "mtp_loss"):
            assert got[key] == pytest.approx(want[key], rel=1e-6), (got["step"], key)
    (run_dir / "checkpoints" / "latest").write_text("2")  # as if the run had stopped after step 2
    _run(run_dir, 2, *pipeline, "--resume")
    assert _records(run_dir) == uninterrupted
