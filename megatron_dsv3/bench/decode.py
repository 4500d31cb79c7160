"""decode: MLA's latent KV cache and MTP speculative decoding, measured (issue 15, item 4).

Design note
-----------
Models. `tiny`: the demo's checkpoint (`runs/demo/checkpoints`, its preset from the run's
config.json) when there is one; else, with `--train-steps N`, a tiny model trained here for N
steps by the compact loop; else a randomly initialised `tiny` (the JSON's `weights` says which).
`proxy`: DeepSeek-V3's shape at 1.5B parameters, randomly initialised (N(0, init_method_std),
norms 1), when its parameters fit in half the available memory (`--no-proxy` skips it).

For each model, greedy decoding of `new_tokens` tokens after a `prompt_tokens` prompt (the tiny
model's prompt is Python source from the standard library, the demo's corpus; the proxy's random
ids), one mode after another, `repeat` rounds interleaved, median tokens/s over the tokens after
the first (the first comes with the prompt's forward, timed apart as prefill), in wall-clock time
and per second of this process's CPU time (`tokens_per_cpu_s`, time.process_time: what the work
took, whatever else the machine runs; with one thread the fairer comparison on a shared machine):
  latent         the absorbed MLA cache: per token and layer c^KV and k^R (generate/latent_cache.py)
  uncompressed   per-head K = [k^C ; k^R] and V cached (`--no-absorb`)
  recompute      no cache: the model's full forward over the whole sequence for every token
  upstream_static_kv   Megatron's own StaticInferenceContext through GPTModel.forward: per-head K
                 and V, as upstream caches MLA on the static path (a reference, not ours)
  mtp            `latent` with MTP speculative decoding (one draft a forward, verified in the next);
                 its acceptance also under speculative sampling at temperature 1 (untimed): greedy
                 decoding of an undertrained model falls into repeats that any draft predicts
Every mode must give the same tokens (`same_tokens`). Cache bytes per token and layer are
measured from the cache tensors themselves (bytes of one layer's buffers / slots), the latent
one checked against (kv_lora_rank + qk_pos_emb_head_dim) x dtype bytes; `mha_equivalent` is
2 n_h d_h x dtype bytes, the multi-head-attention cache of report §2.1.1's comparison.

CPU timings depend on the machine's other load. One intra-op thread by default (`--threads`): the
decode step's operations are small, and on a 2-core machine shared with other work each parallel
region waits for both threads to be scheduled; measured under such load, 2 threads made the whole
run 5x slower (503 s against 105 s), the proxy's recompute mode 16x. The tiny model's decode is
dominated by per-module Python overhead, so its tokens/s say little about the cache's arithmetic,
which the proxy shows better. A random model's MTP acceptance means nothing: greedy, its drafts
miss; sampled, p and q are both near uniform, so min(1, p/q) is near 1.

The last line of output is one JSON object (`run`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import torch

from megatron_dsv3 import cpu
from megatron_dsv3.config import parse_override, preset
from megatron_dsv3.convert.hf import meta_model
from megatron_dsv3.distributed import init_distributed, seed_everything
from megatron_dsv3.generate import loading
from megatron_dsv3.generate.decoder import CachedDecoder
from megatron_dsv3.generate.engine import Stats, generate, now
from megatron_dsv3.generate.sampling import Sampling

DEMO_CHECKPOINTS = Path("runs/demo/checkpoints")
MODES = ("latent", "uncompressed", "recompute", "upstream_static_kv", "mtp")
SAMPLED_TEMPERATURE = 1.0  # the MTP acceptance under sampling, beside greedy's
PROMPT_SOURCE = "textwrap.py"  # a standard-library file: the demo's corpus is the standard library


def _log(message: str) -> None:
    print(f"[bench decode] {message}", file=sys.stderr, flush=True)


# --- the models -----------------------------------------------------------------------------


def _trained_tiny(steps: int, directory: Path) -> Path:
    """A tiny model trained `steps` steps by the compact loop (single process); its checkpoint."""
    from megatron_dsv3.training.loop import TrainArgs, train

    train(TrainArgs(preset="tiny", steps=steps, micro_batch_size=8, num_microbatches=1, warmup_steps=min(10, steps // 4),
                    corpus_bytes=1_000_000, run_dir=directory, save_interval=steps, progress=False))
    return directory / "checkpoints"


def tiny_model(checkpoint: Path | None, train_steps: int, scratch: Path):
    """(model, description of its weights)."""
    trained = checkpoint is None and train_steps > 0
    if trained:
        _log(f"training tiny for {train_steps} steps")
        checkpoint = _trained_tiny(train_steps, scratch / "tiny-run")
    if checkpoint is not None:
        directory = loading.resolve_checkpoint(checkpoint)
        name, overrides = loading.recorded_preset(directory) or ("tiny", {})
        config = loading.generation_config(name, overrides)
        weights = (f"trained here for {train_steps} steps (compact loop, tiny)" if trained
                   else f"{directory} ({loading.preset_options(name, overrides)})")
        return loading.build_model(config, directory), weights
    from megatron_dsv3.specs import gpt_model

    return gpt_model(preset("tiny")).eval(), "random init (tiny)"


def _parameter_bytes(config) -> int:
    return sum(p.numel() * p.element_size() for p in meta_model(config).parameters())


def _available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def proxy_model(overrides: dict):
    """The `proxy` preset's model with random weights (None when it does not fit), and why not."""
    from megatron_dsv3.specs import gpt_model

    config = loading.generation_config("proxy", overrides)
    need, have = _parameter_bytes(config), _available_bytes()
    if need > have // 2:
        return None, f"skipped: {need / 2**30:.1f} GiB of parameters, {have / 2**30:.1f} GiB available"
    model = gpt_model(config).eval()  # perform_initialization=False: fill it ourselves, quickly
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 1:
                param.fill_(1.0)  # norm scales
            else:
                param.normal_(0.0, config.init_method_std, generator=generator)
        for name, buffer in model.named_buffers():
            if name.endswith("expert_bias"):
                buffer.zero_()
    return model, f"random init (proxy, {need / 2**30:.1f} GiB fp32)"


