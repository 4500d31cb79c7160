"""The first iterations of each examples/slurm/*.sbatch flag set through Megatron-LM's loop
(examples/pretrain_dsv3.py under torchrun, gloo, on 2 CPU processes), not only its parser.

Each script's own flags, as its dry run passes them (tests/slurm_scripts.py), are rewritten by
two tables and nothing else:
  - `_size`: the sizes. The tiny preset's shapes (tiny-fp8's, whose GEMMs are whole 128-wide
    tiles, where the script trains in FP8), 5 layers (2 + 3 on the two pipeline ranks of
    a pipelined script: uneven, like the scripts' own splits), the pipeline (if any) on 2 ranks,
    the rest data parallel, 2 iterations of 4 micro-batches of 1 per data-parallel rank (the
    671B script counts in samples: 8 per data-parallel rank, its warm-up and WSD decay scaled);
  - ON_CPU: each GPU-only flag with what the CPU path runs in its place (the rules of
    `config.check_runs_on_cpu`; the launch rejects the GPU flag on CPU, naming it).
Every other flag runs as the script gives it: the schedule (DualPipeV), the distributed optimizer,
selective recompute, the learning-rate shape (cosine, WSD), mock data, `--eval-iters 0`, and the
checkpoint directory for `--save` and `--load` (empty: a fresh start).
"""

import math
import re
import subprocess
import sys

import compact_loop as compact
import pytest
from slurm_scripts import PRETRAIN, SBATCH, script_launch

pytestmark = pytest.mark.slow

PROCESSES, LAYERS, MICROBATCHES = 2, 5, 4


def _size(data_parallel: int, fp8: bool) -> dict[str, list[str]]:
    samples = MICROBATCHES * data_parallel  # one iteration's
    return {
        "--dsv3-preset": ["tiny-fp8" if fp8 else "tiny"],
        "--pipeline-model-parallel-size": [str(PROCESSES)],
        "--decoder-first-pipeline-num-layers": ["2"], "--decoder-last-pipeline-num-layers": ["3"],
        "--expert-model-parallel-size": ["1"],  # one pipeline of 2 processes: no data-parallel ranks to split the experts over
        "--micro-batch-size": ["1"], "--global-batch-size": [str(samples)],
        "--train-iters": ["2"], "--lr-warmup-iters": ["1"],
        "--train-samples": [str(2 * samples)], "--lr-warmup-samples": [str(samples // 2)],
        "--lr-decay-samples": [str(2 * samples)], "--lr-wsd-decay-samples": [str(samples)],
        "--vocab-size": ["256"], "--log-interval": ["1"],
    }


# GPU-only flag: what the CPU path runs instead (None: the flag is dropped), and why.
ON_CPU = {
    "--bf16": (None, "the CPU path trains in FP32"),
    "--dsv3-fp8": (["emulate"], "TE's blockwise recipe needs a Hopper GPU; the emulated FP8 Linear quantises the same tiles"),
    "--moe-token-dispatcher-type": (["alltoall"], "the flex dispatcher runs DeepEP's CUDA kernels"),
    "--moe-flex-dispatcher-backend": (None, "DeepEP's kernels (flex dispatcher only)"),
    "--moe-flex-dispatcher-num-sms": (None, "DeepEP's kernels (flex dispatcher only)"),
    "--moe-grouped-gemm": (None, "the local experts are one MLP each (TE's grouped GEMM)"),
    "--use-precision-aware-optimizer": (None, "TE's FusedAdam keeps the BF16 moments"),
    "--exp-avg-dtype": (None, "precision-aware optimizer only"),
    "--exp-avg-sq-dtype": (None, "precision-aware optimizer only"),
}


def _groups(argv: list[str]) -> list[list[str]]:
    """[flag, its values...] per flag, in order."""
    groups = []
    for token in argv:
        if token.startswith("--"):
            groups.append([token])
        else:
            groups[-1].append(token)
    return groups


def shrunk(argv: list[str], world_size: int) -> tuple[list[str], set[str]]:
    """The script's flags (without --dry-run) for PROCESSES CPU processes, and the table rows used."""
    groups = [group for group in _groups(argv) if group[0] != "--dry-run"]
    flags = {group[0] for group in groups}
    pipeline = int(dict((g[0], g[1:]) for g in groups).get("--pipeline-model-parallel-size", ["1"])[0])
    assert world_size % pipeline == 0
    size = _size(PROCESSES // min(pipeline, PROCESSES), fp8="--dsv3-fp8" in flags)
    rows = {**{flag: values for flag, values in size.items()}, **{flag: values for flag, (values, _) in ON_CPU.items()}}
    out, used = [], set()
    for flag, *values in groups:
        if flag in rows:
            used.add(flag)
            if rows[flag] is not None:
                out += [flag, *rows[flag]]
        else:
            out += [flag, *values]
    assert "--num-layers" not in flags  # the script's preset gives it
    return [*out, "--num-layers", str(LAYERS)], used


def _iterations(output: str) -> dict[int, float]:
    return {int(m.group(1)): float(m.group(2)) for m in re.finditer(r"iteration\s+(\d+)/\s*\d+ \|.*? lm loss: ([0-9.E+-]+)", output)}


@pytest.fixture(scope="module")
def used_rows():
    return set()


@pytest.mark.parametrize("name", sorted(SBATCH))
def test_the_scripts_flags_train_their_first_iterations(name, tmp_path, used_rows):
    world_size, _, _, argv = script_launch(name, tmp_path, env={"CKPT_DIR": str(tmp_path / "checkpoints")})
    flags, used = shrunk(argv, world_size)
    used_rows.update(used)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(PROCESSES), str(PRETRAIN), *flags,
               "--distributed-backend", "gloo", "--no-bias-swiglu-fusion", "--no-bias-dropout-fusion"]
    result = subprocess.run(command, capture_output=True, text=True, env=compact.child_env(), timeout=600)
    (tmp_path / "log").write_text(result.stdout + result.stderr)
    assert result.returncode == 0, f"{name}: {' '.join(flags)}\n" + (result.stdout + result.stderr)[-4000:]
    losses = _iterations(result.stdout)
    assert sorted(losses) == [1, 2] and all(math.isfinite(loss) and 0 < loss < 10 for loss in losses.values()), losses
    assert "successfully saved checkpoint from iteration       2" in result.stdout


def test_every_table_row_is_a_flag_of_some_script(used_rows):
    """Runs after the launches: a row no script passes is a stale one."""
    if len(used_rows) == 0:
        pytest.skip("the launches were deselected")
    unused = (set(ON_CPU) | set(_size(1, fp8=False))) - used_rows
    assert not unused, f"rows no script passes: {sorted(unused)}"
