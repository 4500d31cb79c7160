"""`python -m megatron_dsv3.generate (--checkpoint DIR | --hf DIR) --preset NAME [--set FIELD=JSON ...]
--prompt TEXT [--max-new-tokens N] [--temperature T] [--top-p P] [--seed S] [--tokenizer PATH]
[--speculative mtp] [--no-absorb]`: the prompt's continuation on stdout as it is generated, then
a line of figures (tokens/s, cache bytes, MTP acceptance) on stderr. Bad input exits 2 with a
named error before any work.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from megatron_dsv3 import cpu
from megatron_dsv3.config import ConfigError, parse_override
from megatron_dsv3.convert.hf import ConversionError
from megatron_dsv3.datasets import DataError
from megatron_dsv3.distributed import init_distributed, seed_everything
from megatron_dsv3.generate.decoder import CachedDecoder
from megatron_dsv3.generate.engine import Stats, generate
from megatron_dsv3.generate.loading import (
    GenerateError,
    build_model,
    check_prompt,
    converted,
    generation_config,
    load_tokenizer,
    resolve_checkpoint,
)
from megatron_dsv3.generate.sampling import Sampling


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m megatron_dsv3.generate", description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a dist_checkpointing checkpoint: the converter's output, a run's "
                        "checkpoints/ (its `latest`), or one iter_N")
    source.add_argument("--hf", help="an HF DeepSeek-V3 directory, converted on the fly into a temporary directory")
    parser.add_argument("--preset", required=True, help="the preset the checkpoint was made with")
    parser.add_argument("--set", dest="overrides", action="append", type=parse_override, default=[], metavar="FIELD=JSON",
                        help="a config field of the checkpoint's model, as for training (repeatable)")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizer", help="an HF tokenizer.json or its directory (default: the compact loop's bytes)")
    parser.add_argument("--speculative", choices=["none", "mtp"], default="none",
                        help="mtp: the MTP module drafts the token after next; the main model verifies it")
    parser.add_argument("--no-absorb", action="store_true",
                        help="cache per-head K and V instead of MLA's latent c^KV and k^R (for comparison)")
    parser.add_argument("--ignore-eos", action="store_true", help="do not stop at the end-of-document token")
    return parser


def run(args) -> Stats:
    try:
        sampling = Sampling(args.temperature, args.top_p)
    except ValueError as error:
        raise GenerateError(str(error)) from None
    config = generation_config(args.preset, dict(args.overrides))
    if args.speculative == "mtp" and not config.mtp_num_layers:
        raise GenerateError(f"--speculative mtp: preset {args.preset!r} has no MTP module (mtp_num_layers="
                            f"{config.mtp_num_layers}). Fix: --speculative none, or the preset the checkpoint was made with.")
    tokenizer = load_tokenizer(args.tokenizer, config)
    prompt = tokenizer.encode(args.prompt)
    check_prompt(prompt, args.max_new_tokens, config)
    init_distributed()
    cpu.enable(config)
    seed_everything(args.seed)
    if args.checkpoint is not None:
        model = build_model(config, resolve_checkpoint(args.checkpoint))
    else:
        with converted(args.hf, config) as directory:
            model = build_model(config, directory)
    device = model.embedding.word_embeddings.weight.device
    generator = torch.Generator(device=device).manual_seed(args.seed)
    decoder = CachedDecoder(model, len(prompt) + args.max_new_tokens + 2, absorb=not args.no_absorb,
                            mtp=args.speculative == "mtp")
    stats = Stats()
    text = tokenizer.stream(prompt)
    sys.stdout.write(args.prompt)
    sys.stdout.flush()
    stop = frozenset() if args.ignore_eos else tokenizer.stop
    for token in generate(decoder, prompt, args.max_new_tokens, sampling, generator,
                          speculative=args.speculative == "mtp", stop=stop, stats=stats):
        sys.stdout.write(text(token))
        sys.stdout.flush()
    sys.stdout.write("\n")
    cache = "per-head K/V" if args.no_absorb else "latent c^KV + k^R"
    line = (f"[generate] {stats.new_tokens} new tokens after a {stats.prompt_tokens}-token prompt: "
            f"{stats.decode_tokens_per_s:.1f} tokens/s decoding (prefill {stats.prefill_s:.3f} s); "
            f"cache {decoder.bytes_per_token_per_layer()} B per token and layer ({cache})")
    if args.speculative == "mtp":
        line += f"; MTP drafts accepted {stats.accepted}/{stats.drafts} ({100 * stats.acceptance:.0f}%)"
    print(line, file=sys.stderr, flush=True)
    return stats


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    started = time.perf_counter()
    try:
        run(args)
    except (GenerateError, ConfigError, ConversionError, DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"[generate] {time.perf_counter() - started:.1f} s in all", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
