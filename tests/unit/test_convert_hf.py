"""HF DeepSeek-V3 <-> Megatron conversion against HF transformers' DeepseekV3 (CPU, fp32).

The HF fixture is a random tiny DeepseekV3ForCausalLM saved with save_pretrained in several
shards, then stored as DeepSeek releases it: BF16 except the FP32 e_score_correction_bias,
plus an MTP module at HF layer index num_hidden_layers (HF 5.x does not build one, so the test
writes its tensors). Norm weights and the bias are far from their init so a mapping error shows.

Where HF differs from the paper the config avoids the difference: HF scores a group by the
sum of its top-2 affinities, the paper and Megatron by the top topk/topk_group, so topk=4 with
topk_group=2 (both 2); the brief's topk=2 would make them disagree.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from megatron_dsv3.config import preset
from megatron_dsv3.convert import TABLE, ConversionError, hf_to_mcore, load_mcore_tensors, mcore_to_hf
from megatron_dsv3.convert.__main__ import main as cli
from megatron_dsv3.specs import gpt_model

transformers = pytest.importorskip("transformers")
from hf_models import INDEX, MTP, OVERRIDES, DeepseekV3ForCausalLM, config, hf_files, release_like, tiny_hf_model  # noqa: E402


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory):
    """(HF model in fp32 holding the BF16-rounded weights, its release-like directory)."""
    hf_model = tiny_hf_model()
    directory = tmp_path_factory.mktemp("hf")
    release_like(hf_model, directory)
    assert len(list(directory.glob("*.safetensors"))) >= 4
    return hf_model, directory


@pytest.fixture(scope="module")
def mcore_checkpoint(hf_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("mcore") / "ckpt"
    hf_to_mcore(hf_checkpoint[1], out, config(), progress=False)
    return out


def test_logits_match_hf_transformers(hf_checkpoint, mcore_checkpoint):
    hf_model, _ = hf_checkpoint
    model = gpt_model(config()).eval()
    result = model.load_state_dict(load_mcore_tensors(mcore_checkpoint, config()), strict=False)
    assert not result.unexpected_keys and all(k.endswith("_extra_state") for k in result.missing_keys)

    ids_BS = torch.randint(0, 257, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours_BSV = model(ids_BS, torch.arange(24).expand(2, 24), None)
        theirs_BSV = hf_model(ids_BS).logits  # HF has no MTP module: main-model logits only
    diff = (ours_BSV - theirs_BSV).abs().max().item()
    print(f"max |logits - HF logits| = {diff:.3g} (logit scale {theirs_BSV.abs().max().item():.3g})")
    assert ours_BSV.shape == theirs_BSV.shape
    assert diff < 1e-4


def assert_bit_identical(back: dict, original: dict, widened=()) -> None:
    """Same names, dtypes and bits; a name ending in one of `widened` comes back in FP32 with the same value."""
    assert set(back) == set(original)
    for name, tensor in original.items():
        if name.endswith(widened):
            assert back[name].dtype == torch.float32 and torch.equal(back[name], tensor.float()), name
            continue
        assert back[name].dtype == tensor.dtype, name
        assert torch.equal(back[name].view(torch.uint8), tensor.view(torch.uint8)), name


def test_round_trip_is_bit_identical(hf_checkpoint, mcore_checkpoint, tmp_path):
    """The release's dtypes (the router's gate in BF16) come back bit for bit; the gate comes back
    as HF keeps it, in FP32, with the same values."""
    mcore_to_hf(mcore_checkpoint, tmp_path / "back", config(), progress=False)
    assert_bit_identical(hf_files(tmp_path / "back"), hf_files(hf_checkpoint[1]), widened=("mlp.gate.weight",))
    original = json.loads((hf_checkpoint[1] / "config.json").read_text())
    exported = json.loads((tmp_path / "back" / "config.json").read_text())
    assert original["dtype"] == "float32" and exported == {**original, "dtype": "bfloat16"}  # the files are BF16
    assert transformers.DeepseekV3Config(**exported).num_nextn_predict_layers == 1


# --- what HF's save_pretrained writes ------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_saved(hf_checkpoint, tmp_path_factory):
    """The fixture's model loaded by HF in BF16 (`from_pretrained(dtype=bfloat16)`: the gate and
    the bias stay FP32, `_keep_in_fp32_modules_strict`) and written by HF's `save_pretrained` in
    several shards. The gate gets full-precision FP32 values; HF builds no MTP module, so the
    config says none."""
    model = DeepseekV3ForCausalLM.from_pretrained(hf_checkpoint[1], dtype=torch.bfloat16)
    with torch.no_grad():
        for name, tensor in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                assert tensor.dtype == torch.float32, name
                tensor.normal_(0, 0.3, generator=torch.Generator().manual_seed(3))
    directory = tmp_path_factory.mktemp("hf-saved")
    model.config.num_nextn_predict_layers = 0
    model.save_pretrained(directory, max_shard_size="150KB")
    assert len(list(directory.glob("*.safetensors"))) >= 3
    return directory


def test_export_dtypes_are_what_hf_save_pretrained_writes(hf_saved, mcore_checkpoint, tmp_path):
    mcore_to_hf(mcore_checkpoint, tmp_path / "ours", config(), progress=False)
    ours, theirs = hf_files(tmp_path / "ours"), hf_files(hf_saved)
    assert {t.dtype for t in theirs.values()} == {torch.bfloat16, torch.float32}
    for name, tensor in theirs.items():
        assert ours[name].dtype == tensor.dtype, f"{name}: ours {ours[name].dtype}, HF's save_pretrained {tensor.dtype}"
    mtp = {name for name in ours if name.startswith(f"model.layers.{MTP}.")}  # HF 5.x builds none
    assert set(ours) - set(theirs) == mtp
    for name in mtp:  # as the decoder layer of its shape, or as DeepSeek's release (BF16)
        twin = name.replace(f"model.layers.{MTP}.", f"model.layers.{MTP - 1}.")
        assert ours[name].dtype == (theirs[twin].dtype if twin in theirs else torch.bfloat16), name


def test_round_trip_of_hf_save_pretrained_is_bit_identical(hf_saved, tmp_path):
    no_mtp = config(mtp_num_layers=None)
    hf_to_mcore(hf_saved, tmp_path / "mcore", no_mtp, progress=False)
    mcore_to_hf(tmp_path / "mcore", tmp_path / "back", no_mtp, progress=False)
    assert_bit_identical(hf_files(tmp_path / "back"), hf_files(hf_saved))
    assert json.loads((tmp_path / "back" / "config.json").read_text()) == json.loads((hf_saved / "config.json").read_text())


# --- config.json: the release's comes back as it was ------------------------------------------------

# DeepSeek-V3's config.json (the release's fields and values) at the tiny model's sizes
RELEASE_CONFIG = {
    "architectures": ["DeepseekV3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config", "AutoModel": "modeling_deepseek.DeepseekV3Model",
                 "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"},
    "aux_loss_alpha": 0.001, "bos_token_id": 0, "eos_token_id": 1, "ep_size": 1, "first_k_dense_replace": 1,
    "hidden_act": "silu", "hidden_size": 64, "initializer_range": 0.02, "intermediate_size": 192, "kv_lora_rank": 32,
    "max_position_embeddings": 163840, "model_type": "deepseek_v3", "moe_intermediate_size": 32, "moe_layer_freq": 1,
    "n_group": 4, "n_routed_experts": 8, "n_shared_experts": 1, "norm_topk_prob": True, "num_attention_heads": 4,
    "num_experts_per_tok": 4, "num_hidden_layers": 3, "num_key_value_heads": 4, "num_nextn_predict_layers": 1,
    "pretraining_tp": 1, "q_lora_rank": 48, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8,
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]},
    "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "seq_aux": True,
    "tie_word_embeddings": False, "topk_group": 2, "topk_method": "noaux_tc", "torch_dtype": "bfloat16",
    "transformers_version": "4.33.1", "use_cache": True, "v_head_dim": 16, "vocab_size": 257,
}
YARN = dict(rope_type="yarn", mscale_all_dim=1.0)  # with the preset's factor 40, 4096, beta 32/1, mscale 1.0


def hf_rope(config_json: dict):
    """HF transformers' own YaRN frequencies and attention scaling for a config.json."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    return ROPE_INIT_FUNCTIONS["yarn"](transformers.DeepseekV3Config(**config_json), "cpu")


