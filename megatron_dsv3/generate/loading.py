"""What generation reads, each checked before any work: the model's weights (a dist_checkpointing
checkpoint, or an HF directory converted on the fly), the tokenizer, and the prompt's length.

Checkpoints: the converter's output, a compact-loop checkpoint root (`RUN_DIR/checkpoints`, whose
`latest` names the newest `iter_N`; or `RUN_DIR` itself, or one `iter_N`), or a Megatron-LM
`torch_dist` save (`latest_checkpointed_iteration.txt`). Only the model's tensors are read
(`convert.load_mcore_tensors`; no pickled object), into a single-process `specs.gpt_model` built
with the local spec and the parameters' own precision: FP8 (`fp8_blockwise`) is a training-time
choice, and the checkpoint holds the master weights. Before a byte is loaded, every tensor the
preset's model needs is checked against the checkpoint's metadata (name and global shape), and
every model tensor the checkpoint holds against the model: a checkpoint of another preset is
named with the first mismatching tensors and the fix (a compact-loop run's `config.json` gives
the preset and `--set` values it was trained with); a converted checkpoint's recorded HF
config.json is checked against the preset field by field (`convert.check_recorded_hf_config`).
"""

from __future__ import annotations

import ast
import codecs
import dataclasses
import json
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

from megatron_dsv3.config import DeepSeekV3Config, preset
from megatron_dsv3.convert.hf import (
    DCP_METADATA,
    TRACKERS,
    ConversionError,
    check_recorded_hf_config,
    hf_to_mcore,
    load_mcore_tensors,
    max_position_embeddings,
    meta_model,
    model_tensor_shapes,
    tensor_fit_problems,
    tracked_checkpoint,
)
from megatron_dsv3.datasets import ByteTokenizer, check_data
from megatron_dsv3.specs import gpt_model

MODEL_PREFIXES = ("embedding.", "decoder.", "output_layer.", "mtp.")  # a model tensor (not optimizer./ema.)
TOKENIZER_FILE = "tokenizer.json"
RUN_CONFIG = "config.json"  # the compact loop's record of a run (its "train" section: preset, overrides)


class GenerateError(ValueError):
    """Bad input to generation: names the option, the value, what is wrong and the fix."""


def generation_config(name: str, overrides: dict) -> DeepSeekV3Config:
    """The preset with `overrides`, as the single-process model for generation builds it: the local
    spec (the checkpoint's names), no FP8 (see the module note), CPU initialisation without CUDA,
    no random initialisation (the weights are loaded)."""
    config = preset(name, **overrides)
    return dataclasses.replace(config, transformer_impl="local", fp8_blockwise=None, fp8=None,
                               use_cpu_initialization=not torch.cuda.is_available(), perform_initialization=False)


# --- checkpoints -----------------------------------------------------------------------------


def resolve_checkpoint(path: str | Path) -> Path:
    """The dist_checkpointing directory `--checkpoint path` names (module note)."""
    directory = Path(path)
    if (directory / "checkpoints").is_dir() and not (directory / DCP_METADATA).is_file():
        directory = directory / "checkpoints"  # a compact-loop run directory
    try:
        directory = tracked_checkpoint(directory)
    except ConversionError as error:
        raise GenerateError(f"--checkpoint {error}") from None
    if not (directory / DCP_METADATA).is_file():
        raise GenerateError(
            f"--checkpoint {path}: not a dist_checkpointing checkpoint (no {DCP_METADATA}, no {' or '.join(TRACKERS)})"
            f"{'' if directory.exists() else '; it does not exist'}. Fix: point it at the output of `python -m "
            "megatron_dsv3.convert hf-to-mcore`, a run's checkpoints/ directory or one iter_N in it; or pass --hf DIR "
            "for an HF checkpoint.")
    return directory