def tiny_prompt(tokens: int) -> list[int]:
    text = (Path(sysconfig.get_paths()["stdlib"]) / PROMPT_SOURCE).read_bytes()
    return list(text[:tokens])


# --- the modes ------------------------------------------------------------------------------


@torch.inference_mode()
def _recompute(model, prompt: list[int], new_tokens: int, stats: Stats) -> list[int]:
    """Greedy with no cache: the full forward over the whole sequence for every token."""
    ids, out = list(prompt), []
    started = now()
    for i in range(new_tokens):
        tokens = torch.tensor([ids])
        logits = model(tokens, torch.arange(len(ids))[None], None)
        out.append(int(logits[0, -1].argmax()))
        ids.append(out[-1])
        stats.clock(started, prefill=i == 0)
    stats.new_tokens = len(out)
    return out


@torch.inference_mode()
def _upstream_static(model, prompt: list[int], new_tokens: int, stats: Stats) -> tuple[list[int], int]:
    """Greedy through GPTModel.forward with Megatron's StaticInferenceContext; (tokens, cache bytes
    per token and layer, measured from its key_value_memory_dict)."""
    from megatron.core.inference.contexts import StaticInferenceContext

    context = StaticInferenceContext(1, len(prompt) + new_tokens)
    started = now()
    step, out = torch.tensor([prompt]), []
    for i in range(new_tokens):
        offset = context.sequence_len_offset
        positions = torch.arange(offset, offset + step.shape[1])[None]
        logits = model(step, positions, None, inference_context=context)
        context.sequence_len_offset += step.shape[1]
        out.append(int(logits[0, -1].argmax()))
        step = torch.tensor([[out[-1]]])
        stats.clock(started, prefill=i == 0)
    stats.new_tokens = len(out)
    key, value = next(iter(context.key_value_memory_dict.values()))
    slots = key.shape[0] * key.shape[1]
    return out, (key.nbytes + value.nbytes) // slots


def run_mode(model, mode: str, prompt: list[int], new_tokens: int) -> dict:
    stats, extra = Stats(), {}
    if mode == "recompute":
        tokens = _recompute(model, prompt, new_tokens, stats)
    elif mode == "upstream_static_kv":
        tokens, extra["cache_bytes"] = _upstream_static(model, prompt, new_tokens, stats)
    else:
        decoder = CachedDecoder(model, len(prompt) + new_tokens + 2, absorb=mode != "uncompressed", mtp=mode == "mtp")
        tokens = list(generate(decoder, prompt, new_tokens, speculative=mode == "mtp", stats=stats))
        extra["cache_bytes"] = decoder.bytes_per_token_per_layer()
    return dict(tokens=tokens, tokens_per_s=stats.decode_tokens_per_s, tokens_per_cpu_s=stats.decode_tokens_per_cpu_s,
                prefill_s=stats.prefill_s,
                drafts=stats.drafts, accepted=stats.accepted, main_forwards=stats.main_forwards, **extra)


