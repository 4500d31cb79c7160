"""The compact loop's validation (`--eval-interval`) against a forward of the model computed here.

In this process (tests/conftest.py's process group): a 2-layer tiny model (a dense layer, an MoE
layer, MTP) trains 2 steps with an EMA, evaluating after each on 2 global batches. The record
of step 2 must equal, within 1e-6 relative, a fresh GPTModel holding the run's final weights
(then its EMA's averages) run here on the split's first 4 micro-batches, read from the dataset
by index: the token-mean LM loss, exp of it, and the MTP loss as Megatron's training-mode
forward tracks it (each micro-batch's token mean, averaged). A second run without evaluation
or EMA must log the same training numbers bit for bit: an evaluation changes nothing of the run.
"""

import math

import compact_loop as compact
import pytest
import torch
from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

from megatron_dsv3.config import preset
from megatron_dsv3.specs import gpt_model
from megatron_dsv3.training import loop
from megatron_dsv3.training.data import build_datasets
from megatron_dsv3.training.loop import TrainArgs, train

pytestmark = pytest.mark.slow

SEQ, MICRO_BATCH, MICROBATCHES, EVAL_ITERS, STEPS, CORPUS_BYTES = 32, 2, 2, 2, 2, 1_000_000
OVERRIDES = {"num_layers": 2, "seq_length": SEQ}


def _args(run_dir, **evaluation) -> TrainArgs:
    return TrainArgs(preset="tiny", overrides=dict(OVERRIDES), steps=STEPS, micro_batch_size=MICRO_BATCH,
                     num_microbatches=MICROBATCHES, warmup_steps=0, corpus_bytes=CORPUS_BYTES, run_dir=run_dir,
                     progress=False, seed=3, **evaluation)


def _reference(model: torch.nn.Module, microbatches: list[dict], mtp_depths: int) -> dict:
    """LM loss (token mean), perplexity and MTP loss of `model` on `microbatches`: Megatron's
    forward in training mode (where it tracks the MTP loss) without grad (no router counts)."""
    model.train()
    MTPLossLoggingHelper.clean_metrics_in_tracker()
    loss_sum, tokens = 0.0, 0.0
    with torch.no_grad():
        for batch in microbatches:
            per_token = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"], loss_mask=batch["loss_mask"])
            loss_sum += float((per_token * batch["loss_mask"]).sum())
            tokens += float(batch["loss_mask"].sum())
    mtp = float(MTPLossLoggingHelper.tracker["loss_values"].sum()) / (len(microbatches) * mtp_depths)
    MTPLossLoggingHelper.clean_metrics_in_tracker()
    return {"lm_loss": loss_sum / tokens, "ppl": math.exp(loss_sum / tokens), "mtp_loss": mtp}


def test_the_validation_record_is_the_models_forward_on_the_first_validation_batches(tmp_path, monkeypatch):
    runs = []
    build = loop._build
    monkeypatch.setattr(loop, "_build", lambda *a: runs.append(build(*a)) or runs[-1])  # keep the run's model and EMA
    summary = train(_args(tmp_path / "run", ema_decay=0.5, eval_interval=1, eval_iters=EVAL_ITERS))
    records = compact.records(tmp_path / "run")
    assert [sorted(k for k in r if "val_" in k) for r in records] == [sorted(
        ["val_lm_loss", "val_ppl", "val_mtp_loss", "ema_val_lm_loss", "ema_val_ppl", "ema_val_mtp_loss"])] * STEPS
    (run,) = runs

    global_batch = MICRO_BATCH * MICROBATCHES
    _, valid = build_datasets(tmp_path / ".corpus-cache", SEQ, STEPS * global_batch, EVAL_ITERS * global_batch, 3, CORPUS_BYTES)
    samples = [valid[i] for i in range(EVAL_ITERS * global_batch)]
    microbatches = [torch.utils.data.default_collate(samples[i:i + MICRO_BATCH]) for i in range(0, len(samples), MICRO_BATCH)]
    config = preset("tiny", **OVERRIDES)
    model = gpt_model(config)
    model.load_state_dict(run.chunks[0].module.state_dict())  # the weights after the last step
    want = _reference(model, microbatches, config.mtp_num_layers)
    averages = run.ema.state_dict()["averages"]
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(averages[name])
    want_ema = _reference(model, microbatches, config.mtp_num_layers)

    last = records[-1]
    assert {key: last[f"val_{key}"] for key in want} == pytest.approx(want, rel=1e-6)
    assert {key: last[f"ema_val_{key}"] for key in want_ema} == pytest.approx(want_ema, rel=1e-6)
    assert summary["final_val_step"] == STEPS and summary["final_val_ppl"] == last["val_ppl"]
    assert summary["final_ema_val_ppl"] == last["ema_val_ppl"]

    train(_args(tmp_path / "plain"))
    assert compact.records(tmp_path / "plain") == [{k: v for k, v in r.items() if "val_" not in k} for r in records]
