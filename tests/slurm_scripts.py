"""examples/slurm/*.sbatch as the tests read them: what each passes to examples/pretrain_dsv3.py."""

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PRETRAIN = REPO / "examples" / "pretrain_dsv3.py"
SBATCH = {path.stem: path for path in sorted((REPO / "examples" / "slurm").glob("*.sbatch"))}


def script_launch(name: str, workdir: Path, *extra: str, env: dict | None = None) -> tuple[int, str, str, list[str]]:
    """`DRY_RUN=1 bash <script> <extra>` with a stand-in interpreter that records what it is
    given: the world size, the rank, the GPUs per node and the flags of examples/pretrain_dsv3.py
    (--dry-run first)."""
    recorder = workdir / "python"
    recorder.write_text('#!/bin/sh\necho "$WORLD_SIZE $RANK $LOCAL_WORLD_SIZE"\nprintf "%s\\n" "$@"\n')
    recorder.chmod(0o755)
    env = {**os.environ, **(env or {}), "DRY_RUN": "1", "PYTHON": str(recorder)}
    run = subprocess.run(["bash", str(SBATCH[name]), *extra], env=env, cwd="/", capture_output=True, text=True, check=True)
    banner, environment, script, *argv = run.stdout.splitlines()
    assert banner.startswith(f"dry run of {name}.sbatch") and Path(script) == PRETRAIN
    world_size, rank, gpus_per_node = environment.split()
    return int(world_size), rank, gpus_per_node, argv
