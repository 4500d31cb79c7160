"""Expert parallelism in the compact loop (torchrun, gloo, Megatron's alltoall dispatcher)
against the single-process run of the same model, data and seed (tests/e2e/compact_loop.py;
the pipelined layouts with EP are in test_train_pipeline.py).

  - EP=2 on 2 processes (each rank holds 4 of the 8 experts; the dense part is data parallel)
    and EP=2 x expert-DP=2 on 4 (each expert on two ranks, its gradient summed over them);
  - per step: the LM and MTP losses within 1e-6 relative (the data-parallel replicas add their
    losses and gradients in another order than one process does), and every MoE layer's tokens
    per expert, which route the bias update, equal; so are the validation losses after steps 3
    and 6 (forward only, each replica its half of the batch, the experts split);
  - after the last step, from the checkpoints (each expert written once, by global index): the
    expert biases bit-identical (the sign rule on equal loads), and every parameter within
    1e-4 relative of the single process's (6 AdamW steps on gradients that agree to ~1e-7).
"""

import pytest
import torch
from compact_loop import EVALUATED, NUM_LAYERS, SEQ_LENGTH, STEPS, losses
from compact_loop import records as _records
from compact_loop import run as _run

from megatron_dsv3.config import moe_layer_pattern, preset
from megatron_dsv3.convert import load_mcore_tensors

pytestmark = pytest.mark.slow


CONFIG = preset("tiny", num_layers=NUM_LAYERS, seq_length=SEQ_LENGTH)


def _final_weights(run_dir) -> dict[str, torch.Tensor]:
    return load_mcore_tensors(run_dir / "checkpoints" / f"iter_{STEPS:07d}", CONFIG)


@pytest.mark.parametrize("processes", [2, 4])
def test_expert_parallel_trains_like_the_single_process(compact_runs, processes, tmp_path):
    run_dir = tmp_path / f"ep2_dp{processes}"
    _run(run_dir, processes, "--ep", "2", "--num-microbatches", str(8 // processes), "--save-interval", str(STEPS))
    reference, parallel = _records(compact_runs / "single"), _records(run_dir)
    assert [r["step"] for r in parallel] == list(range(1, STEPS + 1))
    assert [r["step"] for r in parallel if "val_lm_loss" in r] == EVALUATED
    for want, got in zip(reference, parallel):
        assert losses(got) == pytest.approx(losses(want), rel=1e-6), got["step"]
        assert got["expert_load"] == want["expert_load"], got["step"]

    want, got = _final_weights(compact_runs / "single"), _final_weights(run_dir)
    assert want.keys() == got.keys()
    biases = [key for key in want if key.endswith("router.expert_bias")]
    assert len(biases) == sum(moe_layer_pattern(CONFIG)) + CONFIG.mtp_num_layers
    for key in biases:
        assert torch.equal(got[key], want[key]), key
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-6, msg=key)