def recorded_preset(checkpoint: Path) -> tuple[str, dict] | None:
    """(preset, overrides) of the compact-loop run that saved `checkpoint`, if its run's config.json says."""
    for run_dir in list(checkpoint.parents)[:3]:
        record = run_dir / RUN_CONFIG
        if not record.is_file():
            continue
        try:
            train = json.loads(record.read_text()).get("train", {})
            overrides = ast.literal_eval(train.get("overrides") or "{}")  # recorded as the dict's repr
        except (ValueError, SyntaxError, AttributeError, OSError):
            return None
        if not isinstance(train.get("preset"), str) or not isinstance(overrides, dict):
            return None
        return train["preset"], overrides
    return None


def preset_options(name: str, overrides: dict) -> str:
    """'--preset NAME [--set FIELD=JSON ...]'."""
    return f"--preset {name}" + "".join(f" --set {field}={json.dumps(value)}" for field, value in overrides.items())


def check_checkpoint(directory: Path, config: DeepSeekV3Config, option: str = "--checkpoint") -> None:
    """The checkpoint's tensors against `config`'s model, names and global shapes, both ways; and a
    converted checkpoint's recorded config.json (`hf_config.json`) against `config`, which also
    catches what no shape shows (e.g. the router's top-k)."""
    try:
        check_recorded_hf_config(directory, config)
    except ConversionError as error:
        raise GenerateError(f"{option} {directory}: {error}") from None
    problems = tensor_fit_problems(directory, model_tensor_shapes(meta_model(config)), extra_prefixes=MODEL_PREFIXES)
    if problems:
        recorded = recorded_preset(directory)
        fix = (f"pass the preset and --set values the checkpoint was made with ({preset_options(*recorded)}, from its run's {RUN_CONFIG})"
               if recorded else "pass the preset and --set values the checkpoint was made with")
        raise GenerateError(f"{option} {directory}: {len(problems)} tensor(s) do not fit preset {config.preset_name!r}: "
                            f"{'; '.join(problems[:6])}{'; ...' if len(problems) > 6 else ''}. Fix: {fix}.")


def load_weights(model, directory: Path, config: DeepSeekV3Config) -> None:
    """The checkpoint's model tensors into `model` (checked first: `check_checkpoint`)."""
    tensors = load_mcore_tensors(directory, config, model=model)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    missing = [key for key in missing if not key.endswith("_extra_state")]
    if missing or unexpected:
        raise GenerateError(f"--checkpoint {directory}: loading left {missing[:4]} unset and {unexpected[:4]} unused.")


@contextmanager
def converted(hf_dir: str | Path, config: DeepSeekV3Config):
    """An HF DeepSeek-V3 directory as a dist_checkpointing one, in a temporary directory
    (`convert.hf_to_mcore`, which checks config.json and every tensor header first)."""
    if not (Path(hf_dir) / "config.json").is_file():
        raise GenerateError(f"--hf {hf_dir}: no config.json there{'' if Path(hf_dir).exists() else ' (it does not exist)'}. "
                            "Fix: point --hf at an HF DeepSeek-V3 directory (config.json and safetensors).")
    with tempfile.TemporaryDirectory(prefix="dsv3-generate-") as tmp:
        out = Path(tmp) / "mcore"
        print(f"[generate] converting {hf_dir} (hf-to-mcore, into a temporary directory)", file=sys.stderr, flush=True)
        hf_to_mcore(hf_dir, out, config, progress=False)
        yield out


def build_model(config: DeepSeekV3Config, directory: Path):
    """The single-process GPTModel of `config` (local spec) holding the checkpoint's weights, in eval mode."""
    check_checkpoint(directory, config)
    model = gpt_model(config)
    load_weights(model, directory, config)
    return model.eval()


# --- tokenizers and the prompt ----------------------------------------------------------------


class Bytes:
    """The compact loop's tokenizer (`datasets.ByteTokenizer`: UTF-8 bytes, 256 = end of document)."""

    name = "the byte tokenizer (the default; --tokenizer to change it)"

    def __init__(self):
        self.inner = ByteTokenizer()
        self.vocab_size = ByteTokenizer.vocab_size
        self.stop = frozenset({ByteTokenizer.eod})

    def encode(self, text: str) -> list[int]:
        return self.inner.tokenize(text)

    def stream(self, prompt: list[int] = ()):
        """A function id -> the text it completes (UTF-8 sequences are held until whole)."""
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        return lambda token: decoder.decode(bytes([token])) if token < 256 else ""


