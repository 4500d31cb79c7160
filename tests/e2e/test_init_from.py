"""`--init-from`: fine-tuning from HF weights, and a converted checkpoint loaded into every layout.

The reference is HF transformers' DeepseekV3ForCausalLM holding the weights (tests/hf_models.py,
saved as DeepSeek releases them): its loss on the compact loop's first global batch is the
loss the loop's first step must report (the first step's forward runs on the loaded weights).

  - One process, `--init-from` the HF directory (converted into RUN_DIR/init-from-hf), 20
    steps: step 1's LM loss equals HF's on the same batch, and training lowers it.
  - The conversion it made, `--init-from` into DualPipeV PP=2 (2 processes) and DualPipe
    PP=2 x EP=2 x DP=2 (4 processes), one step each on the same global batch: the same LM loss
    (every layout's forward on the resharded weights) and the same MTP loss and gradient norm
    (every tensor's gradient, MTP and all experts included) as the single process.
  - Megatron-LM's loop (examples/pretrain_dsv3.py) fine-tuning from the same conversion as
    README describes it, DP=2 with the distributed optimizer: iteration 1 reports HF's loss.
"""

import json
import re
import shutil
import subprocess
import sys

import compact_loop as compact
import pytest
import torch
from hf_models import OVERRIDES, release_like, tiny_hf_model
from slurm_scripts import PRETRAIN

from megatron_dsv3.config import preset
from megatron_dsv3.training.data import build_datasets, build_indexed_corpus
from megatron_dsv3.training.init_from import CONVERTED, InitFromError, resolve
from megatron_dsv3.training.loop import TrainArgs, train

pytestmark = pytest.mark.slow

SEQ, MICRO, MICROBATCHES, STEPS, CORPUS, SEED, LAYERS = 32, 2, 4, 20, 1_000_000, 7, 4  # 4 layers: a pipeline of 2P stages
SETS = [arg for field, value in OVERRIDES.items() for arg in ("--set", f"{field}={json.dumps(value)}")]


def _args(run_dir, **changes) -> TrainArgs:
    return TrainArgs(**{**dict(
        preset="tiny", overrides=dict(OVERRIDES, seq_length=SEQ, num_layers=LAYERS), steps=STEPS, micro_batch_size=MICRO,
        num_microbatches=MICROBATCHES, warmup_steps=1, lr=1e-3, corpus_bytes=CORPUS, seed=SEED, run_dir=run_dir,
        progress=False), **changes})


def _hf_loss_on_first_batch(hf_model, run_dir) -> float:
    """HF's mean token loss on the loop's first global batch (one replica: its first samples)."""
    train_set, _ = build_datasets(run_dir.parent / ".corpus-cache", SEQ, STEPS * MICRO * MICROBATCHES,
                                  MICRO * MICROBATCHES, SEED, CORPUS)
    samples = [train_set[i] for i in range(MICRO * MICROBATCHES)]
    tokens = torch.stack([torch.as_tensor(s["tokens"]) for s in samples])
    labels = torch.stack([torch.as_tensor(s["labels"]) for s in samples])
    with torch.no_grad():
        logits = hf_model(input_ids=tokens).logits.float()
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten()).item()


@pytest.fixture(scope="module")
def fine_tuned(tmp_path_factory):
    """(HF's first-batch loss, the single process's metrics, its run directory, its summary, the HF directory)."""
    hf_model = tiny_hf_model(num_hidden_layers=LAYERS)
    with torch.no_grad():  # confident logits (a random init's loss is about ln(vocab), whatever the weights)
        hf_model.lm_head.weight.mul_(32)
    hf_dir = tmp_path_factory.mktemp("hf")
    release_like(hf_model, hf_dir)
    run_dir = tmp_path_factory.mktemp("runs") / "single"
    summary = train(_args(run_dir, init_from=hf_dir))
    return _hf_loss_on_first_batch(hf_model, run_dir), compact.records(run_dir), run_dir, summary, hf_dir


def test_fine_tuning_starts_from_hf_loss_and_lowers_it(fine_tuned):
    hf_loss, records, run_dir, summary, _ = fine_tuned
    assert (run_dir / CONVERTED / "metadata.json").exists()
    assert records[0]["lm_loss"] == pytest.approx(hf_loss, rel=1e-5, abs=1e-5)
    assert summary["final_lm_loss"] < records[0]["lm_loss"] - 0.3


