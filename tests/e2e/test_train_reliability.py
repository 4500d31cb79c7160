"""The compact loop refuses what would silently corrupt a run, and never hangs or succeeds on NaN.

- A run directory holds one run: another's files are continued (--resume) or replaced
  (--overwrite), never mixed in.
- A resume with another model (a --set override) or another optimizer setting is refused
  before anything is loaded, naming the setting and both values.
- A non-finite gradient norm stops the run at its step, naming the first such gradient.
- A peer that is alive but stopped ends the job after --distributed-timeout-minutes: between
  pipeline steps, and inside an expert-parallel all-to-all.
- A save that runs out of space says so, keeps the previous checkpoint and leaves no partial one.
The runs are in this process (tests/conftest.py's process group), except the stopped peer's.
"""

import contextlib
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import compact_loop as compact
import psutil
import pytest

from megatron_dsv3.training.__main__ import main

pytestmark = pytest.mark.slow

TINY = ["--micro-batch-size", "2", "--num-microbatches", "1", "--corpus-bytes", "1000000",
        "--warmup-steps", "0", "--no-progress"]


def test_a_run_directory_holding_another_run_is_refused(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "lm_loss": 5.0}\n')
    with pytest.raises(ValueError, match=rf"{run_dir} holds another run \(metrics.jsonl\). Fix: pass --resume"):
        main([*TINY, "--steps", "2", "--run-dir", str(run_dir)])
    assert (run_dir / "metrics.jsonl").read_text() == '{"step": 1, "lm_loss": 5.0}\n'  # untouched


def test_overwrite_replaces_the_other_run(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "foreign.txt").write_text("another run's file")
    assert main([*TINY, "--steps", "2", "--run-dir", str(run_dir), "--overwrite"]) == 0
    assert not (run_dir / "foreign.txt").exists()
    assert [r["step"] for r in compact.records(run_dir)] == [1, 2]


@pytest.mark.parametrize("changed, message", [
    (["--set", "moe_router_topk=4"], "was saved with overrides={'num_layers': 8, 'seq_length': 32}, this run has overrides="),
    (["--lr", "1e-3"], "was saved with lr=0.003, this run has lr=0.001"),
    (["--ema-decay", "0.9"], "was saved with ema_decay=None, this run has ema_decay=0.9"),
])
def test_a_resume_with_another_model_or_optimizer_is_refused(compact_runs, tmp_path, changed, message):
    """The shared single-process run (tests/e2e/conftest.py) saved at step 3."""
    run_dir = tmp_path / "single"
    shutil.copytree(compact_runs / "single", run_dir)
    with pytest.raises(ValueError, match="Fix: resume with the same") as error:
        main([*compact.COMMON, "--run-dir", str(run_dir), "--resume", *changed])
    assert message in str(error.value)


