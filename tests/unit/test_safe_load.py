"""Loading a checkpoint never runs code from it (megatron_dsv3/safe_load.py).

Crafted checkpoints, each holding a pickle whose `__reduce__` would create a marker file: as
`.metadata` (which torch reads with `pickle.load`), and as a non-tensor item, a ShardedObject's
data or a value of the common state (which torch reads with `torch.load(weights_only=False)`). Reference: in a fresh interpreter without
`safe_load`, Megatron's `dist_checkpointing.load` of each does create the marker. Through every
entry point of ours (resume, the converter's loader, Megatron's load after `install()`) it is
refused with an error naming the file or item, and the marker never appears.
"""

import pathlib
import pickle
import subprocess
import sys

import pytest
import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor

from megatron_dsv3 import safe_load
from megatron_dsv3.config import preset
from megatron_dsv3.convert.hf import load_mcore_tensors
from megatron_dsv3.training import checkpoint


class _Payload:
    """Unpickled, it would create `marker` (what an attacker's code would do)."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def _state(obj) -> dict:
    return {
        "weight": ShardedTensor.from_rank_offsets("weight", torch.arange(4.0)),
        "extra": ShardedObject("extra", obj, (1,), (0,), replica_id=0),
    }


def _template() -> dict:
    return _state(None)


@pytest.fixture
def crafted(tmp_path):
    """{"metadata": dir, "object": dir, "common": dir} and the marker each would create: the
    payload as `.metadata`, as a ShardedObject's data, as a value of the common state."""
    marker = tmp_path / "marker"
    directories = {where: tmp_path / where for where in ("metadata", "object", "common")}
    for directory in directories.values():
        directory.mkdir()
    dist_checkpointing.save(_state({"plain": 1}), str(directories["metadata"]))
    (directories["metadata"] / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    dist_checkpointing.save(_state(_Payload(marker)), str(directories["object"]))  # pickled on save, not run
    dist_checkpointing.save({**_state({"plain": 1}), "run": _Payload(marker)}, str(directories["common"]))
    assert not marker.exists()
    return directories, marker


_UNPROTECTED_LOAD = """
import sys, torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor
from megatron_dsv3.distributed import init_distributed
init_distributed()
try:
    dist_checkpointing.load({"weight": ShardedTensor.from_rank_offsets("weight", torch.empty(4)),
                             "extra": ShardedObject("extra", None, (1,), (0,), replica_id=0)}, sys.argv[1])
except BaseException:  # torch's CheckpointException is a BaseException
    pass  # the payload ran (or not) during unpickling; what follows does not matter
"""


@pytest.mark.parametrize("where", ["metadata", "object", "common"])
def test_the_crafted_checkpoint_runs_code_without_safe_load(crafted, where):
    """The reference: torch's own readers run the payload."""
    directories, marker = crafted
    subprocess.run([sys.executable, "-c", _UNPROTECTED_LOAD, str(directories[where])], check=True, capture_output=True,
                   timeout=300, env={"PATH": "", "OMP_NUM_THREADS": "1"})
    assert marker.exists()


@pytest.mark.parametrize("where, message", [
    ("metadata", "/metadata/.metadata: names pathlib.Path.touch"),
    ("object", "/object: checkpoint item 'extra/shard_0_1'"),
    ("common", "/common: checkpoint item 'common_state"),
])
def test_megatrons_load_after_install_refuses_it(crafted, where, message):
    """What Megatron-LM's --load calls once launch.runtime.prepare has installed the loaders."""
    directories, marker = crafted
    with pytest.raises(safe_load.UnsafeCheckpointError, match="could run code") as error:
        with safe_load.reading(directories[where]):
            dist_checkpointing.load(_template(), str(directories[where]))
    assert message in str(error.value)
    assert not marker.exists()


@pytest.mark.parametrize("where", ["metadata", "common"])  # before the model's state is read
def test_resume_refuses_it(crafted, tmp_path, where):
    directories, marker = crafted
    root = tmp_path / "run" / "checkpoints"
    root.mkdir(parents=True)
    directories[where].rename(checkpoint.step_dir(root, 1))
    (root / checkpoint.LATEST).write_text("1")
    with pytest.raises(safe_load.UnsafeCheckpointError, match=str(checkpoint.step_dir(root, 1))):
        checkpoint.load(root, state=None, run={})
    assert not marker.exists()


def test_the_converters_loader_refuses_it(crafted):
    directories, marker = crafted
    with pytest.raises(safe_load.UnsafeCheckpointError, match=r"\.metadata: names pathlib.Path.touch"):
        load_mcore_tensors(directories["metadata"], preset("tiny"))
    assert not marker.exists()


def test_an_honest_checkpoint_loads_the_same(tmp_path):
    dist_checkpointing.save(_state({"step": 3, "rng": torch.get_rng_state()}), str(tmp_path))
    with safe_load.reading(tmp_path):
        loaded = dist_checkpointing.load(_template(), str(tmp_path))
    assert torch.equal(loaded["weight"], torch.arange(4.0))
    assert loaded["extra"]["step"] == 3 and torch.equal(loaded["extra"]["rng"], torch.get_rng_state())


# --- a checkpoint that cannot be read is named in one line (issue 11, item 7)


def test_a_latest_that_is_not_a_step_is_named(tmp_path):
    (tmp_path / checkpoint.LATEST).write_text("iter_3\n")
    with pytest.raises(safe_load.CheckpointReadError, match=r"latest: holds 'iter_3', not a step number"):
        checkpoint.load(tmp_path, state=None, run={})


def test_a_latest_that_names_a_missing_step_is_named(tmp_path):
    checkpoint.step_dir(tmp_path, 1).mkdir()
    (tmp_path / checkpoint.LATEST).write_text("5")
    with pytest.raises(safe_load.CheckpointReadError, match=r"names step 5, but .*iter_0000005 does not exist.*one of \[1\]"):
        checkpoint.load(tmp_path, state=None, run={})


@pytest.mark.parametrize("damaged, message", [
    ("__0_0.distcp", "could not be read, a file in it is truncated or corrupted"),
    (".metadata", ".metadata: not a readable checkpoint index"),
])
def test_a_truncated_checkpoint_file_is_named(tmp_path, damaged, message):
    dist_checkpointing.save(_state({"plain": 1}), str(tmp_path))
    path = tmp_path / damaged
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(safe_load.CheckpointReadError, match=message) as error:
        with safe_load.reading(tmp_path):
            dist_checkpointing.load(_template(), str(tmp_path))
    assert str(tmp_path) in str(error.value) and "\n" not in str(error.value)
