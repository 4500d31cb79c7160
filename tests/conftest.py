"""One gloo process group and Megatron's parallel state for the single-process tests.

TorchDynamo is off for the whole suite and every process it starts (the environment is
inherited): Megatron compiles its fused functions (`jit_fuser`, the router's among them) on
their first call in each process, seconds per process, paid again by each of the suite's dozens of spawned and
torchrun processes. Every comparison here is between runs in the same mode; the compiled path
runs in `make demo`.
"""

import os

os.environ["TORCHDYNAMO_DISABLE"] = "1"  # before torch is imported (the module note)

import pytest  # noqa: E402
import torch  # noqa: E402
from megatron.core import parallel_state  # noqa: E402
from megatron.core.transformer.moe.moe_logging import destroy_moe_metrics_tracker  # noqa: E402
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler  # noqa: E402
from megatron.core.transformer.multi_token_prediction import MTPLossAutoScaler  # noqa: E402

from megatron_dsv3 import cpu  # noqa: E402
from megatron_dsv3.distributed import init_distributed  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def megatron_on_this_process():
    init_distributed()
    cpu.enable()
    yield
    parallel_state.destroy_model_parallel()


@pytest.fixture(autouse=True)
def fresh_megatron_globals():
    """Megatron's process-global state starts each test as in a fresh process: no MoE metrics
    tracker (sized by the first model that records into it, so an in-process run of one model
    size, the compact loop or generation, would leave it too small for the next test's model),
    the MoE auxiliary loss scale unset (Megatron's schedules copy a shape-[1] scale into the set
    one, which fails if a test set a 0-d one) and the MTP loss scale at its default of 1."""
    destroy_moe_metrics_tracker()
    MoEAuxLossAutoScaler.main_loss_backward_scale = None
    MTPLossAutoScaler.set_loss_scale(torch.tensor(1.0))
    yield


@pytest.fixture
def seeded():
    torch.manual_seed(0)
    from megatron.core import tensor_parallel

    tensor_parallel.random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
