"""One gloo process group and Megatron's parallel state for the single-process tests."""

import pytest
import torch
from megatron.core import parallel_state

from megatron_dsv3 import cpu
from megatron_dsv3.distributed import init_distributed


@pytest.fixture(scope="session", autouse=True)
def megatron_on_this_process():
    init_distributed()
    cpu.enable()
    yield
    parallel_state.destroy_model_parallel()


@pytest.fixture
def seeded():
    torch.manual_seed(0)
    from megatron.core import tensor_parallel

    tensor_parallel.random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
