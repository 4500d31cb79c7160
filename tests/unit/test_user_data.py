"""The user's data and tokenizer: Megatron indexed datasets (`--data-path`, blends with weights)
and an HF tokenizer (`--tokenizer`), in the compact loop and in the Megatron-LM launch.

Nothing is downloaded: a byte-level BPE tokenizer (400 ids) is trained here with the HF
`tokenizers` library on a few KB of the standard library's text and saved as an HF tokenizer
directory (transformers' `save_pretrained`: tokenizer.json and tokenizer_config.json, which
names the end-of-document token). Two datasets are written as Megatron-LM's
tools/preprocess_data.py writes them (`--append-eod`): each document's ids, tokenized by the
`tokenizers` object itself, then the end-of-document id, through Megatron's own
`IndexedDatasetBuilder` with the dtype preprocess_data picks (`DType.optimal_dtype`).

The references are independent of the loop's wiring: the token ids of Megatron's GPTDataset
(or its BlendedDataset) built here directly from the prefixes, weights and seed.
Each error is raised before the run directory exists, i.e. before any training work.
"""

import importlib.util
import json
import math
import sysconfig
from pathlib import Path

import numpy
import pytest
import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder
from megatron.core.tokenizers import MegatronTokenizer
from megatron.training.global_vars import get_args, unset_global_variables

from megatron_dsv3 import datasets
from megatron_dsv3.training import loop
from megatron_dsv3.training.__main__ import main
from megatron_dsv3.training.data import build_user_dataset

from slurm_scripts import PRETRAIN

STDLIB = Path(sysconfig.get_paths()["stdlib"])
EOD = "<|endoftext|>"
VOCAB = 400
SEQ_LENGTH, SEED = 32, 11
TINY = {"num_layers": 2, "seq_length": SEQ_LENGTH}
LOOP = ["--micro-batch-size", "2", "--num-microbatches", "1", "--warmup-steps", "0", "--no-progress", "--seed", str(SEED),
        "--set", "num_layers=2", "--set", f"seq_length={SEQ_LENGTH}"]


def _documents(names: list[str]) -> list[str]:
    return [(STDLIB / name).read_text()[:3000] for name in names]


def _write_dataset(prefix: Path, documents: list[str], hf_tokenizer, dtype=None) -> str:
    """As Megatron-LM's tools/preprocess_data.py --append-eod writes a dataset (see the module note)."""
    eod = hf_tokenizer.token_to_id(EOD)
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype or DType.optimal_dtype(hf_tokenizer.get_vocab_size()))
    for text in documents:
        ids = hf_tokenizer.encode(text).ids + [eod]
        builder.add_document(torch.tensor(ids), [len(ids)])
    builder.finalize(f"{prefix}.idx")
    return str(prefix)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The tokenizer directory, its `tokenizers` object, and two datasets (prefixes a and b)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("user_data")
    hf_tokenizer = Tokenizer(models.BPE())
    hf_tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf_tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=[EOD], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    hf_tokenizer.train_from_iterator(_documents(["textwrap.py", "shlex.py"]), trainer)
    assert hf_tokenizer.get_vocab_size() == VOCAB
    PreTrainedTokenizerFast(tokenizer_object=hf_tokenizer, eos_token=EOD).save_pretrained(root / "tokenizer")
    a = _write_dataset(root / "a_text_document", _documents(["textwrap.py", "shlex.py", "bisect.py", "heapq.py"]), hf_tokenizer)
    b = _write_dataset(root / "b_text_document", _documents(["fnmatch.py", "glob.py", "colorsys.py", "keyword.py"]), hf_tokenizer)
    return {"root": root, "tokenizer": str(root / "tokenizer"), "hf": hf_tokenizer, "a": a, "b": b}


def _reference(blend, num_samples: int, tokenizer_dir: str):
    """Megatron's own GPTDataset (a BlendedDataset for weights) over the prefixes, built here."""
    tokenizer = MegatronTokenizer.from_pretrained(tokenizer_path=tokenizer_dir, metadata_path={"library": "huggingface"})
    config = GPTDatasetConfig(random_seed=SEED, sequence_length=SEQ_LENGTH, blend=blend, split="100,0,0", path_to_cache=None,
                              tokenizer=tokenizer, reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
                              create_attention_mask=False)
    return BlendedMegatronDatasetBuilder(GPTDataset, [num_samples, 0, 0], lambda: True, config).build()[0]


