"""`python -m megatron_dsv3.bench decode` in miniature: a random tiny model, a few tokens, every mode."""

import json

import torch

from megatron_dsv3.bench import decode
from megatron_dsv3.bench.__main__ import build_parser


def test_bench_decode_measures_every_mode_on_the_same_tokens():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: intra-op threads only add barriers (tests/unit/test_generate.py)
    try:
        result = decode.run(checkpoint=None, prompt_tokens=8, new_tokens=4, repeat=1, proxy=False)
    finally:
        torch.set_num_threads(threads)
    json.dumps(result)  # the last line of the bench's output
    (tiny,) = result["models"]
    assert tiny["weights"] == "random init (tiny)"
    assert set(tiny["tokens_per_s"]) == set(tiny["tokens_per_cpu_s"]) == set(decode.MODES)
    assert tiny["same_tokens"]
    cache = tiny["cache_bytes_per_token_per_layer"]
    assert tiny["latent_bytes_exact"] and cache["latent"] == (32 + 8) * 4  # tiny: kv_lora_rank 32, qk_pos_emb_head_dim 8, fp32
    assert cache["uncompressed"] == cache["upstream_static_kv"] == 4 * (16 + 8 + 16) * 4  # n_h (d_h + d_R + d_v), fp32
    assert cache["mha_equivalent"] == 2 * 4 * 16 * 4
    assert 2 <= tiny["mtp"]["drafts"] <= 3  # 4 tokens: the first with the prompt, then 1 or 2 a draft
    assert "drafts accepted" in decode.format_table(result)


def test_bench_decode_is_a_subcommand():
    args = build_parser().parse_args(["decode", "--no-proxy", "--new-tokens", "8"])
    assert args.main is decode.main and not args.proxy and args.new_tokens == 8 and args.threads == 1