@pytest.mark.parametrize("processes, layout", [
    (2, ["--pipeline-schedule", "dualpipev", "--pp", "2", "--layers-per-stage", "[1,1,1,1]"]),
    (4, ["--pipeline-schedule", "dualpipe", "--pp", "2", "--layers-per-stage", "[2,2]", "--ep", "2", "--set", 'moe_token_dispatcher_type="alltoall"',
         "--num-microbatches", str(MICROBATCHES // 2)]),
], ids=["dualpipev-pp2", "dualpipe-pp2-ep2-dp2"])
def test_converted_checkpoint_in_every_layout_gives_the_single_process_step(fine_tuned, tmp_path, processes, layout):
    _, single, run_dir, _, _ = fine_tuned
    run = tmp_path / "run"
    compact.run(run, processes, "--init-from", str(run_dir / CONVERTED), *SETS, "--steps", "1", "--warmup-steps", "0",
                "--micro-batch-size", str(MICRO), "--num-microbatches", str(MICROBATCHES), "--lr", "1e-3",
                "--set", f"seq_length={SEQ}", "--set", f"num_layers={LAYERS}", *layout)
    first = compact.records(run)[0]
    for key in ("lm_loss", "mtp_loss", "grad_norm"):
        assert first[key] == pytest.approx(single[0][key], rel=1e-6), key


def test_megatron_lm_fine_tunes_from_the_converted_checkpoint(fine_tuned, tmp_path):
    """README's recipe: the conversion as Megatron-LM's `release` checkpoint, then
    `--pretrained-checkpoint DIR --finetune`, here on DP=2 with the distributed optimizer;
    iteration 1 reports HF's loss on the same global batch."""
    hf_loss, _, run_dir, _, _ = fine_tuned
    shutil.copytree(run_dir / CONVERTED, tmp_path / "pretrained" / "release")
    (tmp_path / "pretrained" / "latest_checkpointed_iteration.txt").write_text("release")
    corpus = build_indexed_corpus(run_dir.parent / ".corpus-cache", CORPUS)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", str(PRETRAIN),
               "--dsv3-preset", "tiny", "--num-layers", str(LAYERS), "--moe-router-topk", "4", "--seq-length", str(SEQ),
               "--max-position-embeddings", str(SEQ), "--micro-batch-size", str(MICRO),
               "--global-batch-size", str(MICRO * MICROBATCHES), "--train-iters", "1", "--eval-iters", "0", "--lr", "1e-3",
               "--seed", str(SEED), "--data-path", corpus, "--split", "98,2,0", "--tokenizer-type", "NullTokenizer",
               "--vocab-size", "256", "--num-workers", "0", "--distributed-backend", "gloo", "--log-interval", "1",
               "--no-bias-swiglu-fusion", "--no-bias-dropout-fusion",
               "--pretrained-checkpoint", str(tmp_path / "pretrained"), "--finetune", "--use-distributed-optimizer"]
    result = subprocess.run(command, capture_output=True, text=True, env=compact.child_env(), timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert "loading release distributed checkpoint" in result.stdout
    printed = float(re.search(r"iteration\s+1/\s*1 \|.*? lm loss: ([0-9.E+-]+)", result.stdout).group(1))
    assert printed == pytest.approx(hf_loss, rel=2e-6)  # Megatron-LM prints 7 digits


def test_bad_init_from_is_named_before_any_work(fine_tuned, tmp_path):
    _, _, run_dir, _, hf_dir = fine_tuned
    with pytest.raises(InitFromError, match="nowhere: neither an HF checkpoint.*it does not exist. Fix"):
        resolve(tmp_path / "nowhere", preset("tiny", **OVERRIDES, num_layers=LAYERS))
    with pytest.raises(InitFromError, match="'num_experts_per_tok'=4 disagrees.*Fix"):
        resolve(hf_dir, preset("tiny", num_layers=LAYERS))  # top-2 routing: not this checkpoint's
    with pytest.raises(InitFromError, match=r"init-from-hf: .*hf_config.json \(the config.json it was converted from\).*"
                                            r"'num_experts_per_tok'=4 disagrees"):
        resolve(run_dir / CONVERTED, preset("tiny", num_layers=LAYERS))  # its recorded config.json says top-4
    # without the recorded config.json (e.g. a compact-loop checkpoint), the tensors' metadata tells
    unrecorded = shutil.copytree(run_dir / CONVERTED, tmp_path / "unrecorded", ignore=shutil.ignore_patterns("hf_config.json"))
    with pytest.raises(InitFromError, match=r"decoder.layers.4.* is missing.*Fix: pass the preset"):
        train(_args(tmp_path / "run", init_from=unrecorded, overrides=dict(OVERRIDES, seq_length=SEQ, num_layers=LAYERS + 1)))
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