def _train_recording(monkeypatch, argv: list[str], run_dir: Path, samples: int) -> tuple[list[dict], torch.Tensor]:
    """`python -m megatron_dsv3.training ARGV` in this process; returns the metrics and the first
    `samples` sequences of tokens the loop trained on (in its data order)."""
    seen = []
    make_data = loop._data

    def recording_data(*args, **kwargs):
        for batch in make_data(*args, **kwargs):
            seen.append(batch["tokens"].clone())
            yield batch

    monkeypatch.setattr(loop, "_data", recording_data)
    assert main([*argv, "--run-dir", str(run_dir)]) == 0
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return records, torch.cat(seen)[:samples]


# --- The compact loop on the user's data


def test_the_loaded_tokenizer_is_the_trained_one(data):
    """Megatron's HF tokenizer of the directory (what --tokenizer loads) gives the ids the data was written with."""
    tokenizer = MegatronTokenizer.from_pretrained(tokenizer_path=data["tokenizer"], metadata_path={"library": "huggingface"})
    text = _documents(["heapq.py"])[0]
    assert tokenizer.vocab_size == VOCAB and tokenizer.eod == data["hf"].token_to_id(EOD)
    assert tokenizer.tokenize(text) == data["hf"].encode(text).ids


def test_the_compact_loop_trains_on_a_dataset_and_its_tokenizer(data, tmp_path, monkeypatch):
    steps = 6
    records, tokens = _train_recording(
        monkeypatch, [*LOOP, "--steps", str(steps), "--lr", "1e-2", "--data-path", data["a"],
                      "--tokenizer", str(Path(data["tokenizer"]) / "tokenizer.json"), "--set", f"vocab_size={VOCAB}"],
        tmp_path / "run", samples=2 * steps)
    losses = [record["lm_loss"] for record in records]
    assert len(losses) == steps and all(math.isfinite(loss) for loss in losses)
    assert abs(losses[0] - math.log(VOCAB)) < 0.5  # starts near uniform over the tokenizer's 400 ids
    assert losses[-1] < losses[0]
    reference = _reference(([data["a"]], None), 2 * steps, data["tokenizer"])
    expected = torch.stack([reference[i]["tokens"] for i in range(2 * steps)])
    assert torch.equal(tokens, expected)
    assert int(tokens.max()) < VOCAB


def test_a_weighted_blend_draws_each_dataset_by_its_weight(data, tmp_path, monkeypatch):
    """--data-path 1 A 3 B: Megatron's BlendedDataset over the two, a quarter of the samples from A."""
    samples = 8
    _, tokens = _train_recording(
        monkeypatch, [*LOOP, "--steps", "2", "--num-microbatches", "2", "--data-path", "1", data["a"], "3", data["b"],
                      "--tokenizer", data["tokenizer"], "--set", f"vocab_size={VOCAB}"],
        tmp_path / "run", samples=samples)
    reference = _reference(([data["a"], data["b"]], [1.0, 3.0]), samples, data["tokenizer"])
    assert numpy.bincount(reference.dataset_index[:samples], minlength=2).tolist() == [2, 6]
    assert torch.equal(tokens, torch.stack([reference[i]["tokens"] for i in range(samples)]))


# --- Named errors, before any training work


def _refused(tmp_path, argv: list[str]) -> str:
    run_dir = tmp_path / "run"
    with pytest.raises(ValueError) as error:
        main([*LOOP, "--steps", "2", "--run-dir", str(run_dir), *argv])
    assert not run_dir.exists()  # refused before the run directory, the process groups or the model
    return str(error.value)