class HFTokens:
    """An HF tokenizer (`tokenizers.Tokenizer` of a tokenizer.json); its end-of-sequence token from
    tokenizer_config.json when the directory has one."""

    def __init__(self, path: str):
        from tokenizers import Tokenizer

        given = Path(path)
        file = given / TOKENIZER_FILE if given.is_dir() else given
        if not file.is_file():
            raise GenerateError(f"--tokenizer {path}: {'no ' + TOKENIZER_FILE + ' in this directory' if given.is_dir() else 'no such file'}. "
                                f"Fix: pass an HF tokenizer's {TOKENIZER_FILE} or the directory holding it.")
        try:
            self.inner = Tokenizer.from_file(str(file))
        except Exception as error:  # the library raises a bare Exception for a malformed file
            raise GenerateError(f"--tokenizer {path}: {file} is not a tokenizer the HF tokenizers library reads "
                                f"({error}). Fix: pass the tokenizer.json the model was trained with.") from None
        self.name = f"the tokenizer {path} (--tokenizer)"
        self.vocab_size = self.inner.get_vocab_size(with_added_tokens=True)
        self.stop = frozenset()
        settings = file.parent / "tokenizer_config.json"
        if settings.is_file():
            eos = json.loads(settings.read_text()).get("eos_token")
            eos = eos.get("content") if isinstance(eos, dict) else eos
            if isinstance(eos, str) and self.inner.token_to_id(eos) is not None:
                self.stop = frozenset({self.inner.token_to_id(eos)})

    def encode(self, text: str) -> list[int]:
        return self.inner.encode(text, add_special_tokens=False).ids

    def stream(self, prompt: list[int] = ()):
        """A function id -> the text it adds to the prompt's decoded text (held while it ends in an
        incomplete character)."""
        ids = list(prompt)
        shown = self.inner.decode(ids)

        def push(token: int) -> str:
            nonlocal shown
            ids.append(token)
            text = self.inner.decode(ids)
            if text.endswith("\ufffd"):  # an incomplete character: wait for its next piece
                return ""
            new, shown = text[len(shown):] if text.startswith(shown) else text, text
            return new

        return push


def load_tokenizer(path: str | None, config: DeepSeekV3Config):
    """`--tokenizer` (None: the byte tokenizer), checked against the model's vocabulary."""
    tokenizer = Bytes() if path is None else HFTokens(path)
    check_data(None, tokenizer=tokenizer.name, tokenizer_vocab_size=tokenizer.vocab_size, model_vocab="vocab_size",
               model_vocab_size=config.vocab_size,
               vocab_fix="pass the tokenizer the model was trained with (or a preset whose vocab_size covers it)")
    return tokenizer


def check_prompt(ids: list[int], max_new_tokens: int, config: DeepSeekV3Config) -> None:
    """The prompt fits the model's sequence length, and the prompt with the new tokens its positions."""
    if not ids:
        raise GenerateError("--prompt is empty: there is nothing to continue. Fix: pass some text.")
    if max_new_tokens < 1:
        raise GenerateError(f"--max-new-tokens {max_new_tokens}: must be at least 1.")
    if len(ids) > config.seq_length:
        raise GenerateError(f"--prompt: {len(ids)} tokens, longer than the model's sequence length "
                            f"seq_length={config.seq_length}. Fix: shorten the prompt to {config.seq_length} tokens or fewer.")
    limit = max_position_embeddings(config)
    if len(ids) + max_new_tokens > limit:
        raise GenerateError(f"--max-new-tokens {max_new_tokens}: the {len(ids)}-token prompt and {max_new_tokens} new tokens "
                            f"need {len(ids) + max_new_tokens} positions, the model has {limit}"
                            f"{' (YaRN: factor x original_max_position_embeddings)' if config.rope_type == 'yarn' else ' (seq_length)'}. "
                            f"Fix: --max-new-tokens {limit - len(ids)} or fewer, or a shorter prompt.")
