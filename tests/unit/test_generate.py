"""Generation with an MLA latent KV cache and MTP speculative decoding (megatron_dsv3/generate).

References: the model's own full forward (every position's logits, and the MTP module's logits
from Megatron's MultiTokenPredictionBlock over the whole sequence), HF transformers'
DeepseekV3ForCausalLM `generate` on the same weights (tests/hf_models.py, converted), and plain
greedy decoding for the speculative loop.
"""

import json
import shutil

import pytest
import torch
from hf_models import DeepseekV3ForCausalLM, OVERRIDES, config as tiny_config, release_like, tiny_hf_model  # noqa: F401 (resolved at collection)

import megatron_dsv3.generate.__main__ as cli
from megatron_dsv3.config import preset
from megatron_dsv3.convert import hf_to_mcore
from megatron_dsv3.datasets import ByteTokenizer
from megatron_dsv3.generate import loading
from megatron_dsv3.generate.decoder import CachedDecoder
from megatron_dsv3.generate.engine import Stats, generate
from megatron_dsv3.generate.sampling import Sampling, verify_draft
from megatron_dsv3.specs import gpt_model

NEW_TOKENS = 32
PROMPT = "def main():\n    "
SETS = [arg for field, value in OVERRIDES.items() for arg in ("--set", f"{field}={json.dumps(value)}")]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tiny model's ops are too small for intra-op threads; on a busy machine their barriers make
    a decode step ~10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _rel(a, b):
    """Largest relative error over positions: |a - b| / |b| of each position's logits."""
    return float(((a - b).norm(dim=-1) / b.norm(dim=-1)).max())


def _full_forward(model, ids):
    """(logits [B, S, V], MTP logits [B, S, V]) of Megatron's own forward over the whole sequence."""
    S = ids.shape[1]
    positions = torch.arange(S).expand_as(ids)
    with torch.no_grad():
        logits = model(ids, positions, None)
        hidden = model.decoder(model.embedding(input_ids=ids, position_ids=positions), attention_mask=None)
        both = model.mtp(input_ids=ids, position_ids=positions, hidden_states=hidden, attention_mask=None,
                         embedding=model.embedding)
        mtp_logits = model.output_layer(torch.chunk(both, 2, dim=0)[1])[0].transpose(0, 1)
    return logits, mtp_logits


@pytest.mark.parametrize("absorb, rope", [(True, "rope"), (False, "rope"), (True, "yarn")],
                         ids=["latent", "uncompressed", "latent-yarn"])
def test_cached_logits_equal_the_full_forward(seeded, absorb, rope):
    # YaRN with mscale != mscale_all_dim, so that both its rotary mscale and its softmax scale are not 1
    yarn = dict(rope_type="yarn", rotary_scaling_factor=4.0, original_max_position_embeddings=16, mscale=1.0,
                mscale_all_dim=0.5) if rope == "yarn" else {}
    c = preset("tiny", seq_length=32, **yarn)
    model = gpt_model(c).eval()
    with torch.no_grad():  # norm scales away from 1, so a missing or misplaced latent norm shows
        for name, param in model.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
    ids = torch.randint(0, 256, (2, 24))
    full, full_mtp = _full_forward(model, ids)

    decoder = CachedDecoder(model, 32, absorb=absorb, mtp=True, batch=2)
    logits, hidden = zip(*(decoder.forward(ids[:, a:b]) for a, b in [(0, 9), (9, 10), (10, 12), (12, 13), (13, 24)]))
    logits, hidden = torch.cat(logits, dim=1), torch.cat(hidden, dim=0)
    assert _rel(logits, full) <= 1e-5
    # MTP position j: from h_j and t_{j+1}, in pieces as speculative decoding feeds it
    mtp = torch.cat([decoder.mtp_forward(hidden[a:b], ids[:, a + 1:b + 1]) for a, b in [(0, 7), (7, 8), (8, 10), (10, 23)]], dim=1)
    assert _rel(mtp, full_mtp[:, :23]) <= 1e-5

    # rejected drafts: the entries after a truncation are rewritten, and the logits stay right
    decoder.truncate(20, mtp_length=19)
    again, _ = decoder.forward(ids[:, 20:24])
    assert _rel(again, full[:, 20:24]) <= 1e-5

    bytes_per_value = torch.finfo(torch.float32).bits // 8
    latent = (c.kv_lora_rank + c.qk_pos_emb_head_dim) * bytes_per_value  # report §2.1.1: d_c + d_h^R
    uncompressed = c.num_attention_heads * (c.qk_head_dim + c.qk_pos_emb_head_dim + c.v_head_dim) * bytes_per_value
    assert decoder.bytes_per_token_per_layer() == (latent if absorb else uncompressed)


