"""The user's data under Megatron-LM, checked before any process group: `check_data`.

Megatron-LM reads `--data-path` (or `--train-data-path` / `--valid-data-path` /
`--test-data-path`) itself, with the tokenizer of `--tokenizer-type` (for an HF tokenizer:
`--tokenizer-type HuggingFaceTokenizer --tokenizer-model DIR`). A wrong prefix, a blend it
misreads, data tokenized with another vocabulary or a vocabulary larger than the model's
(`--padded-vocab-size`, which a `--dsv3-preset` sets) would otherwise fail after the process
groups exist, or index past the embedding. The rules are the compact loop's
(`megatron_dsv3.datasets.check_data`), with the launch's flags in the errors; the data itself
is read by Megatron-LM (examples/pretrain_dsv3.py's `datasets_provider`).
"""

from __future__ import annotations

import argparse
import math

from megatron_dsv3 import datasets
from megatron_dsv3.launch.errors import LaunchError

DATA_FLAGS = {"data_path": "--data-path", "train_data_path": "--train-data-path",
              "valid_data_path": "--valid-data-path", "test_data_path": "--test-data-path"}


def check_data(args: argparse.Namespace, tokenizer) -> None:
    """Each data flag's blend, files and dtype against `tokenizer` (Megatron-LM's, built from the
    flags), and the tokenizer's vocabulary against `--padded-vocab-size`; a LaunchError names
    the flag, the value and the fix."""
    name = f"the tokenizer (--tokenizer-type {args.tokenizer_type}"
    name += f" --tokenizer-model {args.tokenizer_model})" if args.tokenizer_model else ")"
    multiple = args.make_vocab_size_divisible_by * args.tensor_model_parallel_size  # how Megatron-LM pads a vocabulary
    padded = math.ceil(tokenizer.vocab_size / multiple) * multiple
    vocab_fix = (f"pass --padded-vocab-size {padded} ({tokenizer.vocab_size} rounded up to a multiple of {multiple}, as "
                 "Megatron-LM pads) after --dsv3-preset, or the tokenizer the model was made for")
    given = [] if args.mock_data else [(flag, getattr(args, field)) for field, flag in DATA_FLAGS.items()
                                       if getattr(args, field) is not None]
    try:
        for flag, words in given or [("--data-path", None)]:  # no data flag (--mock-data): the vocabulary alone
            datasets.check_data(words, tokenizer=name, tokenizer_vocab_size=tokenizer.vocab_size,
                                model_vocab="--padded-vocab-size", model_vocab_size=args.padded_vocab_size,
                                vocab_fix=vocab_fix, flag=flag)
    except datasets.DataError as error:
        raise LaunchError(str(error)) from None