def measure(model, name: str, weights: str, prompt: list[int], new_tokens: int, repeat: int, modes=MODES) -> dict:
    c = model.config
    modes = [m for m in modes if m != "mtp" or c.mtp_num_layers]
    for mode in modes:  # warm-up: first calls pay one-time costs
        run_mode(model, mode, prompt[:8], 3)
    runs = {mode: [] for mode in modes}
    for round_ in range(repeat):
        for mode in modes:
            runs[mode].append(run_mode(model, mode, prompt, new_tokens))
            _log(f"{name} round {round_ + 1}/{repeat} {mode}: {runs[mode][-1]['tokens_per_s']:.2f} tokens/s")
    first = {mode: results[0] for mode, results in runs.items()}
    dtype_bytes = model.embedding.word_embeddings.weight.element_size()
    latent_expected = (c.kv_lora_rank + c.qk_pos_emb_head_dim) * dtype_bytes
    cache = {"latent": first["latent"]["cache_bytes"], "latent_expected": latent_expected,
             "uncompressed": first["uncompressed"]["cache_bytes"],
             "upstream_static_kv": first.get("upstream_static_kv", {}).get("cache_bytes"),
             "mha_equivalent": 2 * c.num_attention_heads * c.qk_head_dim * dtype_bytes, "dtype_bytes": dtype_bytes}
    speed = {mode: statistics.median(r["tokens_per_s"] for r in results) for mode, results in runs.items()}
    result = {
        "name": name, "weights": weights, "prompt_tokens": len(prompt), "new_tokens": new_tokens, "repeat": repeat,
        "layers": c.num_layers, "cache_bytes_per_token_per_layer": cache,
        "latent_bytes_exact": cache["latent"] == latent_expected,
        "latent_vs_uncompressed": cache["uncompressed"] / cache["latent"],
        "latent_vs_mha": cache["mha_equivalent"] / cache["latent"],
        "tokens_per_s": speed,
        "tokens_per_cpu_s": {mode: statistics.median(r["tokens_per_cpu_s"] for r in results) for mode, results in runs.items()},
        "prefill_s": {mode: statistics.median(r["prefill_s"] for r in results) for mode, results in runs.items()},
        "same_tokens": all(r["tokens"] == first["latent"]["tokens"] for results in runs.values() for r in results),
    }
    if "mtp" in runs:
        drafts = sum(r["drafts"] for r in runs["mtp"])
        accepted = sum(r["accepted"] for r in runs["mtp"])
        sampled = sampled_acceptance(model, prompt, new_tokens)
        result["mtp"] = {"acceptance": accepted / drafts if drafts else None, "drafts": drafts, "accepted": accepted,
                         "tokens_per_forward": new_tokens / (1 + statistics.median(r["main_forwards"] for r in runs["mtp"])),
                         "speedup_vs_latent": speed["mtp"] / speed["latent"],
                         "speedup_vs_latent_cpu": result["tokens_per_cpu_s"]["mtp"] / result["tokens_per_cpu_s"]["latent"],
                         f"acceptance_sampled_t{SAMPLED_TEMPERATURE:g}": sampled}
    return result


def sampled_acceptance(model, prompt: list[int], new_tokens: int, seed: int = 0) -> float | None:
    """MTP acceptance under speculative sampling at SAMPLED_TEMPERATURE: greedy decoding of an
    undertrained model falls into repeats that any draft predicts."""
    decoder = CachedDecoder(model, len(prompt) + new_tokens + 2, mtp=True)
    stats = Stats()
    generator = torch.Generator().manual_seed(seed)
    for _ in generate(decoder, prompt, new_tokens, Sampling(SAMPLED_TEMPERATURE), generator, speculative=True, stats=stats):
        pass
    return stats.acceptance if stats.drafts else None


