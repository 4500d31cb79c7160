"""The user's training data: Megatron indexed datasets and the tokenizer that wrote them, checked
before any training work (`check_data`, the one home of these rules); and `ByteTokenizer`, the
embedded corpus's tokenizer (training reads it, generation writes with it).

Both ways of training read the same data and call `check_data`: the compact loop
(`python -m megatron_dsv3.training --data-path ... --tokenizer ...`, training/data.py) and the
Megatron-LM launch (`examples/pretrain_dsv3.py --data-path ... --tokenizer-model ...`,
launch/data.py). Each names its own flags in the errors; the rules are these:

- `--data-path` is Megatron-LM's: `PREFIX [PREFIX ...]`, or a weighted blend
  `WEIGHT PREFIX [WEIGHT PREFIX ...]` (Megatron normalises the weights). Megatron's own parser
  (`megatron.core.datasets.utils.get_blend_from_list`) reads an odd count as a list of prefixes,
  so `0.3 a 0.7` would look for a dataset named `0.3`; here it is refused as a blend.
- Every prefix is a Megatron indexed dataset: `PREFIX.idx` and `PREFIX.bin`, as Megatron-LM's
  tools/preprocess_data.py writes them (`--output-prefix OUT` gives `OUT_text_document`).
- The `.idx` header stores the dtype of the token ids (Megatron's `_IndexWriter`: 9 magic bytes,
  a version, a one-byte `DType` code). preprocess_data.py picks it from the tokenizer's size
  (`DType.optimal_dtype`: uint16 below 65500 ids, else int32), so a dtype that cannot hold every
  id of the tokenizer means the data was tokenized with another, smaller one. Only the header is
  read: the token ids themselves are not scanned.
- The tokenizer's vocabulary fits the model's: an id at or above `vocab_size` has no embedding row.
"""

from __future__ import annotations

import math
import struct
from pathlib import Path
from typing import NamedTuple

import numpy
from megatron.core.datasets.indexed_dataset import _INDEX_HEADER, DType, get_bin_path, get_idx_path

BLEND_FORM = "PREFIX [PREFIX ...] or WEIGHT PREFIX [WEIGHT PREFIX ...], e.g. 0.3 data/a_text_document 0.7 data/b_text_document"


