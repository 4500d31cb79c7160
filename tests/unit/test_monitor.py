"""MetricsLog's optional TensorBoard output: which tags and values a step's record becomes."""

import builtins
import json
import sys
import types

import pytest

from megatron_dsv3.training import monitor
from megatron_dsv3.training.monitor import MetricsLog

RECORD = {
    "step": 7,
    "lr": 1e-3,
    "gamma": 0.001,
    "mtp_lambda": 0.3,
    "grad_norm": 0.5,
    "lm_loss": 2.5,
    "mtp_loss": 2.75,
    "expert_load": {
        "decoder.layers.1.mlp": {"tokens_per_expert": [3, 0, 5, 4], "max_violation": 0.667},
        "decoder.layers.2.mlp": {"tokens_per_expert": [2, 4, 2, 4], "max_violation": 0.333},
    },
    "max_violation": 0.5,
}


class FakeSummaryWriter:
    def __init__(self, log_dir, purge_step=None):
        self.log_dir = log_dir
        self.scalars, self.histograms, self.closed = {}, {}, False

    def add_scalar(self, tag, value, step):
        self.scalars[tag] = (value, step)

    def add_histogram_raw(self, tag, global_step, **histogram):
        self.histograms[tag] = (histogram, global_step)

    def flush(self):
        pass

    def close(self):
        self.closed = True


@pytest.fixture
def fake_tensorboard(monkeypatch):
    module = types.ModuleType("torch.utils.tensorboard")
    module.SummaryWriter = FakeSummaryWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", module)


@pytest.fixture
def tensorboard_not_installed(monkeypatch):
    real_import = builtins.__import__

    def import_without_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard") or name.startswith("tensorboard"):
            raise ModuleNotFoundError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "torch.utils.tensorboard", raising=False)
    monkeypatch.setattr(builtins, "__import__", import_without_tensorboard)


@pytest.mark.parametrize("tensorboard", [True, "auto"])
def test_each_record_becomes_scalars_and_a_tokens_per_expert_histogram_per_layer(tmp_path, fake_tensorboard, tensorboard):
    log = MetricsLog(tmp_path, tensorboard=tensorboard)
    log.write(RECORD)
    writer = log.tensorboard
    assert writer.log_dir == str(tmp_path / "tensorboard")
    assert writer.scalars == {
        "lr": (1e-3, 7), "gamma": (0.001, 7), "mtp_lambda": (0.3, 7), "grad_norm": (0.5, 7),
        "lm_loss": (2.5, 7), "mtp_loss": (2.75, 7), "max_violation": (0.5, 7),
        "max_violation/decoder.layers.1.mlp": (0.667, 7), "max_violation/decoder.layers.2.mlp": (0.333, 7),
    }
    histogram, step = writer.histograms["tokens_per_expert/decoder.layers.1.mlp"]
    assert step == 7
    # one bucket per expert index, its count the expert's tokens
    assert histogram == {
        "min": 0, "max": 3, "num": 12, "sum": 0 * 3 + 2 * 5 + 3 * 4, "sum_squares": 4 * 5 + 9 * 4,
        "bucket_limits": [0.5, 1.5, 2.5, 3.5], "bucket_counts": [3, 0, 5, 4],
    }
    assert set(writer.histograms) == {"tokens_per_expert/decoder.layers.1.mlp", "tokens_per_expert/decoder.layers.2.mlp"}
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == RECORD
    log.close()
    assert writer.closed


def test_records_without_moe_layers_or_max_violation_write_the_numbers_only(tmp_path, fake_tensorboard):
    log = MetricsLog(tmp_path, tensorboard=True)
    log.write({"step": 1, "lm_loss": 3.0, "expert_load": {}, "max_violation": None})
    assert log.tensorboard.scalars == {"lm_loss": (3.0, 1)}
    assert log.tensorboard.histograms == {}


def test_tensorboard_true_without_the_package_raises_with_the_fix(tmp_path, tensorboard_not_installed):
    with pytest.raises(ImportError, match="Fix: pip install tensorboard"):
        MetricsLog(tmp_path, tensorboard=True)


def test_auto_without_the_package_logs_jsonl_only(tmp_path, tensorboard_not_installed, caplog):
    with caplog.at_level("INFO", logger=monitor.__name__):
        log = MetricsLog(tmp_path)  # the default is "auto"
    assert log.tensorboard is None
    assert "tensorboard is not installed" in caplog.text
    log.write(RECORD)
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == RECORD


def test_tensorboard_false_writes_no_events(tmp_path, fake_tensorboard):
    assert MetricsLog(tmp_path, tensorboard=False).tensorboard is None


def test_bad_tensorboard_value_raises(tmp_path):
    with pytest.raises(ValueError, match="tensorboard='yes'"):
        MetricsLog(tmp_path, tensorboard="yes")
