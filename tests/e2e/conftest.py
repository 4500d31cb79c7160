"""The compact loop's shared runs: launched once per session, read by every module that compares against them."""

import pytest

from compact_loop import STEPS, run


@pytest.fixture(scope="session")
def compact_runs(tmp_path_factory):
    """`single` (one process, a checkpoint at step 3 that test_train_pipeline resumes) and
    `pp2` (DualPipeV on 2 processes, a checkpoint at the last step, an EMA whose validation
    losses test_train_pipeline's resume reproduces). Saving and the EMA change no number."""
    root = tmp_path_factory.mktemp("compact")
    run(root / "single", 1, "--save-interval", "3")
    run(root / "pp2", 2, "--pipeline-schedule", "dualpipev", "--pp", "2", "--save-interval", str(STEPS), "--ema-decay", "0.9")
    return root