def test_release_config_json_comes_back_as_it_was(mcore_checkpoint, tmp_path):
    mcore_to_hf(mcore_checkpoint, tmp_path / "fp8", config(), fp8=True, progress=False)  # release-format weights
    (tmp_path / "fp8" / "config.json").write_text(json.dumps(RELEASE_CONFIG, indent=2))
    hf_to_mcore(tmp_path / "fp8", tmp_path / "mcore", config(**YARN), progress=False)

    mcore_to_hf(tmp_path / "mcore", tmp_path / "back-fp8", config(**YARN), fp8=True, progress=False)
    assert json.loads((tmp_path / "back-fp8" / "config.json").read_text()) == RELEASE_CONFIG
    mcore_to_hf(tmp_path / "mcore", tmp_path / "back-bf16", config(**YARN), progress=False)
    assert json.loads((tmp_path / "back-bf16" / "config.json").read_text()) == {
        k: v for k, v in RELEASE_CONFIG.items() if k != "quantization_config"}

    (tmp_path / "mcore" / "hf_config.json").unlink()  # e.g. a checkpoint our training wrote: from the preset
    mcore_to_hf(tmp_path / "mcore", tmp_path / "made", config(**YARN), progress=False)
    made = json.loads((tmp_path / "made" / "config.json").read_text())
    assert made["max_position_embeddings"] == 40 * 4096
    for ours, release in zip(hf_rope(made), hf_rope(RELEASE_CONFIG)):
        assert torch.equal(torch.as_tensor(ours), torch.as_tensor(release))


