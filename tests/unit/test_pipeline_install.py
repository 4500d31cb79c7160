"""install("dualpipev" | "dualpipe") makes Megatron's get_forward_backward_func pick ours when P > 1."""

import argparse
import sys
import types

import megatron.core.pipeline_parallel as pipeline_parallel
import pytest
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import schedules

from megatron_dsv3.pipeline import install as installer
from megatron_dsv3.pipeline.registry import SCHEDULES

MEGATRON_FUNC = schedules.get_forward_backward_func
forward_backward_dualpipev = SCHEDULES["dualpipev"].forward_backward_func
forward_backward_dualpipe = SCHEDULES["dualpipe"].forward_backward_func


@pytest.fixture
def pipeline_size(monkeypatch):
    """Set Megatron's pipeline size (no virtual pipeline); uninstall afterwards."""
    sizes = {"pp": 1}
    monkeypatch.setattr(parallel_state, "get_pipeline_model_parallel_world_size", lambda: sizes["pp"])
    monkeypatch.setattr(parallel_state, "get_virtual_pipeline_model_parallel_world_size", lambda: None)
    yield sizes
    installer.uninstall()


def _chosen():
    return [pipeline_parallel.get_forward_backward_func(), schedules.get_forward_backward_func()]


@pytest.mark.parametrize("name, executor", [("dualpipev", forward_backward_dualpipev), ("dualpipe", forward_backward_dualpipe)])
def test_install_picks_ours_only_for_pipelines_and_uninstall_restores(pipeline_size, name, executor):
    pipeline_size["pp"] = 2
    assert _chosen() == [schedules.forward_backward_pipelining_without_interleaving] * 2
    installer.install(name)
    installer.install(name)  # idempotent
    assert _chosen() == [executor] * 2
    assert schedules.get_forward_backward_func(pp_size=4, vp_size=None) is executor
    pipeline_size["pp"] = 1
    assert _chosen() == [schedules.forward_backward_no_pipelining] * 2
    installer.uninstall()
    installer.uninstall()  # idempotent
    assert pipeline_parallel.get_forward_backward_func is MEGATRON_FUNC and schedules.get_forward_backward_func is MEGATRON_FUNC
    pipeline_size["pp"] = 2
    assert _chosen() == [schedules.forward_backward_pipelining_without_interleaving] * 2


def test_unknown_schedules_and_virtual_pipelines_are_rejected(pipeline_size):
    for schedule in ("DualPipeV", "default", "1f1b", "zb1p"):  # 1f1b is Megatron's own; zb1p is simulated only
        with pytest.raises(ValueError, match=r"allowed: \('dualpipe', 'dualpipev'\)"):
            installer.install(schedule)
    assert schedules.get_forward_backward_func is MEGATRON_FUNC
    installer.install("dualpipev")
    with pytest.raises(ValueError, match="virtual pipeline size 2"):
        schedules.get_forward_backward_func(pp_size=2, vp_size=2)


def test_megatron_lm_training_module_is_patched_whether_imported_before_or_after(pipeline_size, monkeypatch):
    """Megatron-LM's training.py binds the name at import: patched if already imported,
    and an import after install binds DualPipeV's selector by itself."""
    pipeline_size["pp"] = 2
    before = types.ModuleType(installer._MEGATRON_LM_TRAINING)
    before.get_forward_backward_func = MEGATRON_FUNC
    monkeypatch.setitem(sys.modules, installer._MEGATRON_LM_TRAINING, before)
    installer.install("dualpipev")
    assert before.get_forward_backward_func() is forward_backward_dualpipev
    after = {}
    exec("from megatron.core.pipeline_parallel import get_forward_backward_func", after)
    assert after["get_forward_backward_func"]() is forward_backward_dualpipev
    installer.uninstall()
    assert before.get_forward_backward_func is MEGATRON_FUNC


def test_pipeline_schedule_argument():
    parser = installer.add_pipeline_schedule_args(argparse.ArgumentParser())
    assert parser.parse_args([]).pipeline_schedule == "1f1b"  # Megatron's own
    assert parser.parse_args(["--pipeline-schedule", "dualpipev"]).pipeline_schedule == "dualpipev"
    assert parser.parse_args(["--pipeline-schedule", "dualpipe"]).pipeline_schedule == "dualpipe"
    with pytest.raises(SystemExit):
        parser.parse_args(["--pipeline-schedule", "default"])