@pytest.fixture(scope="module")
def hf_and_ours(tmp_path_factory):
    """HF's tiny DeepseekV3 (decisive logits: a random init's are near-uniform, so rounding would
    decide ties) and ours converted from its release-like directory (with an MTP module)."""
    hf_model = tiny_hf_model()
    with torch.no_grad():
        hf_model.lm_head.weight.mul_(32)
    hf_model.generation_config.eos_token_id = None
    hf_model.generation_config.pad_token_id = 0
    hf_dir, mcore = tmp_path_factory.mktemp("hf"), tmp_path_factory.mktemp("mcore") / "converted"
    release_like(hf_model, hf_dir)
    hf_to_mcore(hf_dir, mcore, tiny_config(), progress=False)
    config = loading.generation_config("tiny", dict(OVERRIDES))
    return hf_model, hf_dir, mcore, loading.build_model(config, mcore)


@pytest.fixture(scope="module")
def hf_greedy(hf_and_ours):
    """(prompt, HF's greedy continuation: `generate(do_sample=False)`, its own KV cache)."""
    prompt = ByteTokenizer().tokenize(PROMPT)
    with torch.no_grad():
        out = hf_and_ours[0].generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False)
    return prompt, out[0, len(prompt):].tolist()


def _generate(model, prompt, absorb=True, speculative=False, sampling=Sampling(0.0), seed=0, stats=None):
    decoder = CachedDecoder(model, len(prompt) + NEW_TOKENS + 2, absorb=absorb, mtp=speculative)
    generator = torch.Generator().manual_seed(seed)
    return list(generate(decoder, prompt, NEW_TOKENS, sampling, generator, speculative=speculative, stats=stats))


def test_greedy_generation_equals_hf_generate(hf_and_ours, hf_greedy):
    hf_model, _, _, model = hf_and_ours
    prompt, expected = hf_greedy
    assert len(expected) == NEW_TOKENS
    assert _generate(model, prompt) == expected
    # the logits themselves, prefill then one token a step, against HF's forward over the whole text
    sequence = torch.tensor([prompt + expected])
    with torch.no_grad():
        hf_logits = hf_model(input_ids=sequence).logits
    decoder = CachedDecoder(model, sequence.shape[1])
    ours = torch.cat([decoder.forward(sequence[:, :len(prompt)])[0]] +
                     [decoder.forward(sequence[:, i:i + 1])[0] for i in range(len(prompt), sequence.shape[1])], dim=1)
    assert _rel(ours, hf_logits) <= 1e-5


def test_speculative_greedy_is_plain_greedy(hf_and_ours, monkeypatch):
    """Token for token, with the model's own drafts, and with drafts forced right and wrong in turn so
    that both the accept (two tokens a forward) and the reject (cache rolled back) paths run, on
    either cache."""
    _, _, _, model = hf_and_ours
    prompt = ByteTokenizer().tokenize(PROMPT)
    plain = _generate(model, prompt)
    stats = Stats()
    assert _generate(model, prompt, speculative=True, stats=stats) == plain
    assert stats.drafts > 0 and stats.main_forwards == stats.drafts

    real = CachedDecoder.mtp_forward
    calls = []

    def oracle(self, hidden, next_ids):  # the real MTP forward (its cache), then a draft of our choosing
        logits = real(self, hidden, next_ids).clone()
        target = self.mtp_cache.length + 1 - len(prompt)  # index in `plain` of the token drafted
        calls.append(target)
        if target < len(plain):
            logits[0, -1] = 0
            logits[0, -1, plain[target] if len(calls) % 3 else (plain[target] + 1) % logits.shape[-1]] = 1
        return logits

    monkeypatch.setattr(CachedDecoder, "mtp_forward", oracle)
    for absorb in (True, False):
        stats = Stats()
        assert _generate(model, prompt, absorb=absorb, speculative=True, stats=stats) == plain
        assert 0 < stats.accepted < stats.drafts
        assert stats.main_forwards < NEW_TOKENS - 1  # accepted drafts gave two tokens a forward


def test_speculative_sampling_keeps_the_target_distribution():
    """The rejection rule: the token emitted at a draft's place is distributed as p, whatever q."""
    generator = torch.Generator().manual_seed(0)
    p = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0])
    q = torch.tensor([0.1, 0.1, 0.2, 0.3, 0.3])
    sampling, trials = Sampling(1.0), 20000
    counts = torch.zeros(5)
    for _ in range(trials):
        draft = int(torch.multinomial(q, 1, generator=generator))
        counts[verify_draft(draft, q, p, sampling, generator)[1]] += 1
    torch.testing.assert_close(counts / trials, p, atol=0.015, rtol=0)


def test_top_p_keeps_the_smallest_nucleus():
    probs = Sampling(1.0, top_p=0.7).probabilities(torch.tensor([0.5, 0.3, 0.15, 0.05]).log())
    torch.testing.assert_close(probs, torch.tensor([0.625, 0.375, 0.0, 0.0]))


