"""The embedded corpus, a byte-level tokenizer, and Megatron's indexed GPT datasets.

The corpus is text every Python install carries: the standard library's own `.py` sources,
read at run time in sorted order (deterministic for one Python version), up to `max_bytes`.
It is tokenized byte by byte (ids 0-255, end-of-document 256), written once as a Megatron
indexed dataset (`.bin`/`.idx`) and served by `GPTDataset` (megatron.core.datasets).
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from pathlib import Path

import numpy
import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder


TRAIN_FRACTION = 0.98  # of the documents; the rest is the validation split


class ByteTokenizer:
    """UTF-8 bytes as token ids, plus an end-of-document token; what GPTDataset asks of one."""

    eod = 256
    vocab_size = 257
    unique_identifiers = {"class": "megatron_dsv3.ByteTokenizer", "eod": 256}  # dataset cache key

    def tokenize(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def detokenize(self, ids) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


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
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=([prefix], None),
        split=f"{100 * TRAIN_FRACTION:g},{100 - 100 * TRAIN_FRACTION:g},0",
        path_to_cache=str(cache_dir / "index-cache"),
        tokenizer=ByteTokenizer(),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
    )
    train, valid, _ = BlendedMegatronDatasetBuilder(
        GPTDataset, [train_samples, valid_samples, None], lambda: True, config
    ).build()
    return train, valid
