"""The compact loop's data: the embedded corpus with its byte-level tokenizer, or the user's
Megatron indexed datasets with their HF tokenizer; both served by Megatron's `GPTDataset`.

The embedded corpus (the default) is text every Python install carries: the standard library's
own `.py` sources, read at run time in sorted order (deterministic for one Python version), up
to `max_bytes`. It is tokenized byte by byte (ids 0-255, end-of-document 256), written once as a
Megatron indexed dataset (`.bin`/`.idx`) and served by `GPTDataset` (megatron.core.datasets).

The user's data (`--data-path`, Megatron-LM's form: prefixes, or a weighted blend) comes with
`--tokenizer`, the HF tokenizer it was tokenized with: a `tokenizer.json`, or a directory holding
one (with its `tokenizer_config.json`, where the end-of-document token is named). The tokenizer
is Megatron's own (`megatron.core.tokenizers`, the object Megatron-LM builds for
`--tokenizer-type HuggingFaceTokenizer --tokenizer-model DIR`). `check_user_data` checks both
before any training work (the rules: megatron_dsv3/datasets.py); every document trains (the
compact loop evaluates the embedded corpus's validation split only: it refuses --eval-interval
with --data-path).
"""

from __future__ import annotations

import functools
import hashlib
import os
import sysconfig
from pathlib import Path

import numpy
import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
from megatron.core.tokenizers import MegatronTokenizer

from megatron_dsv3.datasets import Blend, ByteTokenizer, DataError, check_data


TRAIN_FRACTION = 0.98  # of the documents; the rest is the validation split


def stdlib_documents(max_bytes: int) -> list[Path]:
    """The standard library's `.py` files, sorted, until `max_bytes` of text."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chosen, total = [], 0
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts or "test" in path.parts:
            continue
        size = path.stat().st_size
        if size == 0:
            continue
        chosen.append(path)
        total += size
        if total >= max_bytes:
            break
    if not chosen:
        raise FileNotFoundError(f"no Python sources under {root}: the embedded corpus needs the standard library")
    return chosen


def build_indexed_corpus(cache_dir: Path, max_bytes: int) -> str:
    """Write the corpus as a Megatron indexed dataset once; returns its path prefix."""
    documents = stdlib_documents(max_bytes)
    if round(TRAIN_FRACTION * len(documents)) >= len(documents):
        # Megatron splits by documents, rounding the cumulative fraction; an empty split makes
        # GPTDataset search for epochs forever
        raise ValueError(
            f"corpus_bytes={max_bytes} gives {len(documents)} documents: the {100 - 100 * TRAIN_FRACTION:.0f}% "
            "validation split would hold none. Fix: raise --corpus-bytes (1000000 gives 41 documents)."
        )
    digest = hashlib.sha1("\n".join(str(p) for p in documents).encode()).hexdigest()[:12]
    prefix = cache_dir / f"stdlib-bytes-{digest}"
    if Path(f"{prefix}.idx").exists():
        return str(prefix)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = ByteTokenizer()
    partial = Path(f"{prefix}.partial")  # renamed only when complete
    builder = IndexedDatasetBuilder(f"{partial}.bin", dtype=numpy.uint16)
    for path in documents:
        ids = tokenizer.tokenize(path.read_text(encoding="utf-8", errors="replace")) + [tokenizer.eod]
        builder.add_document(torch.tensor(ids, dtype=torch.int64), [len(ids)])
    builder.finalize(f"{partial}.idx")
    os.replace(f"{partial}.bin", f"{prefix}.bin")
    os.replace(f"{partial}.idx", f"{prefix}.idx")
    return str(prefix)


def _gpt_config(seed: int, seq_length: int, blend: Blend, split: str, cache_dir: Path, tokenizer) -> GPTDatasetConfig:
    """Megatron's GPTDataset settings of the compact loop: no masks or position resets at
    documents' ends (the model attends causally over the whole sequence)."""
    return GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=(blend.prefixes, blend.weights),
        split=split,
        path_to_cache=str(cache_dir / "index-cache"),  # Megatron's index files, keyed by the data, tokenizer and seed
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
    )


def build_datasets(
    cache_dir: Path, seq_length: int, train_samples: int, valid_samples: int, seed: int, max_bytes: int
) -> tuple[GPTDataset, GPTDataset]:
    """Train and validation GPTDatasets over the embedded corpus (98% / 2% of documents).
    Under torch.distributed, rank 0 writes the corpus first and the others then find it
    (Megatron's builder does the same for its index caches)."""
    distributed = torch.distributed.is_initialized()
    if distributed and torch.distributed.get_rank() == 0:
        build_indexed_corpus(cache_dir, max_bytes)
    if distributed:
        torch.distributed.barrier()
    prefix = build_indexed_corpus(cache_dir, max_bytes)
    split = f"{100 * TRAIN_FRACTION:g},{100 - 100 * TRAIN_FRACTION:g},0"
    config = _gpt_config(seed, seq_length, Blend([prefix], None), split, cache_dir, ByteTokenizer())
    train, valid, _ = BlendedMegatronDatasetBuilder(
        GPTDataset, [train_samples, valid_samples, None], lambda: True, config
    ).build()
    return train, valid