def test_a_vocabulary_smaller_than_the_tokenizers_is_refused_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="vocab_size=200: the training data's byte tokenizer has 257 ids"):
        main([*TINY, "--steps", "2", "--set", "vocab_size=200", "--run-dir", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


def test_a_non_finite_gradient_stops_the_run_naming_the_step(tmp_path):
    run_dir = tmp_path / "run"
    with pytest.raises(FloatingPointError, match=r"step 2: the gradient norm is nan; the first non-finite gradient on "
                                                 r"this rank, in parameter order, is embedding.word_embeddings.weight"):
        main([*TINY, "--steps", "4", "--lr", "1e30", "--min-lr", "0", "--run-dir", str(run_dir), "--check"])
    assert [r["step"] for r in compact.records(run_dir)] == [1]  # step 2 is not logged


TIMEOUT_MINUTES, BOUND_S = 0.2, 60  # 12 s


def _workers(job: subprocess.Popen) -> dict[str, psutil.Process]:
    """torchrun's worker processes by RANK; a child that ends while being listed is skipped."""
    workers = {}
    for process in psutil.Process(job.pid).children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            workers[process.environ().get("RANK")] = process
    return workers


def _rank0_failure_after_rank1_stops(command: list[str], rank1_stopped) -> tuple[int, float, str]:
    """Run `command` (torchrun, 2 workers) until `rank1_stopped(job, workers)` returns True (it
    may stop rank 1 itself); then time rank 0's exit. Returns its exit code, the seconds it took
    and the job's output; every worker is resumed and killed after."""
    # tests/conftest.py turns TorchDynamo off: no first-call compile racing the short timeout
    job = subprocess.Popen(command, env=compact.child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    workers = {}
    try:
        deadline = time.monotonic() + 300
        while not rank1_stopped(job, workers):
            assert job.poll() is None and time.monotonic() < deadline, "the job ended before rank 1 stopped"
            time.sleep(0.1)
            workers = _workers(job)
        start = time.monotonic()
        exit_code = workers["0"].wait(timeout=BOUND_S)
        took = time.monotonic() - start
    finally:
        if "1" in workers and workers["1"].is_running():
            workers["1"].send_signal(signal.SIGCONT)
        for process in psutil.Process(job.pid).children(recursive=True):
            process.kill()
        job.kill()
    return exit_code, took, job.communicate()[0]


def test_a_stopped_peer_ends_the_job_after_the_timeout(tmp_path):
    """DualPipeV on 2 processes; once step 1 is logged, rank 1 is stopped (SIGSTOP: alive, sockets
    open, answering nothing). Rank 0 must fail on the timeout within the bound (torchrun then
    ends the job: it stops the other workers once one has failed)."""
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "megatron_dsv3.training",
               *TINY, "--set", "num_layers=4", "--num-microbatches", "4", "--steps", "50", "--pipeline-schedule", "dualpipev",
               "--pp", "2", "--run-dir", str(run_dir), "--distributed-timeout-minutes", str(TIMEOUT_MINUTES)]

    def stop_after_step_1(job, workers) -> bool:
        metrics = run_dir / "metrics.jsonl"
        if "1" not in workers or not metrics.exists() or not metrics.read_text():
            return False
        workers["1"].send_signal(signal.SIGSTOP)
        return True

    exit_code, took, output = _rank0_failure_after_rank1_stops(command, stop_after_step_1)
    assert exit_code != 0
    # blocked in a pipeline receive (our error, naming the flag) or in a collective (gloo's)
    assert "pipeline rank 0: receiving" in output or f"Timed out waiting {int(TIMEOUT_MINUTES * 60_000)}ms" in output, output[-3000:]
    assert TIMEOUT_MINUTES * 60 * 0.8 <= took <= BOUND_S, took


STOP_IN_ALL_TO_ALL = Path(__file__).with_name("stop_in_all_to_all.py")


def test_a_peer_stopped_in_an_all_to_all_ends_the_job_after_the_timeout(tmp_path):
    """EP=2 on 2 processes; rank 1 stops itself as it enters an all-to-all of the first steps
    (stop_in_all_to_all.py). Rank 0, waiting in the same all-to-all, must fail on gloo's
    timeout within the bound, with the error naming the all-to-all and the flag."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", str(STOP_IN_ALL_TO_ALL),
               *TINY, "--set", "num_layers=2", "--steps", "50", "--ep", "2", "--run-dir", str(tmp_path / "run"),
               "--distributed-timeout-minutes", str(TIMEOUT_MINUTES)]
    exit_code, took, output = _rank0_failure_after_rank1_stops(
        command, lambda job, workers: "1" in workers and workers["1"].status() == psutil.STATUS_STOPPED)
    assert exit_code != 0
    assert "rank 1: stopping itself in an all-to-all" in output
    rank0 = "\n".join(line for line in output.splitlines() if line.startswith("[rank0]"))
    assert f"Timed out waiting {int(TIMEOUT_MINUTES * 60_000)}ms" in rank0, output[-3000:]
    assert "the expert-parallel all-to-all" in rank0 and "--distributed-timeout-minutes" in rank0, output[-3000:]
    assert TIMEOUT_MINUTES * 60 * 0.8 <= took <= BOUND_S, took


def test_a_save_that_runs_out_of_space_says_so_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    """The second save fails as a full disk makes DCP's writer fail: after part of its files."""
    import errno

    from megatron_dsv3.training import checkpoint

    megatron_save, saves = checkpoint.dist_checkpointing.save, []

    def filling_save(state, directory, *args, **kwargs):
        saves.append(directory)
        if len(saves) == 2:
            (Path(directory) / "__0_0.distcp").write_bytes(b"half a shard")
            raise OSError(errno.ENOSPC, "No space left on device")
        return megatron_save(state, directory, *args, **kwargs)

    monkeypatch.setattr(checkpoint.dist_checkpointing, "save", filling_save)
    run_dir = tmp_path / "run"
    with pytest.raises(OSError, match=r"no space left on the device of .*checkpoints while writing .*iter_0000002.incomplete; "
                                      r"the previous checkpoint stays the latest \(step 1\)"):
        main([*TINY, "--steps", "3", "--save-interval", "1", "--run-dir", str(run_dir)])
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / "latest").read_text() == "1"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["iter_0000001", "latest"]
