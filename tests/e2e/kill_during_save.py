"""`python -m megatron_dsv3.training`, except that global rank 0 kills itself (SIGKILL) right
after its second checkpoint's data is written and before the save is committed: the moment
a crash would most likely leave a checkpoint that looks complete but is not.
Run under torchrun by tests/e2e/test_train_pipeline.py."""

import os
import signal
import sys

from megatron.core import dist_checkpointing

from megatron_dsv3.training.__main__ import main

KILL_AT_SAVE = 2
_write_checkpoint = dist_checkpointing.save
_saves = []


def _write_then_die(*args, **kwargs):
    result = _write_checkpoint(*args, **kwargs)
    _saves.append(None)
    if len(_saves) == KILL_AT_SAVE and os.environ["RANK"] == "0":
        os.kill(os.getpid(), signal.SIGKILL)
    return result


if __name__ == "__main__":
    dist_checkpointing.save = _write_then_die
    sys.exit(main(sys.argv[1:]))