# --- The user's data: --data-path and --tokenizer

TOKENIZER_FILE = "tokenizer.json"  # the HF tokenizers library's file; transformers' AutoTokenizer reads it from a directory
BYTE_TOKENIZER = "the training data's byte tokenizer"  # the embedded corpus's, in errors


@functools.lru_cache(maxsize=4)
def load_tokenizer(path: str):
    """Megatron's HF tokenizer of `path` (a `tokenizer.json`, or a directory holding one).

    The object Megatron-LM builds for `--tokenizer-type HuggingFaceTokenizer --tokenizer-model DIR`
    (megatron.core.tokenizers.utils.build_tokenizer): `MegatronTokenizer.from_pretrained` with the
    `huggingface` library, i.e. transformers' `AutoTokenizer` on the directory, which reads its
    `tokenizer.json` and, where present, its `tokenizer_config.json` (the end-of-document token).
    AutoTokenizer takes a directory, not a file: a `tokenizer.json` is loaded from its directory."""
    given = Path(path)
    if given.is_file() and given.name == TOKENIZER_FILE:
        directory = given.parent
    elif given.is_dir():
        directory = given
    elif given.is_file():
        raise DataError(f"--tokenizer {path}: a file not named {TOKENIZER_FILE}; Megatron's HF tokenizer (transformers' "
                        f"AutoTokenizer) reads the {TOKENIZER_FILE} of a directory. Fix: rename it to {TOKENIZER_FILE}, "
                        "or pass the directory holding the tokenizer's files.")
    else:
        raise DataError(f"--tokenizer {path}: no such file or directory. Fix: pass the {TOKENIZER_FILE} the data was "
                        "tokenized with, or the directory holding it.")
    if not (directory / TOKENIZER_FILE).is_file():
        raise DataError(f"--tokenizer {path}: {directory} holds no {TOKENIZER_FILE}. Fix: pass an HF tokenizer's directory "
                        f"(its {TOKENIZER_FILE}, as the HF tokenizers library saves it); for a SentencePiece or tiktoken "
                        "tokenizer launch examples/pretrain_dsv3.py with Megatron-LM's --tokenizer-type.")
    try:
        return MegatronTokenizer.from_pretrained(tokenizer_path=str(directory), metadata_path={"library": "huggingface"})
    except ValueError as error:  # Megatron's "Unable to instantiate HuggingFace AutoTokenizer ..."
        raise DataError(f"--tokenizer {path}: {error}. Fix: pass a {TOKENIZER_FILE} that the HF tokenizers library "
                        "loads (tokenizers.Tokenizer.from_file).") from None


def check_user_data(data_path: list[str] | None, tokenizer: str | None, vocab_size: int) -> tuple[Blend | None, object]:
    """The compact loop's data against the model's `vocab_size`, before any training work (the
    rules: megatron_dsv3.datasets.check_data): the embedded corpus with its byte tokenizer, or
    `--data-path` with its `--tokenizer`, which gives the vocabulary the data was written in.
    Returns the blend (None: the embedded corpus) and the tokenizer."""
    if data_path is None and tokenizer is not None:
        raise DataError(f"--tokenizer {tokenizer} without --data-path: the embedded corpus is tokenized byte by byte. "
                        "Fix: pass --data-path with the data this tokenizer wrote, or leave --tokenizer out.")
    if data_path is not None and tokenizer is None:
        raise DataError(f"--data-path {' '.join(data_path)} without --tokenizer: the tokenizer the data was written with "
                        "gives its vocabulary, checked against vocab_size and the dataset's dtype. Fix: pass --tokenizer "
                        f"PATH, its {TOKENIZER_FILE} or the directory holding it.")
    if data_path is None:
        chosen, name = ByteTokenizer(), BYTE_TOKENIZER
        fix = f"pass --set vocab_size={ByteTokenizer.vocab_size} or more (256 bytes and an end-of-document token)"
    else:
        chosen, name = load_tokenizer(tokenizer), f"the tokenizer {tokenizer} (--tokenizer)"
        fix = f"pass --set vocab_size={chosen.vocab_size} or more"
    blend = check_data(data_path, tokenizer=name, tokenizer_vocab_size=chosen.vocab_size, model_vocab="vocab_size",
                       model_vocab_size=vocab_size, vocab_fix=fix)
    return blend, chosen


def build_user_dataset(cache_dir: Path, seq_length: int, train_samples: int, seed: int, blend: Blend, tokenizer):
    """The training dataset over the user's blend: Megatron's GPTDataset (a BlendedDataset of
    them for a weighted blend, each drawn in proportion to its weight). Every document trains
    (split 100,0,0); the index files go under `cache_dir`, not beside the user's data."""
    config = _gpt_config(seed, seq_length, blend, "100,0,0", cache_dir, tokenizer)
    train, _, _ = BlendedMegatronDatasetBuilder(GPTDataset, [train_samples, 0, 0], lambda: True, config).build()
    return train