def run(checkpoint: Path | None = None, train_steps: int = 0, prompt_tokens: int = 32, new_tokens: int = 64,
        repeat: int = 3, proxy: bool = True, proxy_new_tokens: int = 16, proxy_overrides: dict | None = None,
        seed: int = 0) -> dict:
    """{"benchmark": "decode", "models": [tiny's result, proxy's result or why it was skipped], "elapsed_s"}.
    The tiny model: `checkpoint`, else trained `train_steps` steps, else random."""
    started = time.perf_counter()
    init_distributed()
    cpu.enable()
    seed_everything(seed)
    models = []
    with tempfile.TemporaryDirectory(prefix="bench-decode-") as scratch:
        model, weights = tiny_model(checkpoint, train_steps, Path(scratch))
        models.append(measure(model, "tiny", weights, tiny_prompt(prompt_tokens), new_tokens, repeat))
        del model
    if proxy:
        model, weights = proxy_model(proxy_overrides or {})
        if model is None:
            models.append({"name": "proxy", "weights": weights})
        else:
            generator = torch.Generator().manual_seed(seed)
            prompt = torch.randint(0, model.config.vocab_size, (prompt_tokens,), generator=generator).tolist()
            models.append(measure(model, "proxy", weights, prompt, proxy_new_tokens, 1))
    return {"benchmark": "decode", "models": models, "threads": torch.get_num_threads(),
            "elapsed_s": round(time.perf_counter() - started, 1)}


def format_table(result: dict) -> str:
    lines = []
    for m in result["models"]:
        lines.append(f"{m['name']}: {m['weights']}")
        if "tokens_per_s" not in m:
            continue
        cache = m["cache_bytes_per_token_per_layer"]
        lines.append(f"  cache bytes per token and layer: latent {cache['latent']} (expected {cache['latent_expected']}: "
                     f"{'exact' if m['latent_bytes_exact'] else 'MISMATCH'}), uncompressed {cache['uncompressed']} "
                     f"({m['latent_vs_uncompressed']:.1f}x), MHA-equivalent 2 n_h d_h {cache['mha_equivalent']} "
                     f"({m['latent_vs_mha']:.1f}x)")
        lines.append(f"  greedy, {m['prompt_tokens']}-token prompt, {m['new_tokens']} new tokens, median of {m['repeat']}; "
                     f"same tokens in every mode: {m['same_tokens']}")
        for mode, speed in m["tokens_per_s"].items():
            lines.append(f"    {mode:<20} {speed:8.2f} tokens/s   {m['tokens_per_cpu_s'][mode]:8.2f} tokens per CPU s   "
                         f"prefill {m['prefill_s'][mode]:.3f} s")
        if "mtp" in m:
            mtp = m["mtp"]
            sampled = mtp[f"acceptance_sampled_t{SAMPLED_TEMPERATURE:g}"]
            lines.append(f"  MTP (greedy): {mtp['accepted']}/{mtp['drafts']} drafts accepted ({mtp['acceptance']:.1%}), "
                         f"{mtp['tokens_per_forward']:.2f} tokens per main forward, "
                         f"{mtp['speedup_vs_latent']:.2f}x the tokens/s of latent without speculation "
                         f"({mtp['speedup_vs_latent_cpu']:.2f}x per CPU s); "
                         f"sampling at temperature {SAMPLED_TEMPERATURE:g}: {sampled:.1%} accepted")
    return "\n".join(lines)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("decode", help="decoding: MLA latent cache vs uncompressed vs no cache; MTP speculation")
    parser.add_argument("--checkpoint", type=Path, help=f"the tiny model's checkpoint (default: {DEMO_CHECKPOINTS} if it exists)")
    parser.add_argument("--train-steps", type=int, default=0,
                        help="without a checkpoint: train a tiny model this many steps first (0: random init)")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-proxy", dest="proxy", action="store_false", help="skip the proxy-shaped model")
    parser.add_argument("--proxy-new-tokens", type=int, default=16)
    parser.add_argument("--proxy-set", dest="proxy_overrides", action="append", type=parse_override, default=[],
                        metavar="FIELD=JSON", help="override a field of the proxy preset (repeatable)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (0: torch's default); see the module note")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(main=main)


def main(args: argparse.Namespace) -> int:
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    checkpoint = args.checkpoint
    if checkpoint is None and not args.train_steps and DEMO_CHECKPOINTS.exists():
        checkpoint = DEMO_CHECKPOINTS
    result = run(checkpoint, args.train_steps, args.prompt_tokens, args.new_tokens, args.repeat, args.proxy,
                 args.proxy_new_tokens, dict(args.proxy_overrides), args.seed)
    print(format_table(result))
    print(json.dumps(result))
    return 0