class ByteTokenizer:
    """UTF-8 bytes as token ids, plus an end-of-document token; what GPTDataset asks of one."""

    eod = 256
    vocab_size = 257
    unique_identifiers = {"class": "megatron_dsv3.ByteTokenizer", "eod": 256}  # dataset cache key

    def tokenize(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def detokenize(self, ids) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class DataError(ValueError):
    """Training data or a tokenizer that cannot work: names the flag, the value and the fix."""


class Blend(NamedTuple):
    """Megatron's blend (`BlendedMegatronDatasetConfig.blend`): the prefixes, and their weights or None."""

    prefixes: list[str]
    weights: list[float] | None


def _number(word: str) -> float | None:
    try:
        return float(word)
    except ValueError:
        return None


def parse_blend(words: list[str], flag: str = "--data-path") -> Blend:
    """Megatron-LM's `--data-path` words as a blend, refusing what Megatron would misread."""
    given = f"{flag} {' '.join(words)}"
    if not words:
        raise DataError(f"{flag} is given no dataset. Fix: pass {BLEND_FORM}.")
    if _number(words[0]) is None:  # prefixes only
        numbers = [word for word in words if _number(word) is not None]
        if numbers:
            raise DataError(
                f"{given}: mixes prefixes and numbers ({', '.join(numbers)}): a weighted blend puts each weight before its "
                f"prefix, starting with a weight. Fix: pass {BLEND_FORM}."
            )
        return Blend(list(words), None)
    if len(words) % 2:
        raise DataError(
            f"{given}: {len(words)} words, but a weighted blend is WEIGHT PREFIX pairs (the last weight has no prefix). "
            f"Fix: give every prefix one weight before it: {BLEND_FORM}."
        )
    weights, prefixes = words[0::2], words[1::2]
    for position, (weight, prefix) in enumerate(zip(weights, prefixes, strict=True)):
        value = _number(weight)
        if value is None:
            raise DataError(
                f"{given}: weight {position + 1} is {weight!r}, not a number (a weighted blend is WEIGHT PREFIX pairs). "
                f"Fix: pass {BLEND_FORM}."
            )
        if not (math.isfinite(value) and value > 0):
            raise DataError(
                f"{given}: the weight of {prefix} is {weight}: Megatron draws each dataset in proportion to its weight. "
                "Fix: give every dataset a positive weight, or leave the dataset out."
            )
        if _number(prefix) is not None:
            raise DataError(
                f"{given}: prefix {position + 1} is {prefix!r}, a number (a weighted blend is WEIGHT PREFIX pairs, each "
                f"weight before its prefix). Fix: pass {BLEND_FORM}."
            )
    return Blend(list(prefixes), [float(weight) for weight in weights])


def index_dtype(prefix: str, flag: str = "--data-path") -> type[numpy.number]:
    """The dtype of a Megatron indexed dataset's token ids, from its `.idx` header (read as
    Megatron's `_IndexReader` does); a missing `.idx` or `.bin` is refused, naming the fix."""
    idx, bin_ = Path(get_idx_path(prefix)), Path(get_bin_path(prefix))
    for path in (idx, bin_):
        if not path.is_file():
            raise DataError(f"{flag} {prefix}: {path} does not exist; a Megatron indexed dataset is PREFIX.idx with "
                            f"PREFIX.bin. Fix: {_prefix_fix(prefix)}.")
    with open(idx, "rb") as stream:  # Megatron's _IndexWriter: magic, version (1), the DType code of the ids
        magic, version, code = stream.read(len(_INDEX_HEADER)), stream.read(8), stream.read(1)
    if magic != _INDEX_HEADER or len(version) != 8 or struct.unpack("<Q", version)[0] != 1 or len(code) != 1:
        raise DataError(f"{flag} {prefix}: {idx} is not a Megatron indexed dataset index (version 1 starts with "
                        f"{_INDEX_HEADER!r}, this file with {magic!r}). Fix: write it with Megatron-LM's "
                        "tools/preprocess_data.py (megatron.core.datasets.indexed_dataset.IndexedDatasetBuilder).")
    try:
        return DType.dtype_from_code(code[0])
    except ValueError:
        raise DataError(f"{flag} {prefix}: {idx} names dtype code {code[0]}, which Megatron's DType does not have "
                        f"({', '.join(f'{d.value} {d.name}' for d in DType)}). Fix: write it again with Megatron-LM's "
                        "tools/preprocess_data.py.") from None


def _prefix_fix(prefix: str) -> str:
    """The fix for a prefix with no dataset: the likely intended prefix where one exists."""
    for suffix in (".bin", ".idx"):
        if prefix.endswith(suffix) and Path(get_idx_path(prefix.removesuffix(suffix))).is_file():
            return f"pass the prefix without {suffix}: {prefix.removesuffix(suffix)}"
    if Path(get_idx_path(f"{prefix}_text_document")).is_file():
        return f"pass {prefix}_text_document (preprocess_data.py appends _text_document to --output-prefix)"
    return ("pass the prefix of an existing PREFIX.bin / PREFIX.idx pair (Megatron-LM's tools/preprocess_data.py "
            "--output-prefix OUT writes OUT_text_document.bin and .idx)")


def check_data(
    data_path: list[str] | None,
    *,
    tokenizer: str,
    tokenizer_vocab_size: int,
    model_vocab: str,
    model_vocab_size: int,
    vocab_fix: str,
    flag: str = "--data-path",
) -> Blend | None:
    """Every rule of the module note, in order: the blend's form, each prefix's files and id dtype
    against the tokenizer, then the tokenizer's vocabulary against the model's. Returns the blend
    (None without `data_path`: the vocabulary alone is checked).

    `tokenizer` describes the tokenizer in the errors (with the flag that chose it), `model_vocab`
    names the model's vocabulary size as the caller sets it, and `vocab_fix` is the caller's fix."""
    blend = parse_blend(data_path, flag) if data_path is not None else None
    for prefix in blend.prefixes if blend else []:
        dtype = index_dtype(prefix, flag)
        if not numpy.issubdtype(dtype, numpy.integer):
            raise DataError(f"{flag} {prefix}: {get_idx_path(prefix)} stores its tokens as {dtype.__name__}, not as "
                            "integer ids. Fix: write it again with Megatron-LM's tools/preprocess_data.py.")
        largest = int(numpy.iinfo(dtype).max)
        if largest < tokenizer_vocab_size - 1:
            raise DataError(
                f"{flag} {prefix}: {get_idx_path(prefix)} stores token ids as {dtype.__name__} (at most {largest}), but "
                f"{tokenizer} has {tokenizer_vocab_size} ids (up to {tokenizer_vocab_size - 1}): this data was tokenized "
                "with another, smaller vocabulary (Megatron-LM's tools/preprocess_data.py picks the dtype from the "
                "tokenizer's size, DType.optimal_dtype: uint16 below 65500 ids, else int32). Fix: pass the tokenizer "
                "the data was tokenized with, or tokenize the data again with this one."
            )
    if tokenizer_vocab_size > model_vocab_size:
        raise DataError(
            f"{model_vocab}={model_vocab_size}: {tokenizer} has {tokenizer_vocab_size} ids, and the model's embedding "
            f"has no row for an id >= {model_vocab_size}. Fix: {vocab_fix}."
        )
    return blend
