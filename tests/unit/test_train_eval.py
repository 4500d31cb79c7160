"""The compact loop's validation flags are checked before any work, each error naming the flag,
the value and the fix; the summary and loss.png read the records' validation fields (the
evaluation itself: tests/e2e/test_train_validation.py)."""

import math

import pytest

from megatron_dsv3.training.loop import TrainArgs, train
from megatron_dsv3.training.metrics import perplexity, summarize
from megatron_dsv3.training.monitor import plot_losses


@pytest.mark.parametrize("flags, message", [
    ({"eval_interval": -1}, r"eval_interval=-1: must be >= 0 \(0: no evaluation\). Fix: pass e.g. --eval-interval 20"),
    ({"eval_interval": 5, "eval_iters": 0}, r"eval_iters=0 with eval_interval=5: .* Fix: pass --eval-iters 1 or more"),
    ({"eval_interval": 5, "data_path": ["corpus_text_document"], "tokenizer": "tokenizer.json"},
     r"eval_interval=5 with --data-path: .* holds none out for validation .* Fix: leave out --eval-interval, or evaluate "
     r"with Megatron-LM's loop \(examples/pretrain_dsv3.py --data-path ... --split 99,1,0 --eval-interval N\)"),
])
def test_bad_evaluation_flags_are_refused(flags, message):
    with pytest.raises(ValueError, match=message):
        TrainArgs(**flags)


def test_no_evaluation_needs_no_eval_iters():
    TrainArgs(eval_interval=0, eval_iters=0)


def test_more_validation_batches_than_the_split_holds_are_refused_before_the_model(tmp_path, monkeypatch):
    from megatron_dsv3.training import loop

    monkeypatch.setattr(loop, "_build", lambda *a: pytest.fail("the model was built"))
    args = TrainArgs(steps=2, warmup_steps=0, micro_batch_size=2, num_microbatches=2, overrides={"seq_length": 32},
                     corpus_bytes=1_000_000, eval_interval=1, eval_iters=300, run_dir=tmp_path / "run", progress=False)
    # the 1 MB corpus holds out 1 document of 33386 tokens: (33386 - 1) // 32 = 1043 sequences
    with pytest.raises(ValueError, match=r"eval_iters=300: 300 global batches of 4 sequences are 1200 validation sequences "
                                         r"of seq_length 32, and the validation split \(the corpus's held-out 1 document\(s\), "
                                         r"33386 tokens\) holds 1043. Fix: lower --eval-iters to 260 or less, or raise --corpus-bytes"):
        train(args)


def test_the_summary_ends_with_the_last_evaluation_and_the_plot_draws_it(tmp_path):
    records = [{"step": step, "lm_loss": 5.0 - step, "max_violation": 1.0} for step in range(1, 5)]
    records[1].update(val_lm_loss=3.5, val_ppl=math.exp(3.5), val_mtp_loss=3.6)
    records[3].update(val_lm_loss=1.5, val_ppl=math.exp(1.5), val_mtp_loss=1.6, ema_val_lm_loss=2.5, ema_val_ppl=math.exp(2.5))
    summary = summarize(records)
    assert {key: value for key, value in summary.items() if "val" in key} == {
        "final_val_step": 4, "final_val_lm_loss": 1.5, "final_val_ppl": math.exp(1.5), "final_val_mtp_loss": 1.6,
        "final_ema_val_lm_loss": 2.5, "final_ema_val_ppl": math.exp(2.5)}
    assert not any("val" in key for key in summarize(records[:1]))  # no evaluation, no validation fields
    plot_losses(records, tmp_path / "loss.png")
    assert (tmp_path / "loss.png").stat().st_size > 10_000
    assert perplexity(2.0) == math.exp(2.0) and perplexity(1e4) == math.inf