def test_cli_streams_hf_generation_with_mtp(hf_and_ours, hf_greedy, capsys):
    """--hf converted on the fly, greedy with MTP speculation: the text of HF's greedy tokens."""
    _, hf_dir, _, _ = hf_and_ours
    _, tokens = hf_greedy
    assert cli.main(["--hf", str(hf_dir), "--preset", "tiny", *SETS, "--prompt", PROMPT, "--max-new-tokens",
                     str(NEW_TOKENS), "--temperature", "0", "--speculative", "mtp", "--ignore-eos"]) == 0
    out, err = capsys.readouterr()
    text = loading.Bytes().stream()
    assert out == PROMPT + "".join(text(int(t)) for t in tokens) + "\n"
    assert "tokens/s" in err and "MTP drafts accepted" in err and "cache 160 B per token and layer" in err


def test_cli_with_an_hf_tokenizer(hf_and_ours, tmp_path, capsys):
    """--tokenizer: an HF tokenizer.json encodes the prompt and decodes the stream."""
    tokenizers = pytest.importorskip("tokenizers")
    _, _, mcore, model = hf_and_ours
    vocab = {f"w{i}": i for i in range(256)} | {"[UNK]": 256}  # 257 ids: the model's vocabulary
    tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    assert cli.main(["--checkpoint", str(mcore), "--preset", "tiny", *SETS, "--tokenizer", str(tmp_path / "tokenizer.json"),
                     "--prompt", "w1 w2 w3", "--max-new-tokens", "8", "--temperature", "0"]) == 0
    expected = _generate(model, [1, 2, 3])[:8]
    assert capsys.readouterr().out == tokenizer.decode([1, 2, 3] + expected) + "\n"  # "w1 w2 w3 w.. w.."


def test_bad_inputs_are_named_before_any_work(hf_and_ours, tmp_path, capsys, monkeypatch):
    _, _, mcore, _ = hf_and_ours
    monkeypatch.setattr(loading, "gpt_model", lambda *a, **k: pytest.fail("a model was built"))

    def error(*args):
        assert cli.main(["--prompt", "Hi", *args]) == 2
        return capsys.readouterr().err

    # another preset. A converted checkpoint's recorded config.json names the first field that differs,
    # even one no tensor shows (the router's top-k)
    assert "'hidden_size'=64 disagrees with preset 'tiny-fp8'" in error("--checkpoint", str(mcore), "--preset", "tiny-fp8")
    assert "'num_experts_per_tok'=4 disagrees" in error("--checkpoint", str(mcore), "--preset", "tiny")
    # a compact-loop run's checkpoints/ (`latest` followed): the tensors name it, the run's record the fix
    run = tmp_path / "run"
    shutil.copytree(mcore, run / "checkpoints" / "iter_0000007", ignore=shutil.ignore_patterns("hf_config.json"))
    (run / "checkpoints" / "latest").write_text("7")
    (run / "config.json").write_text(json.dumps({"train": {"preset": "tiny", "overrides": "{'moe_router_topk': 4}"}}))
    checkpoints = str(run / "checkpoints")
    err = error("--checkpoint", checkpoints, "--preset", "tiny-fp8")
    assert "do not fit preset 'tiny-fp8'" in err
    assert "decoder.layers.0.self_attention.linear_q_down_proj.weight has shape (48, 64), the model needs (128, 128)" in err
    assert "Fix: pass the preset and --set values the checkpoint was made with (--preset tiny --set moe_router_topk=4" in err
    assert "decoder.layers.3.input_layernorm.weight is missing" in error("--checkpoint", checkpoints, "--preset", "tiny", "--set", "num_layers=4")
    err = error("--checkpoint", checkpoints, "--preset", "tiny", "--set", "num_layers=2")
    assert "decoder.layers.2.input_layernorm.weight is in the checkpoint but not in the model" in err
    assert "not a dist_checkpointing checkpoint" in error("--checkpoint", str(tmp_path / "nowhere"), "--preset", "tiny")

    # the prompt against the sequence length, and with the new tokens against the positions (128)
    ok = ["--checkpoint", str(mcore), "--preset", "tiny", *SETS]
    assert cli.main([*ok, "--prompt", "x" * 129]) == 2
    assert "129 tokens, longer than the model's sequence length seq_length=128" in capsys.readouterr().err
    assert cli.main([*ok, "--prompt", "x" * 100, "--max-new-tokens", "40"]) == 2
    assert "need 140 positions, the model has 128" in capsys.readouterr().err
    # a tokenizer with more ids than the embedding has rows
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {f"w{i}": i for i in range(299)} | {"[UNK]": 299}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.save(str(tmp_path / "tokenizer.json"))
    err = error(*ok, "--tokenizer", str(tmp_path))
    assert "vocab_size=257: the tokenizer" in err and "has 300 ids" in err and "Fix:" in err
    assert "must be in (0, 1]" in error(*ok, "--top-p", "0")