def test_a_tokenizer_larger_than_the_model_vocabulary_is_refused(data, tmp_path):
    message = _refused(tmp_path, ["--data-path", data["a"], "--tokenizer", data["tokenizer"]])  # tiny: vocab_size 257
    assert message == (f"vocab_size=257: the tokenizer {data['tokenizer']} (--tokenizer) has 400 ids, and the model's "
                       "embedding has no row for an id >= 257. Fix: pass --set vocab_size=400 or more.")


def test_a_missing_index_or_data_file_is_refused(data, tmp_path):
    a = Path(data["a"])
    only_bin = tmp_path / "only_bin"
    only_bin.with_suffix(".bin").write_bytes(a.with_suffix(".bin").read_bytes())
    message = _refused(tmp_path, ["--data-path", str(only_bin), "--tokenizer", data["tokenizer"], "--set", "vocab_size=400"])
    assert message.startswith(f"--data-path {only_bin}: {only_bin}.idx does not exist; a Megatron indexed dataset is "
                              "PREFIX.idx with PREFIX.bin. Fix: pass the prefix of an existing PREFIX.bin / PREFIX.idx pair")
    only_idx = tmp_path / "only_idx"
    only_idx.with_suffix(".idx").write_bytes(a.with_suffix(".idx").read_bytes())
    message = _refused(tmp_path, ["--data-path", str(only_idx), "--tokenizer", data["tokenizer"], "--set", "vocab_size=400"])
    assert message.startswith(f"--data-path {only_idx}: {only_idx}.bin does not exist")


@pytest.mark.parametrize("given, fix", [
    ("{a}.bin", "Fix: pass the prefix without .bin: {a}."),
    ("{root}/a", "Fix: pass {root}/a_text_document (preprocess_data.py appends _text_document to --output-prefix)."),
], ids=["bin_suffix", "output_prefix"])
def test_a_near_miss_prefix_is_refused_naming_the_prefix_meant(data, tmp_path, given, fix):
    message = _refused(tmp_path, ["--data-path", given.format(**data), "--tokenizer", data["tokenizer"], "--set", "vocab_size=400"])
    assert message.endswith(fix.format(**data))


def test_a_dataset_whose_dtype_cannot_hold_the_tokenizers_ids_is_refused(data, tmp_path):
    """uint8 holds ids up to 255; the tokenizer has 400 (preprocess_data.py would have written uint16)."""
    narrow = _write_dataset(tmp_path / "narrow", ["tiny"], data["hf"], dtype=numpy.uint8)
    message = _refused(tmp_path, ["--data-path", narrow, "--tokenizer", data["tokenizer"], "--set", "vocab_size=400"])
    assert message.startswith(f"--data-path {narrow}: {narrow}.idx stores token ids as uint8 (at most 255), but the "
                              f"tokenizer {data['tokenizer']} (--tokenizer) has 400 ids (up to 399): this data was tokenized "
                              "with another, smaller vocabulary")
    assert message.endswith("Fix: pass the tokenizer the data was tokenized with, or tokenize the data again with this one.")


@pytest.mark.parametrize("words, message", [
    ("0.3 {a} 0.7", "--data-path 0.3 {a} 0.7: 3 words, but a weighted blend is WEIGHT PREFIX pairs (the last weight has no "
                    "prefix). Fix: give every prefix one weight before it"),
    ("0.3 {a} x {b}", "--data-path 0.3 {a} x {b}: weight 2 is 'x', not a number"),
    ("{a} 0.3 {b} 0.7", "--data-path {a} 0.3 {b} 0.7: mixes prefixes and numbers (0.3, 0.7): a weighted blend puts each "
                        "weight before its prefix"),
    ("0 {a} 1 {b}", "--data-path 0 {a} 1 {b}: the weight of {a} is 0: Megatron draws each dataset in proportion to its "
                    "weight. Fix: give every dataset a positive weight"),
    ("0.3 0.7 {a} {b}", "--data-path 0.3 0.7 {a} {b}: prefix 1 is '0.7', a number"),
], ids=["odd_count", "weight_not_a_number", "weight_after_prefix", "zero_weight", "prefix_a_number"])
def test_a_blend_megatron_would_misread_is_refused(data, tmp_path, words, message):
    given = _refused(tmp_path, ["--data-path", *words.format(**data).split(), "--tokenizer", data["tokenizer"],
                                "--set", "vocab_size=400"])
    assert given.startswith(message.format(**data))


