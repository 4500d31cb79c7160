"""Checkpoint loading that never runs code from the checkpoint.

A dist_checkpointing checkpoint is a torch DCP directory, and two of torch's reads of it
unpickle without restriction (torch 2.9 to 2.14):
  - `FileSystemReader.read_metadata` reads `.metadata` (the index of every item) with a plain
    `pickle.load`;
  - `DefaultLoadPlanner.load_bytes` reads each non-tensor item (a ShardedObject: the common
    state with Megatron-LM's args, our RNG states and run record) with
    `torch.load(weights_only=False)`.
Both import and call whatever the file names, so a crafted checkpoint runs code in
`--resume`, in the converter and in Megatron-LM's `--load`: all of them read through
`megatron.core.dist_checkpointing.load`, whose planner derives from torch's.

`install()` replaces these two methods, for the whole process and once:
  - `.metadata` goes through an unpickler that admits only what DCP writes there: the classes
    of `torch.distributed.checkpoint.metadata` and `.planner` (dataclasses and enums),
    `filesystem._StorageInfo`, `torch.Size`, torch's dtypes,
    `torch.serialization._get_layout` (a layout by its name) and pathlib's path classes (a
    writer's checkpoint id);
  - the items go through `torch.load(weights_only=True)`, with the globals megatron-core
    registers as safe at import (`megatron.core.safe_globals`: argparse.Namespace, NumPy
    arrays, Megatron's enums, ...) and ours (`OUR_SAFE_GLOBALS`).
Anything else raises `UnsafeCheckpointError` naming the file or the item and the global,
before it is imported. The rest of each method is torch's. Every entry point that loads a
checkpoint loads inside `reading(directory)` (which installs them, checks `.metadata` first and
names the directory in an item's error): `training.checkpoint.load`, `convert.hf.load_mcore_tensors`; and
`launch.runtime.prepare` calls `install()` for Megatron-LM's own `--load`.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import pickle
import traceback

import torch
from torch.distributed.checkpoint import default_planner, filesystem, metadata, planner
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import StorageMeta

from megatron_dsv3.config import StepSchedule

# Module -> the names of it that DCP's .metadata may hold (None: every class the module defines).
ALLOWED_GLOBALS = {
    metadata.__name__: None,
    planner.__name__: None,
    filesystem.__name__: {"_StorageInfo"},
    "torch": {"Size"},
    "torch.serialization": {"_get_layout"},
    # StorageMeta.checkpoint_id, when the writer was given a path (building one runs nothing)
    "pathlib": {"Path", "PosixPath", "PurePosixPath"},
    "pathlib._local": {"Path", "PosixPath", "PurePosixPath"},  # Python 3.13's home of pathlib's classes
}


# Ours, in checkpoints beside megatron-core's: Megatron-LM saves its args, and --dsv3-gamma-schedule /
# --dsv3-lambda-schedule parse to StepSchedules (a dataclass of floats).
OUR_SAFE_GLOBALS = [StepSchedule]


class CheckpointReadError(ValueError):
    """A checkpoint that cannot be read: names the directory or file and what is wrong."""


class UnsafeCheckpointError(CheckpointReadError):
    """A checkpoint file that asks the unpickler for something DCP never writes there."""


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file, path):
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str):
        allowed = ALLOWED_GLOBALS.get(module, set())
        if allowed is None:
            found = getattr(__import__(module, fromlist=[name]), name, None)
            if isinstance(found, type) and found.__module__ == module:
                return found
        elif name in allowed or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise UnsafeCheckpointError(
            f"{self.path}: names {module}.{name}, which torch's checkpoint metadata never holds; not loaded, since "
            "unpickling it could run code. Fix: load only checkpoints written by torch.distributed.checkpoint / "
            "Megatron's dist_checkpointing, or write this one again"
        )


def _read_metadata(self, *args, **kwargs) -> metadata.Metadata:
    """torch's `FileSystemReader.read_metadata` with the restricted unpickler."""
    path = self._get_metadata_path(kwargs.get("rank"))
    with self.fs.create_stream(path, "rb") as metadata_file:
        loaded = _MetadataUnpickler(metadata_file, path).load()
    if not isinstance(loaded, metadata.Metadata):
        raise UnsafeCheckpointError(f"{path}: holds a {type(loaded).__name__}, not torch's checkpoint Metadata")
    if getattr(loaded, "storage_meta", None) is None:
        loaded.storage_meta = StorageMeta()
    loaded.storage_meta.load_id = self.load_id
    return loaded


def _load_bytes(self, read_item: planner.ReadItem, value: io.BytesIO) -> None:
    """torch's `DefaultLoadPlanner.load_bytes` with `weights_only=True`."""
    fqn = read_item.dest_index.fqn
    try:
        loaded = torch.load(value, weights_only=True)
    except pickle.UnpicklingError as error:
        lines = str(error).strip().splitlines()
        reason = next((line.strip() for line in lines if "Unsupported global" in line), lines[0])
        raise UnsafeCheckpointError(
            f"checkpoint item {fqn!r}: not loaded, since unpickling it could run code ({reason}). Fix: load only "
            "checkpoints written by torch.distributed.checkpoint / Megatron's dist_checkpointing, or write this one again"
        ) from None
    if self.flatten_state_dict:
        set_element(self.original_state_dict, self.mappings[fqn], loaded)
    else:
        self.state_dict[fqn] = loaded


@functools.cache
def install() -> None:
    """Read every DCP checkpoint in this process with the restricted loaders (module note)."""
    filesystem.FileSystemReader.read_metadata = _read_metadata
    default_planner.DefaultLoadPlanner.load_bytes = _load_bytes
    torch.serialization.add_safe_globals(OUR_SAFE_GLOBALS)


@contextlib.contextmanager
def reading(directory: str | os.PathLike):
    """`install()`, then the body's loads from `directory`: its `.metadata` is checked first
    (DCP itself would turn the error into text), and what DCP reports as a multi-rank
    traceback (`CheckpointException`: a refused item, a truncated or corrupted `.distcp`)
    becomes one line naming the directory."""
    install()
    directory = os.fspath(directory)
    reader = filesystem.FileSystemReader(directory)
    if os.path.exists(reader._get_metadata_path()):
        try:
            reader.read_metadata()
        except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError) as error:
            if isinstance(error, CheckpointReadError):
                raise
            raise CheckpointReadError(f"{reader._get_metadata_path()}: not a readable checkpoint index ({error}). Fix: "
                                      "resume from an earlier checkpoint, or write this one again") from None
    try:
        yield
    except CheckpointException as error:  # how DCP reports what a rank raised
        exceptions = [exception for exception, _ in error.failures.values()]
        unsafe = [exception for exception in exceptions if isinstance(exception, UnsafeCheckpointError)]
        if unsafe:
            raise UnsafeCheckpointError(f"{directory}: {unsafe[0]}") from None
        first = "".join(traceback.format_exception_only(type(exceptions[0]), exceptions[0])).strip().splitlines()[-1]
        raise CheckpointReadError(f"{directory}: could not be read, a file in it is truncated or corrupted ({first}). "
                                  "Fix: resume from an earlier checkpoint, or write this one again") from None