def test_recorded_config_that_disagrees_is_named(mcore_checkpoint, tmp_path):
    shutil.copytree(mcore_checkpoint, tmp_path / "mcore")
    with pytest.raises(ConversionError, match=r"hf_config.json .*'rope_scaling.type'='default' disagrees"):
        mcore_to_hf(tmp_path / "mcore", tmp_path / "out", config(**YARN), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mcore"]


def test_decoder_mapping_agrees_with_modelopt(hf_checkpoint, mcore_checkpoint):
    """modelopt's importer (it stops at MTP, so a model without one) fills the same tensors."""
    export = pytest.importorskip("modelopt.torch.export")
    model = gpt_model(preset("tiny", **OVERRIDES, mtp_num_layers=None))
    export.import_mcore_gpt_from_hf(model, str(hf_checkpoint[1]), dtype=torch.float32, moe_router_dtype="fp32")
    ours = load_mcore_tensors(mcore_checkpoint, config())
    theirs = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    assert theirs and set(theirs) <= set(ours)
    for name, tensor in theirs.items():
        assert torch.equal(ours[name], tensor), name


def reference_fp8_round_trip(weight_OI: torch.Tensor) -> torch.Tensor:
    """DeepSeek's 128x128 block FP8 from scratch: per block s = amax/448, q = fp8(w/s), w' = q*s."""
    out = torch.empty_like(weight_OI, dtype=torch.float32)
    for r in range(0, weight_OI.shape[0], 128):
        for c in range(0, weight_OI.shape[1], 128):
            block = weight_OI[r : r + 128, c : c + 128].float()
            scale_inv = block.abs().max() / 448
            out[r : r + 128, c : c + 128] = (block / scale_inv).to(torch.float8_e4m3fn).float() * scale_inv
    return out


def test_fp8_export_then_import_matches_reference(hf_checkpoint, mcore_checkpoint, tmp_path):
    mcore_to_hf(mcore_checkpoint, tmp_path / "fp8", config(), fp8=True, progress=False)
    exported = hf_files(tmp_path / "fp8")
    quantised = {r.hf.rsplit("}", 1)[-1] for r in TABLE if r.fp8}  # ".self_attn.q_a_proj.weight", ...
    for name, tensor in exported.items():
        if name.endswith("weight_scale_inv"):
            weight = exported[name.removesuffix("_scale_inv")]
            assert tensor.dtype == torch.float32 and tensor.shape == tuple(-(-n // 128) for n in weight.shape)
        elif any(name.endswith(suffix) for suffix in quantised):
            assert tensor.dtype == torch.float8_e4m3fn, name
        else:  # embeddings, norms, lm_head, eh_proj in BF16; the router's gate and bias in FP32, as HF keeps them
            assert tensor.dtype == (torch.float32 if name.endswith(("bias", "mlp.gate.weight")) else torch.bfloat16), name

    hf_to_mcore(tmp_path / "fp8", tmp_path / "again", config(), progress=False)
    before = load_mcore_tensors(mcore_checkpoint, config())
    after = load_mcore_tensors(tmp_path / "again", config())
    fp8_kinds = ("linear_q_down_proj", "linear_q_up_proj", "linear_kv_down_proj", "linear_kv_up_proj",
                 "linear_proj", "linear_fc1", "linear_fc2")
    for name, tensor in before.items():
        if any(f".{kind}." in name for kind in fp8_kinds):
            halves = tensor.chunk(2) if "linear_fc1" in name else (tensor,)  # gate and up are quantised apart
            expected = torch.cat([reference_fp8_round_trip(h) for h in halves])
        else:
            expected = tensor
        assert torch.equal(after[name], expected), name


def test_fp8_block_format_on_several_blocks():
    from megatron_dsv3.convert import dequantize_fp8, quantize_fp8

    weight = torch.randn(300, 260) * torch.logspace(-3, 1, 260)  # 3 x 3 blocks, partial edges
    quantised, scale_inv = quantize_fp8(weight)
    assert quantised.dtype == torch.float8_e4m3fn and scale_inv.shape == (3, 3)
    assert torch.equal(dequantize_fp8(quantised, scale_inv), reference_fp8_round_trip(weight))


def test_fp8_dequantisation_by_bits_is_torchs_bit_for_bit():
    """dequantize_fp8 widens the codes with integer operations (see it): every code, both signs and
    subnormal codes, with scales down to where the products are FP32 subnormals, into FP32 and BF16,
    equals torch's FP8 -> FP32 conversion times the scale (rounded once to BF16); a block of rows
    with a NaN code, or a scale the widening cannot take, goes through torch's conversion."""
    from megatron_dsv3.convert import dequantize_fp8
    from megatron_dsv3.convert.hf import _subnormal_inputs_kept

    assert _subnormal_inputs_kept()  # else only the fallback would be tested here
    finite = torch.tensor([c for c in range(256) if c & 0x7F != 0x7F], dtype=torch.uint8)
    codes = finite[torch.randint(0, len(finite), (300, 260), generator=torch.Generator().manual_seed(0))]
    scale = torch.logspace(-33, 1, 9, base=16.0).reshape(3, 3)  # 2^-132 .. 2^4: products down to FP32 subnormals

    def torchs(codes_OI, scale_BoBi):
        expanded = scale_BoBi.repeat_interleave(128, 0).repeat_interleave(128, 1)[:300, :260]
        return codes_OI.view(torch.float8_e4m3fn).float() * expanded

    def same_bits(a, b):
        return torch.equal(a.view(torch.int32 if a.dtype == torch.float32 else torch.int16),
                           b.view(torch.int32 if b.dtype == torch.float32 else torch.int16))

    for case_codes, case_scale in ((codes, scale), (codes.clone().index_fill_(0, torch.tensor([0, 299]), 0x7F), scale),
                                   (codes, scale * torch.tensor([[1.0, 1.0, 2.0 ** 10]] * 3))):  # NaN rows; a 2^14 scale
        reference = torchs(case_codes, case_scale)
        fp8 = case_codes.view(torch.float8_e4m3fn)
        assert same_bits(dequantize_fp8(fp8, case_scale), reference)
        assert same_bits(dequantize_fp8(fp8, case_scale, out=torch.empty(300, 260, dtype=torch.bfloat16)), reference.bfloat16())


# --- parallel mode: torchrun's ranks share the work, the checkpoint is the single process's ------------


def checkpoint_items(directory: Path) -> tuple[dict, dict]:
    """A dist_checkpointing directory as DCP's index describes it: {(name, offset): (metadata of the
    item's tensor or object, the item's bytes as written)}, and the files other than .distcp."""
    from torch.distributed.checkpoint import FileSystemReader

    from megatron_dsv3 import safe_load

    with safe_load.reading(directory):
        metadata = FileSystemReader(str(directory)).read_metadata()
    items = {}
    for index, stored in metadata.storage_data.items():
        with open(directory / stored.relative_path, "rb") as f:
            f.seek(stored.offset)
            data = f.read(stored.length)
        described = metadata.state_dict_metadata[index.fqn]
        if hasattr(described, "chunks"):  # a tensor: its global size, dtype and chunks (sorted: ranks list them in their order)
            described = (described.size, described.properties.dtype, sorted((tuple(c.offsets), tuple(c.sizes)) for c in described.chunks))
        else:
            described = type(described).__name__
        items[(index.fqn, tuple(index.offset or ()))] = (described, data)
    others = {f.name: f.read_bytes() for f in directory.iterdir() if f.suffix != ".distcp" and f.name != ".metadata"}
    return items, others


def test_torchrun_conversion_writes_the_single_process_checkpoint(hf_checkpoint, mcore_checkpoint, tmp_path):
    """`torchrun --nproc-per-node 2 -m megatron_dsv3.convert hf-to-mcore`: each rank writes its share
    into its own .distcp file; every item (tensor chunk or object) is the single process's
    (`mcore_checkpoint`), byte for byte, with the same metadata; only files and offsets differ."""
    out = tmp_path / "parallel"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "megatron_dsv3.convert", "hf-to-mcore", "--hf", str(hf_checkpoint[1]), "--out", str(out),
               "--preset", "tiny", "--set", "moe_router_topk=4"]
    run = subprocess.run(command, capture_output=True, text=True, env={**CHILD_ENV, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "on 2 process(es)" in run.stderr
    files = {f.name: f.stat().st_size for f in out.glob("*.distcp")}
    assert sorted(files) == ["__0_0.distcp", "__1_0.distcp"] and min(files.values()) > 0.3 * max(files.values())

    single, single_other = checkpoint_items(mcore_checkpoint)
    parallel, parallel_other = checkpoint_items(out)
    assert single.keys() == parallel.keys()
    for key, (described, data) in single.items():
        assert parallel[key][0] == described, key
        assert parallel[key][1] == data, key
    assert parallel_other == single_other  # metadata.json, hf_config.json
    loaded = load_mcore_tensors(out, config())
    for name, tensor in load_mcore_tensors(mcore_checkpoint, config()).items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name].view(torch.uint8), tensor.view(torch.uint8)), name


# --- bad input: the error names the tensor and the file; nothing is left behind ------------------


def mutate_shard(directory: Path, name: str, change) -> Path:
    """Apply `change(tensors)` to the shard holding `name`; returns that shard's path."""
    path = directory / json.loads((directory / INDEX).read_text())["weight_map"][name]
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path)
    return path


def drop_from_index(directory: Path, name: str) -> None:
    index = json.loads((directory / INDEX).read_text())
    del index["weight_map"][name]
    (directory / INDEX).write_text(json.dumps(index))


def add_to_index(directory: Path, name: str, file: str) -> None:
    index = json.loads((directory / INDEX).read_text())
    index["weight_map"][name] = file
    (directory / INDEX).write_text(json.dumps(index))


KV_B = "model.layers.1.self_attn.kv_b_proj.weight"
NORM = "model.layers.2.input_layernorm.weight"


def missing_shard(d: Path):
    path = d / json.loads((d / INDEX).read_text())["weight_map"][KV_B]
    path.unlink()
    return path.name, "missing shard"


def wrong_shape(d: Path):
    path = mutate_shard(d, KV_B, lambda t: t.update({KV_B: t[KV_B][:, :16].contiguous()}))
    return path.name, KV_B


def unknown_key(d: Path):
    path = mutate_shard(d, KV_B, lambda t: t.update({"model.layers.1.self_attn.bogus.weight": torch.zeros(2)}))
    add_to_index(d, "model.layers.1.self_attn.bogus.weight", path.name)
    return path.name, "model.layers.1.self_attn.bogus.weight"


def missing_key(d: Path):
    mutate_shard(d, KV_B, lambda t: t.pop(KV_B))
    drop_from_index(d, KV_B)
    return INDEX, KV_B


def wrong_dtype(d: Path):
    path = mutate_shard(d, NORM, lambda t: t.update({NORM: t[NORM].to(torch.int32)}))
    return path.name, NORM


def truncated_shard(d: Path):
    path = d / json.loads((d / INDEX).read_text())["weight_map"][KV_B]
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path.name, "not a readable safetensors file"


def index_not_json(d: Path):
    (d / INDEX).write_text('{"weight_map": {')
    return INDEX, "not a readable JSON index"


def index_without_weight_map(d: Path):
    (d / INDEX).write_text('{"metadata": {}}')
    return INDEX, "has no weight_map"


def broken_config(d: Path):
    (d / "config.json").write_text("{'hidden_size': 64}")
    return "config.json", "not a readable JSON config"


@pytest.mark.parametrize("damage", [missing_shard, wrong_shape, unknown_key, missing_key, wrong_dtype,
                                    truncated_shard, index_not_json, index_without_weight_map, broken_config])
def test_bad_input_names_tensor_and_file_and_leaves_no_output(hf_checkpoint, tmp_path, damage):
    source = tmp_path / "hf"
    shutil.copytree(hf_checkpoint[1], source)
    file, tensor = damage(source)
    with pytest.raises(ConversionError) as error:
        hf_to_mcore(source, tmp_path / "out", config(), progress=False)
    assert file in str(error.value) and tensor in str(error.value), str(error.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_a_killed_conversions_partial_output_is_removed_by_the_next(hf_checkpoint, tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    stale = tmp_path / f".out.partial-{dead.stdout.strip()}"  # a pid that has exited
    (stale / "half-written").mkdir(parents=True)
    hf_to_mcore(hf_checkpoint[1], tmp_path / "out", config(), progress=False)
    assert not stale.exists() and (tmp_path / "out").is_dir()


def test_failure_while_writing_leaves_no_output(hf_checkpoint, tmp_path, monkeypatch):
    from megatron_dsv3.convert import hf

    calls, read = [], hf._read_hf_into

    def failing_read(checkpoint, name, *rest):
        calls.append(name)
        if len(calls) == 20:
            raise OSError(f"disk error reading {name}")
        read(checkpoint, name, *rest)

    monkeypatch.setattr(hf, "_read_hf_into", failing_read)
    with pytest.raises(OSError, match="disk error"):
        hf_to_mcore(hf_checkpoint[1], tmp_path / "out", config(), progress=False)
    assert list(tmp_path.iterdir()) == []


def test_config_mismatch_and_cli(hf_checkpoint, tmp_path, capsys):
    hf_dir = str(hf_checkpoint[1])
    assert cli(["hf-to-mcore", "--hf", hf_dir, "--out", str(tmp_path / "a"), "--preset", "tiny"]) == 1
    assert "'num_experts_per_tok'=4" in capsys.readouterr().err  # the preset's topk is 2
    with pytest.raises(SystemExit):  # the output has no parallel layout (dist_checkpointing reshards on load)
        cli(["hf-to-mcore", "--hf", hf_dir, "--out", str(tmp_path / "b"), "--preset", "tiny", "--tp", "2"])
    assert "unrecognized arguments: --tp 2" in capsys.readouterr().err
    assert cli(["hf-to-mcore", "--hf", hf_dir, "--out", str(tmp_path / "c"), "--preset", "tiny",
                "--set", "moe_router_topk=4"]) == 0
    assert cli(["mcore-to-hf", "--mcore", str(tmp_path / "c"), "--out", str(tmp_path / "d"), "--preset", "tiny",
                "--set", "moe_router_topk=4", "--fp8"]) == 0
    with safe_open(tmp_path / "d" / "model-00002-of-00006.safetensors", "pt") as f:
        assert f.get_slice("model.layers.0.mlp.gate_proj.weight").get_dtype() == "F8_E4M3"


# --- memory: one shard's worth, whatever the number of shards ------------------------------------

MEMORY_LAYER = dict(hidden_size=1024, ffn_hidden_size=3072, num_attention_heads=4, mtp_num_layers=None)


def synthetic_checkpoint(directory: Path, num_layers: int) -> int:
    """A dense DeepSeek-V3-shaped checkpoint, one ~19 MB shard per layer; returns the largest shard's bytes."""
    cfg = preset("tiny", **MEMORY_LAYER, num_layers=num_layers, moe_layer_freq=[0] * num_layers)
    from megatron_dsv3.convert.hf import entries, hf_config, meta_model

    shapes = {k: tuple(v.shape) for k, v in meta_model(cfg).state_dict().items() if isinstance(v, torch.Tensor)}
    shards: dict[str, dict] = {}
    for entry in entries(cfg):
        shape = shapes[entry.mcore]
        rows = entry.rows_of(shape[0])
        layer = int(entry.group.split(".")[1]) if entry.group.startswith("layer.") else (0 if entry.group == "embed" else num_layers - 1)
        shards.setdefault(f"model-{layer:05d}.safetensors", {})[entry.hf] = torch.randn(rows.stop - rows.start, *shape[1:]).bfloat16()
    weight_map = {}
    for file, tensors in shards.items():
        save_file(tensors, directory / file)
        weight_map.update(dict.fromkeys(tensors, file))
    (directory / INDEX).write_text(json.dumps({"weight_map": weight_map}))
    (directory / "config.json").write_text(json.dumps(hf_config(cfg, fp8=False)))
    return max((directory / f).stat().st_size for f in shards)


MEASURE = textwrap.dedent("""
    import json, sys
    from megatron_dsv3 import cpu
    from megatron_dsv3.config import preset
    from megatron_dsv3.convert import hf_to_mcore
    from megatron_dsv3.distributed import init_distributed

    hf_dir, out, overrides = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    init_distributed(); cpu.enable()
    config = preset("tiny", **overrides)
    status = lambda field: 1024 * int(next(l for l in open("/proc/self/status") if l.startswith(field)).split()[1])
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
    before = status("VmRSS:")
    hf_to_mcore(hf_dir, out, config, progress=False)
    print(json.dumps({"peak_over_baseline": status("VmHWM:") - before}))
""")


# without this process's torch.distributed rendezvous (init_distributed put it in os.environ)
CHILD_ENV = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")}


def converted_peak(hf_dir: Path, out: Path, num_layers: int) -> int:
    """Peak RSS of a conversion minus the RSS just before it (interpreter, torch, Megatron, meta model).

    A fresh process per measurement; glibc's mmap threshold is pinned so a freed tensor goes back
    to the OS at once and RSS follows the live tensors, not the allocator's cache.
    """
    overrides = {**MEMORY_LAYER, "num_layers": num_layers, "moe_layer_freq": [0] * num_layers}
    run = subprocess.run(
        [sys.executable, "-c", MEASURE, str(hf_dir), str(out), json.dumps(overrides)],
        capture_output=True, text=True, env={**CHILD_ENV, "MALLOC_MMAP_THRESHOLD_": "1048576"},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])["peak_over_baseline"]


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_shards(tmp_path):
    (tmp_path / "one").mkdir()
    (tmp_path / "sixteen").mkdir()
    shard_one = synthetic_checkpoint(tmp_path / "one", 1)
    shard_sixteen = synthetic_checkpoint(tmp_path / "sixteen", 16)
    one = converted_peak(tmp_path / "one", tmp_path / "one.out", 1)
    sixteen = converted_peak(tmp_path / "sixteen", tmp_path / "sixteen.out", 16)
    total = sum(f.stat().st_size for f in (tmp_path / "sixteen").glob("*.safetensors"))
    print(f"largest shard {shard_one / 2**20:.1f} / {shard_sixteen / 2**20:.1f} MiB; 16 shards {total / 2**20:.0f} MiB; "
          f"peak over baseline: 1 shard {one / 2**20:.1f} MiB, 16 shards {sixteen / 2**20:.1f} MiB, "
          f"ratio {sixteen / one:.2f}")
    assert sixteen <= 1.5 * one