@pytest.mark.parametrize("argv, message", [
    (["--data-path", "{a}"], "--data-path {a} without --tokenizer: the tokenizer the data was written with gives its "
                             "vocabulary, checked against vocab_size and the dataset's dtype. Fix: pass --tokenizer PATH"),
    (["--tokenizer", "{tokenizer}"], "--tokenizer {tokenizer} without --data-path: the embedded corpus is tokenized byte by "
                                     "byte. Fix: pass --data-path with the data this tokenizer wrote, or leave --tokenizer out."),
    (["--data-path", "{a}", "--tokenizer", "{root}/nowhere"], "--tokenizer {root}/nowhere: no such file or directory."),
    (["--data-path", "{a}", "--tokenizer", "{root}"], "--tokenizer {root}: {root} holds no tokenizer.json."),
    (["--data-path", "{a}", "--tokenizer", "{tokenizer}/tokenizer_config.json"],
     "--tokenizer {tokenizer}/tokenizer_config.json: a file not named tokenizer.json"),
], ids=["data_without_tokenizer", "tokenizer_without_data", "no_tokenizer_there", "no_tokenizer_json", "not_tokenizer_json"])
def test_data_and_tokenizer_come_together_and_the_tokenizer_must_be_one(data, tmp_path, argv, message):
    assert _refused(tmp_path, [arg.format(**data) for arg in argv]).startswith(message.format(**data))


# --- The rules themselves (megatron_dsv3.datasets.check_data, as both callers call it)


def _write_raw(prefix: Path, dtype) -> str:
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
    builder.add_document(torch.tensor([1, 2, 3]), [3])
    builder.finalize(f"{prefix}.idx")
    return str(prefix)


def _check(data_path, tokenizer_vocab_size, model_vocab_size=200_000):
    return datasets.check_data(data_path, tokenizer="the tokenizer T", tokenizer_vocab_size=tokenizer_vocab_size,
                               model_vocab="vocab_size", model_vocab_size=model_vocab_size, vocab_fix="F")


def test_the_idx_headers_dtype_must_hold_every_id_of_the_tokenizer(tmp_path):
    """uint16 (preprocess_data.py's dtype below 65500 ids) holds a vocabulary of 65536 ids at most; int32 (its dtype
    above) holds more; float is no token id. Weights in a blend are read as numbers; the vocabulary rule alone without data."""
    uint16 = _write_raw(tmp_path / "uint16", numpy.uint16)
    assert _check([uint16], 65536) == datasets.Blend([uint16], None)  # ids 0..65535 fit
    with pytest.raises(datasets.DataError, match=r"stores token ids as uint16 \(at most 65535\), but the tokenizer T has "
                                                 r"129280 ids \(up to 129279\)"):
        _check([uint16], 129280)
    assert _check(["2", _write_raw(tmp_path / "int32", numpy.int32), "1", uint16], 1000).weights == [2.0, 1.0]
    with pytest.raises(datasets.DataError, match=r"stores its tokens as float32, not as integer ids"):
        _check([_write_raw(tmp_path / "float", numpy.float32)], 10)
    with pytest.raises(datasets.DataError, match="vocab_size=10: the tokenizer T has 11 ids, and the model's embedding has "
                                                 "no row for an id >= 10. Fix: F."):
        _check(None, 11, model_vocab_size=10)


def test_an_index_file_megatron_did_not_write_is_refused(tmp_path):
    prefix = tmp_path / "foreign"
    prefix.with_suffix(".bin").write_bytes(b"")
    prefix.with_suffix(".idx").write_bytes(b"not an index")
    with pytest.raises(datasets.DataError, match=rf"--data-path {prefix}: {prefix}.idx is not a Megatron indexed dataset "
                                                 r"index \(version 1 starts with b'MMIDIDX\\x00\\x00', this file with "
                                                 r"b'not an in'\). Fix: write it with Megatron-LM's tools/preprocess_data.py"):
        _check([str(prefix)], 10)


