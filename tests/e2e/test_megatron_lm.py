"""Megatron-LM's own training loop (`megatron.training.pretrain`, examples/pretrain_dsv3.py) on
CPU processes (torchrun, gloo), with Megatron's optimizer, evaluation and checkpoints.

Three layouts, each trained for 6 iterations with evaluation every 3 and a checkpoint at 3
and 6, then resumed from the checkpoint at 3 into a second directory:
  - PP = 1 on one process;
  - DualPipeV, PP = 2, on two processes, with the chunks initialised like the
    single-process model (`--dsv3-init-as-single-process`);
  - DP = 2 with the distributed optimizer (`--use-distributed-optimizer`, ZeRO-1).
Checked, for each layout: the resumed run's weights at iteration 6 equal the uninterrupted
run's bit for bit (every tensor of the model, expert biases included), and so do its
iteration-4 loss and its evaluation loss at 6. DualPipeV also against the compact loop
(python -m megatron_dsv3.training) on the same model, data and seed: the compact loop's
DualPipeV run of tests/e2e/conftest.py (shared with test_train_pipeline.py), its training
losses and its validation loss after step 3 (Megatron-LM's `evaluate` of the same first
validation batch after iteration 3, the compact loop's `--eval-interval`). Not bit for bit:
clipping at 1.0 is active at every step of these runs, and Megatron's `get_grad_norm_fp32`
(the norm of the per-tensor norms) and the compact loop's `clip_grad_norm_` (the root of the
summed squares) round differently. With clipping inactive in both (--clip-grad 1e9) the final
weights were measured bit-identical, all 250 tensors; the bounds below cover the rounding.

Megatron-LM prints a loss with 7 significant digits, and the first iteration of a run is
logged without resetting its sums, so the next line is the mean of both (`training_log`'s
`should_reset`): iteration 2 of a fresh run and iteration 4 of a resumed one (from 3) are
such means, and are undone before comparing.
"""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import compact_loop as compact
import pytest
import torch
from slurm_scripts import PRETRAIN

from megatron_dsv3.config import preset
from megatron_dsv3.convert.hf import load_mcore_tensors
from megatron_dsv3.training.data import build_indexed_corpus

pytestmark = pytest.mark.slow

ITERATIONS, SAVE_AT = compact.STEPS, compact.STEPS // 2


def _flags(corpus_prefix: str, processes: int, pipeline: list[str]) -> list[str]:
    """The compact loop's runs (tests/e2e/compact_loop.py), as Megatron-LM flags."""
    data_parallel = processes // (2 if pipeline else 1)
    return [
        "--dsv3-preset", "tiny", "--num-layers", str(compact.NUM_LAYERS),
        "--seq-length", str(compact.SEQ_LENGTH), "--max-position-embeddings", str(compact.SEQ_LENGTH),
        "--micro-batch-size", str(compact.MICRO_BATCH),
        "--global-batch-size", str(compact.MICRO_BATCH * compact.MICROBATCHES * data_parallel),
        "--train-iters", str(ITERATIONS), "--eval-interval", str(SAVE_AT), "--eval-iters", "1",
        "--lr", "3e-3", "--min-lr", "3e-4", "--lr-warmup-iters", "1", "--lr-decay-style", "cosine",
        "--weight-decay", "0.1", "--adam-beta1", "0.9", "--adam-beta2", "0.95", "--clip-grad", "1.0", "--seed", str(compact.SEED),
        "--data-path", corpus_prefix, "--split", "98,2,0", "--tokenizer-type", "NullTokenizer", "--vocab-size", "256",
        "--num-workers", "0", "--distributed-backend", "gloo", "--log-interval", "1",
        "--no-bias-swiglu-fusion", "--no-bias-dropout-fusion", "--dsv3-init-as-single-process",
        "--save-interval", str(SAVE_AT), *pipeline,
    ]


def _pretrain(processes: int, flags: list[str], log: Path) -> str:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes), str(PRETRAIN), *flags]
    result = subprocess.run(command, capture_output=True, text=True, env=compact.child_env(), timeout=600)
    log.write_text(result.stdout + result.stderr)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return result.stdout


def _train_losses(output: str) -> dict[int, float]:
    return {int(m.group(1)): float(m.group(2)) for m in re.finditer(r"iteration\s+(\d+)/\s*\d+ \|.*? lm loss: ([0-9.E+-]+)", output)}


