"""The compact loop's settings and launcher, shared by the end-to-end modules that compare against
its runs (made once per session by the `compact_runs` fixture of tests/e2e/conftest.py).

Same model (tiny: MLA + MoE + MTP, 8 layers so that P = 4 has one per stage of its 2P), same
data, same seed: `python -m megatron_dsv3.training` with COMMON, on one process or under torchrun.
Every run evaluates the validation split after steps 3 and 6 (one global batch, forward only
through its own schedule): `losses` are what the layouts compare.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

STEPS, MICRO_BATCH, MICROBATCHES, NUM_LAYERS, SEQ_LENGTH, SEED, CORPUS_BYTES = 6, 2, 8, 8, 32, 7, 1_000_000
EVAL_INTERVAL = 3
COMMON = ["--steps", str(STEPS), "--micro-batch-size", str(MICRO_BATCH), "--num-microbatches", str(MICROBATCHES),
          "--warmup-steps", "1", "--set", f"num_layers={NUM_LAYERS}", "--set", f"seq_length={SEQ_LENGTH}",
          "--corpus-bytes", str(CORPUS_BYTES), "--no-progress", "--seed", str(SEED),
          "--eval-interval", str(EVAL_INTERVAL), "--eval-iters", "1"]
EVALUATED = list(range(EVAL_INTERVAL, STEPS + 1, EVAL_INTERVAL))  # the steps whose records have validation losses


def child_env() -> dict:
    """This process's environment without its rendezvous (tests/conftest.py joins one): each run makes its own."""
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return {**env, "OMP_NUM_THREADS": "1"}


def run(run_dir: Path, processes: int, *extra: str, script=None, check=True) -> subprocess.CompletedProcess:
    program = [str(script)] if script else ["-m", "megatron_dsv3.training"]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes)] if processes > 1 else [sys.executable]
    command = [*launcher, *program, *COMMON, "--run-dir", str(run_dir), *extra]
    result = subprocess.run(command, capture_output=True, text=True, env=child_env(), timeout=600)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(record: dict) -> dict:
    """A step's training LM and MTP losses, and its validation ones on the steps evaluated."""
    return {key: record[key] for key in ("lm_loss", "mtp_loss", "val_lm_loss", "val_mtp_loss") if key in record}
