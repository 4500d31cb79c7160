"""`python -m megatron_dsv3.training`, except that global rank 1 stops itself (SIGSTOP: alive,
sockets open, answering nothing) as it enters its STOP_AT_CALL-th all-to-all of the run (an
expert-parallel dispatch or combine, issued by overlap/link.py): its peer is then blocked in
the matching all-to-all. Run under torchrun by tests/e2e/test_train_reliability.py."""

import os
import signal
import sys

import torch

from megatron_dsv3.training.__main__ import main

STOP_AT_CALL = 7  # past the first forward: model building and the first dispatch are done
_all_to_all = torch.distributed.all_to_all_single
_calls = []


def _stop_then_all_to_all(*args, **kwargs):
    _calls.append(None)
    if len(_calls) == STOP_AT_CALL and os.environ["RANK"] == "1":
        print("rank 1: stopping itself in an all-to-all", flush=True)
        os.kill(os.getpid(), signal.SIGSTOP)
    return _all_to_all(*args, **kwargs)


if __name__ == "__main__":
    torch.distributed.all_to_all_single = _stop_then_all_to_all  # overlap/link.py looks it up per call
    sys.exit(main(sys.argv[1:]))