def _eval_loss(output: str, iteration: int) -> float:
    return float(re.search(rf"validation loss at iteration {iteration} \| lm loss value: ([0-9.E+-]+)", output).group(1))


def _weights(checkpoint: Path, config) -> dict[str, torch.Tensor]:
    return load_mcore_tensors(checkpoint, config)


LAYOUTS = {
    "pp1": (1, []),
    "dualpipev_pp2": (2, ["--pipeline-model-parallel-size", "2", "--pipeline-schedule", "dualpipev"]),
    "dp2_distributed_optimizer": (2, ["--use-distributed-optimizer"]),
}


@pytest.fixture(scope="module", params=LAYOUTS)
def trained(request, compact_runs):
    """One layout's uninterrupted run and its resume from iteration 3."""
    processes, pipeline = LAYOUTS[request.param]
    root = compact_runs / f"megatron_lm_{request.param}"
    corpus = build_indexed_corpus(compact_runs / ".corpus-cache", compact.CORPUS_BYTES)
    flags = _flags(corpus, processes, pipeline)
    full = _pretrain(processes, [*flags, "--save", str(root / "full")], root.with_suffix(".full.log"))
    resume_from = root / "resume-from"
    shutil.copytree(root / "full" / f"iter_{SAVE_AT:07d}", resume_from / f"iter_{SAVE_AT:07d}")
    (resume_from / "latest_checkpointed_iteration.txt").write_text(str(SAVE_AT))
    resumed = _pretrain(processes, [*flags, "--load", str(resume_from), "--save", str(root / "resumed")], root.with_suffix(".resumed.log"))
    return request.param, root, full, resumed


def _config():
    return preset("tiny", num_layers=compact.NUM_LAYERS, seq_length=compact.SEQ_LENGTH)


def test_a_resumed_run_ends_with_the_uninterrupted_weights(trained):
    layout, root, full, resumed = trained
    final = f"iter_{ITERATIONS:07d}"
    ours, theirs = _weights(root / "resumed" / final, _config()), _weights(root / "full" / final, _config())
    assert ours.keys() == theirs.keys() and any("expert_bias" in k for k in ours)
    differing = [k for k in ours if not torch.equal(ours[k], theirs[k])]
    assert not differing, f"{layout}: {len(differing)} tensors differ after resuming, e.g. {differing[:3]}"
    losses_full, losses_resumed = _train_losses(full), _train_losses(resumed)
    assert losses_resumed[SAVE_AT + 1] == losses_full[SAVE_AT + 1]  # the resumed run's first logged iteration
    assert _eval_loss(resumed, ITERATIONS) == _eval_loss(full, ITERATIONS)


@pytest.mark.parametrize("trained", ["dualpipev_pp2"], indirect=True)  # the compact loop's shared run (conftest.py)
def test_megatron_lm_dualpipev_trains_like_the_compact_loop(trained, compact_runs):
    _, root, full, _ = trained
    compact_losses = {record["step"]: record["lm_loss"] for record in compact.records(compact_runs / "pp2")}
    printed = _train_losses(full)
    megatron_lm = {step: printed[step] for step in printed}
    megatron_lm[2] = 2 * printed[2] - printed[1]  # printed: the mean of iterations 1 and 2 (module note)
    differences = {step: abs(megatron_lm[step] - loss) / loss for step, loss in compact_losses.items()}
    print(f"Megatron-LM DualPipeV vs the compact loop, relative LM-loss differences per iteration: {differences}")
    assert max(differences.values()) <= 2e-6  # 7 printed digits
    compact_validation = next(record["val_lm_loss"] for record in compact.records(compact_runs / "pp2") if record["step"] == SAVE_AT)
    validation_difference = abs(_eval_loss(full, SAVE_AT) - compact_validation) / compact_validation
    print(f"validation LM loss after iteration {SAVE_AT}: relative difference {validation_difference:.1e}")
    assert validation_difference <= 2e-6
    final = f"iter_{ITERATIONS:07d}"
    ours, theirs = _weights(root / "full" / final, _config()), _weights(compact_runs / "pp2" / "checkpoints" / final, _config())
    relative = {k: float((ours[k] - theirs[k]).abs().max() / theirs[k].abs().max().clamp(min=1e-30)) for k in theirs}
    identical = sum(torch.equal(ours[k], theirs[k]) for k in theirs)
    print(f"final weights: {identical}/{len(theirs)} bit-identical, largest relative difference {max(relative.values()):.2e}")
    assert max(relative.values()) <= 1e-5