# --- The Megatron-LM launch (examples/pretrain_dsv3.py): the same rules on its flags


def _load_example():
    spec = importlib.util.spec_from_file_location("pretrain_dsv3_user_data", PRETRAIN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def launch_main(monkeypatch):
    """examples/pretrain_dsv3.py's main() on this CPU process up to `pretrain`, which is recorded
    instead of run (as is the runtime set-up: process groups, CPU hooks)."""
    example = _load_example()
    called = []
    monkeypatch.setattr(example.runtime, "prepare", lambda args, model_config: None)
    monkeypatch.setattr(example, "pretrain", lambda *args, **kwargs: called.append(kwargs))
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")

    def run(*flags):
        monkeypatch.setattr("sys.argv", ["pretrain_dsv3.py", "--dsv3-preset", "tiny", "--num-layers", "2",
                                         "--seq-length", str(SEQ_LENGTH), "--max-position-embeddings", str(SEQ_LENGTH),
                                         "--micro-batch-size", "2", "--global-batch-size", "2", "--train-iters", "2",
                                         "--eval-iters", "0", "--distributed-backend", "gloo", "--split", "100,0,0",
                                         "--seed", str(SEED), "--tokenizer-type", "HuggingFaceTokenizer", *flags])
        return example.main(), called, example

    yield run
    unset_global_variables()


@pytest.mark.parametrize("flags, message", [
    (["--data-path", "{a}", "--tokenizer-model", "{tokenizer}"],
     "error: --padded-vocab-size=257: the tokenizer (--tokenizer-type HuggingFaceTokenizer --tokenizer-model {tokenizer}) "
     "has 400 ids, and the model's embedding has no row for an id >= 257. Fix: pass --padded-vocab-size 512 (400 rounded "
     "up to a multiple of 128, as Megatron-LM pads) after --dsv3-preset"),
    (["--data-path", "{root}/a", "--tokenizer-model", "{tokenizer}", "--padded-vocab-size", "512"],
     "error: --data-path {root}/a: {root}/a.idx does not exist; a Megatron indexed dataset is PREFIX.idx with PREFIX.bin. "
     "Fix: pass {root}/a_text_document"),
    (["--data-path", "0.3", "{a}", "0.7", "--tokenizer-model", "{tokenizer}", "--padded-vocab-size", "512"],
     "error: --data-path 0.3 {a} 0.7: 3 words, but a weighted blend is WEIGHT PREFIX pairs"),
    (["--train-data-path", "{a}", "--valid-data-path", "{b}.idx", "--tokenizer-model", "{tokenizer}", "--padded-vocab-size", "512"],
     "error: --valid-data-path {b}.idx: {b}.idx.idx does not exist"),
], ids=["vocab_size", "missing_idx", "odd_blend", "valid_data_path"])
def test_the_launch_refuses_the_same_before_any_process_group(data, launch_main, capsys, flags, message):
    code, called, _ = launch_main(*[flag.format(**data) for flag in flags])
    assert code == 2 and not called
    assert message.format(**data) in capsys.readouterr().err


def test_the_launch_reads_the_blend_as_the_compact_loop_does(data, launch_main, tmp_path):
    """The checks pass, `pretrain` is reached, and Megatron-LM's datasets_provider (Megatron-LM's
    HF tokenizer) serves the samples the compact loop's dataset serves for the same blend and seed."""
    code, called, example = launch_main("--data-path", "1", data["a"], "3", data["b"], "--tokenizer-model", data["tokenizer"],
                                        "--padded-vocab-size", "512")
    assert code == 0 and len(called) == 1
    assert get_args().padded_vocab_size == 512
    train, _, _ = example.datasets_provider([8, 0, 0])
    blend = datasets.Blend([data["a"], data["b"]], [1.0, 3.0])
    ours = build_user_dataset(tmp_path, SEQ_LENGTH, 8, SEED, blend, MegatronTokenizer.from_pretrained(
        tokenizer_path=data["tokenizer"], metadata_path={"library": "huggingface"}))
    for i in range(8):
        assert torch.equal(train[i]["tokens"], ours[i]["tokens"]), i
