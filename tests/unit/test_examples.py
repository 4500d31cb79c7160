"""examples/: the Megatron-LM launch script and the SLURM scripts' dry runs (megatron_dsv3.launch)."""

import argparse
import importlib.util
import os
import subprocess
import sys

import pytest
import torch
from megatron.training.global_vars import set_global_variables, unset_global_variables
from megatron.training.training import get_train_valid_test_num_samples, update_train_iters

from megatron_dsv3 import launch, specs
from megatron_dsv3.config import PRESETS, preset
from megatron_dsv3.launch.args import NO_VALIDATION_INTERVAL
from megatron_dsv3.launch.flags import flag_value

from slurm_scripts import PRETRAIN, SBATCH, script_launch


def _load_example():
    spec = importlib.util.spec_from_file_location("pretrain_dsv3", PRETRAIN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


pretrain_dsv3 = _load_example()


@pytest.fixture(scope="module", autouse=True)
def dry_run_671b(tmp_path_factory):
    """The 671B script's dry run as a process of its own (bash, then Python on this CPU-only
    machine), started before this module's other tests so that it runs beside them."""
    logs = tmp_path_factory.mktemp("dry_run_671b")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DRY_RUN": "1", "PYTHON": sys.executable}
    with open(logs / "out", "w") as out, open(logs / "err", "w") as err:
        process = subprocess.Popen(["bash", str(SBATCH["deepseek_v3_671b"])], env=env, cwd="/", stdout=out, stderr=err)

    def result():
        returncode = process.wait(timeout=300)
        return returncode, (logs / "out").read_text(), (logs / "err").read_text()

    yield result
    process.kill()


def _main(monkeypatch, argv, world_size=1, rank="0"):
    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setattr(sys, "argv", ["pretrain_dsv3.py", *argv])
    return pretrain_dsv3.main()


def _sbatch_launch(tmp_path, monkeypatch, name, *extra):
    """The script's world size, rank and flags (slurm_scripts.script_launch); sets LOCAL_WORLD_SIZE."""
    world_size, rank, gpus_per_node, argv = script_launch(name, tmp_path, *extra)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", gpus_per_node)
    return world_size, rank, argv


def _sbatch_dry_run(tmp_path, monkeypatch, name, *extra):
    """The script's flags run here, in-process, by examples/pretrain_dsv3.py's main(): one Python
    start-up for all the scripts. Returns main()'s exit code."""
    world_size, rank, argv = _sbatch_launch(tmp_path, monkeypatch, name, *extra)
    return _main(monkeypatch, argv, world_size, rank)


def _dataset_sizes(args):
    """What Megatron-LM's `pretrain` asks of the parsed flags before it builds the datasets:
    the training iterations (`update_train_iters`), then the samples of each split."""
    set_global_variables(args, build_tokenizer=False)
    try:
        update_train_iters(args)
        return get_train_valid_test_num_samples()
    finally:
        unset_global_variables()


@pytest.fixture
def tiny_launch(monkeypatch):
    """Megatron-LM's global args of a tiny-preset launch on this CPU process; unset after."""

    def parse(*extra):
        argv = ["--dsv3-preset", "tiny", "--micro-batch-size", "2", "--global-batch-size", "2", "--train-iters", "10",
                "--eval-iters", "0", "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "256",
                "--no-bias-swiglu-fusion", "--no-bias-dropout-fusion",  # compiled on first use: seconds on a CPU
                *extra]
        monkeypatch.setattr(sys, "argv", ["pretrain_dsv3.py", *launch.expand_argv(argv)])
        args = launch.parse_args()
        set_global_variables(args)
        return args

    monkeypatch.setenv("RANK", "0")
    yield parse
    unset_global_variables()


# --- The launch script: flags, presets, model provider, forward step


def test_help_works_without_a_gpu(monkeypatch, capsys):
    with pytest.raises(SystemExit) as exit_:
        _main(monkeypatch, ["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "--dsv3-preset" in out and "--pipeline-schedule" in out and "--dsv3-fp8" in out


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_flags_give_the_preset_config(monkeypatch, name):
    """Megatron-LM's parser over `preset_argv(name)` builds the preset's config: every mapped
    field (and what a switch implies) equals the preset's value."""
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setattr(sys, "argv", ["pretrain_dsv3.py", *launch.expand_argv(["--dsv3-preset", name, "--micro-batch-size", "1", "--eval-iters", "0", "--dry-run"])])
    args = launch.parse_args()
    config, expected = launch.model_config(args), preset(name)
    for field_name in [*launch.PRESET_FLAGS, *launch.PRESET_IMPLIED]:
        assert getattr(config, field_name) == getattr(expected, field_name), field_name
    for field_name in launch.PRESET_SWITCHES:  # Megatron-LM leaves some switches None for False
        assert bool(getattr(config, field_name)) == getattr(expected, field_name), field_name
    assert config.multi_latent_attention and not config.apply_rope_fusion


def test_schedule_flags_reject_what_is_no_schedule():
    assert launch.step_schedule("0:0.3,0.5:0.1").value_at(60, 100) == 0.1
    for text in ("0.5:0.1", "0:0.3;0.5:0.1", "0:x"):
        with pytest.raises(argparse.ArgumentTypeError, match="expected 'none' or START:VALUE"):
            launch.step_schedule(text)


def test_model_config_carries_every_megatron_field_into_ours(tiny_launch, monkeypatch):
    """Megatron-LM flags the preset does not set, and four it does (the command line comes after
    the preset's flags, so it wins), reach our config with the values written on the command line."""
    monkeypatch.setenv("WORLD_SIZE", "1")
    args = tiny_launch("--dsv3-gamma-schedule", "none", "--dsv3-lambda-schedule", "0:0.3,0.5:0.2",
                       "--recompute-granularity", "selective", "--moe-z-loss-coeff", "0.001", "--moe-input-jitter-eps", "0.02",
                       "--mscale", "0.9", "--mscale-all-dim", "0.8", "--rotary-percent", "0.5", "--calculate-per-token-loss",
                       "--moe-per-layer-logging",
                       "--attention-dropout", "0.05", "--init-method-std", "0.01", "--rotary-base", "5000",
                       "--moe-router-topk-scaling-factor", "2.0")
    config = launch.model_config(args)
    assert config.bias_update_rate_schedule is None
    assert config.mtp_loss_scaling_schedule.steps == ((0.0, 0.3), (0.5, 0.2))
    expected = {
        "recompute_granularity": "selective", "moe_z_loss_coeff": 0.001, "moe_input_jitter_eps": 0.02, "mscale": 0.9,
        "mscale_all_dim": 0.8, "rotary_percent": 0.5, "calculate_per_token_loss": True, "moe_per_layer_logging": True,
        "attention_dropout": 0.05, "init_method_std": 0.01, "rotary_base": 5000, "moe_router_topk_scaling_factor": 2.0,
    }
    assert {name: getattr(config, name) for name in expected} == expected


def test_model_provider_and_forward_step_match_the_reference_model(tiny_launch, monkeypatch):
    """On CPU (tests/conftest.py enables megatron_dsv3.cpu): the provider's model and forward
    step give the loss of `specs.gpt_model(preset("tiny"))`, built from the same seed, and the
    step first sets gamma and lambda from the tokens consumed."""
    monkeypatch.setenv("WORLD_SIZE", "1")
    args = tiny_launch()
    assert args.padded_vocab_size == preset("tiny").vocab_size
    torch.manual_seed(5)
    model = pretrain_dsv3.model_provider()
    torch.manual_seed(5)
    reference = specs.gpt_model(preset("tiny"))
    ours, theirs = model.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours if torch.is_tensor(ours[k]))

    train, _, _ = pretrain_dsv3.datasets_provider([2, 0, 0])
    batch = next(iter(torch.utils.data.DataLoader(train, batch_size=2)))
    args.consumed_train_samples = 14  # of 20: past lambda's step at 10/14.8, before gamma's
    per_token_loss, loss_func = pretrain_dsv3.forward_step(iter([batch]), model)
    loss_sum, num_tokens, report = loss_func(per_token_loss)
    assert torch.isfinite(loss_sum) and int(num_tokens) == 2 * 128
    expected = reference(batch["tokens"], batch["position_ids"], None, labels=batch["labels"], loss_mask=batch["loss_mask"])
    torch.testing.assert_close(per_token_loss, expected, rtol=0, atol=0)
    assert (model.config.mtp_loss_scaling_factor, model.config.moe_router_bias_update_rate) == (0.1, 0.01)


def test_model_provider_builds_the_ranks_two_chunks_under_dualpipev(tiny_launch, monkeypatch):
    """PP 2 under DualPipeV: rank 0 holds stages 0 and 3 of 4, with Megatron's per-rank layers
    (2 and 2) split over them; stage 3 carries the head and the MTP block."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    tiny_launch("--pipeline-model-parallel-size", "2", "--pipeline-schedule", "dualpipev", "--global-batch-size", "6",
                "--num-layers", "4", "--moe-layer-freq", "[0,1,1,1]")
    chunks = pretrain_dsv3.model_provider()
    assert isinstance(chunks, list) and len(chunks) == 2
    down, up = chunks
    assert [len(chunk.decoder.layers) for chunk in chunks] == [1, 1]
    assert down.pre_process and not down.post_process and up.post_process and up.mtp_process
    assert [layer.layer_number for chunk in chunks for layer in chunk.decoder.layers] == [1, 4]
    chunks.model_type = "set by Megatron-LM's get_model"  # a plain list would refuse it


@pytest.mark.parametrize("name", sorted(PRESETS))
@pytest.mark.parametrize("num_layers", [1, 4, 7])
def test_num_layers_after_a_preset_recomputes_its_moe_layer_freq(name, num_layers):
    """As preset(name, num_layers=N): the preset's first k layers dense (at most N), the rest MoE;
    either spelling of the flag."""
    expected = flag_value(preset(name, num_layers=num_layers).moe_layer_freq)
    for argv in (["--dsv3-preset", name, "--num-layers", str(num_layers)], ["--dsv3-preset", name, f"--num-layers={num_layers}"]):
        expanded = launch.expand_argv(argv)
        assert [expanded[i + 1] for i, flag in enumerate(expanded) if flag == "--moe-layer-freq"] == [expected]


def test_num_layers_after_a_preset_gives_a_model_config_like_presets(tiny_launch, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    config = launch.model_config(tiny_launch("--num-layers", "4"))
    assert config.num_layers == 4 and config.moe_layer_freq == preset("tiny", num_layers=4).moe_layer_freq == [0, 1, 1, 1]


def test_a_given_moe_layer_freq_is_kept(tiny_launch, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert tiny_launch("--num-layers", "4", "--moe-layer-freq", "([0]*2+[1]*2)").moe_layer_freq == [0, 0, 1, 1]


TINY = ["--dsv3-preset", "tiny", "--micro-batch-size", "2", "--global-batch-size", "2", "--train-iters", "10", "--eval-iters", "0",
        "--dry-run"]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--num-layers", "4", "--moe-layer-freq", "[0,1,1]"],
         "--moe-layer-freq=[0,1,1] (3 entries) with --num-layers=4: needs one 0 (dense) or 1 (MoE) per layer. "
         "Fix: pass --moe-layer-freq '([0]*1+[1]*3)' (the first 1 dense, then MoE)"),
        (["--moe-layer-freq", "([0]*2+[1]*3)"],  # the preset's 3 layers
         "--moe-layer-freq=[0,0,1,1,1] (5 entries) with --num-layers=3: needs one 0 (dense) or 1 (MoE) per layer. "
         "Fix: pass --moe-layer-freq '([0]*2+[1]*1)'"),
        (["--moe-layer-freq", "[0,2,1]"], "--moe-layer-freq=[0,2,1] (3 entries) with --num-layers=3"),
    ],
)
def test_a_moe_layer_freq_that_does_not_fit_num_layers_names_both_flags(monkeypatch, capsys, extra, message):
    assert _main(monkeypatch, [*TINY, *extra]) == 2
    err = capsys.readouterr().err
    assert f"error: {message}" in err and "after --dsv3-preset, leave --moe-layer-freq out" in err
    assert "first_k_dense_freq(" not in err


ON_A_CPU = [*(flag for flag in TINY if flag != "--dry-run"), "--mock-data", "--tokenizer-type", "NullTokenizer",
            "--vocab-size", "256", "--distributed-backend", "gloo"]
WITHOUT_CUDA = "on a machine without CUDA, "


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--distributed-backend", "nccl"], "--distributed-backend=nccl on a machine without CUDA. Fix: pass --distributed-backend gloo."),
        (["--moe-token-dispatcher-type", "flex"],
         f"{WITHOUT_CUDA}--moe-token-dispatcher-type: moe_token_dispatcher_type='flex': the flex dispatcher runs DeepEP's"),
        (["--transformer-impl", "transformer_engine"], f"{WITHOUT_CUDA}--transformer-impl: transformer_impl='transformer_engine'"),
        (["--bf16"], f"{WITHOUT_CUDA}--bf16: bf16=True: the CPU path trains in fp32"),
        (["--dsv3-preset", "tiny-fp8", "--dsv3-fp8", "scaled_mm"], f"{WITHOUT_CUDA}--dsv3-fp8: fp8_blockwise='scaled_mm'"),
        (["--use-precision-aware-optimizer"], "--use-precision-aware-optimizer on a machine without CUDA: it needs"),
    ],
)
def test_what_the_cpu_path_cannot_run_stops_the_launch_naming_the_flag(monkeypatch, capsys, extra, message):
    """Before any process group or hook (runtime.prepare's first step on a machine without CUDA)."""
    try:
        assert _main(monkeypatch, [*ON_A_CPU, *extra]) == 2
    finally:
        unset_global_variables()
    assert f"error: {message}" in capsys.readouterr().err


def test_zero_layers_is_refused_naming_the_flag(monkeypatch, capsys):
    assert _main(monkeypatch, [*TINY, "--num-layers", "0"]) == 2
    assert "error: --num-layers=0: a model needs at least one layer. Fix: pass --num-layers >= 1." in capsys.readouterr().err


NO_INTERVAL = "Fix: pass --eval-interval N (validate every N steps), or --eval-iters 0 for no validation."


@pytest.mark.parametrize(
    "flags, message",
    [
        ([flag for flag in TINY if flag not in ("--eval-iters", "0")],  # Megatron-LM's default: 100
         "--eval-interval is not set and --eval-iters=100: Megatron-LM validates every --eval-interval steps and divides "
         f"by it to size the validation data (a TypeError before the first step). {NO_INTERVAL}"),
        ([*TINY, "--eval-iters", "10"], "--eval-interval is not set and --eval-iters=10: "),
        ([*TINY, "--full-validation"], "--eval-interval is not set and --eval-iters=0 with --full-validation: "),
        ([*TINY, "--eval-interval", "0"], "--eval-interval=0: Megatron-LM divides by it to size the validation data. Fix: "
                                          "pass a positive --eval-interval N"),
    ],
)
def test_a_launch_that_validates_needs_an_eval_interval(monkeypatch, capsys, flags, message):
    assert _main(monkeypatch, flags) == 2
    err = capsys.readouterr().err
    assert f"error: {message}" in err and (NO_INTERVAL in err or "--eval-interval=0" in message)


@pytest.mark.parametrize(
    "extra, sizes",
    [
        ([], (20, 0, 0)),  # no validation: the interval is filled in only as the divisor Megatron-LM needs
        (["--eval-interval", "5", "--eval-iters", "2"], (20, (10 // 5 + 1) * 2 * 2, 2 * 2)),  # 3 validations of 2 x 2
    ],
)
def test_validation_flags_size_megatrons_datasets(tiny_launch, monkeypatch, extra, sizes):
    """10 steps of 2 samples, sized as `pretrain` does before step 0 (tiny_launch sets Megatron's globals)."""
    monkeypatch.setenv("WORLD_SIZE", "1")
    args = tiny_launch(*extra)
    assert args.eval_interval == (int(extra[1]) if extra else NO_VALIDATION_INTERVAL)
    update_train_iters(args)
    assert get_train_valid_test_num_samples() == sizes


def test_every_sbatch_launch_sizes_megatrons_datasets(tmp_path, monkeypatch):
    """The scripts' flags through Megatron-LM's dataset sizing, as `pretrain` runs it before step 0
    (a TypeError there without an --eval-interval); each script trains without validation."""
    steps = {"deepseek_v3_671b": 3613281250 // 15360, "deepseek_v2_lite": 100000, "proxy": 20000}
    for name in SBATCH:
        world_size, rank, argv = _sbatch_launch(tmp_path, monkeypatch, name)
        monkeypatch.setenv("WORLD_SIZE", str(world_size))
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setattr(sys, "argv", ["pretrain_dsv3.py", *launch.expand_argv(argv)])
        args = launch.parse_args()
        train, valid, test = _dataset_sizes(args)
        assert (args.train_iters, valid, test) == (steps[name], 0, 0), name
        assert train == (args.train_samples or steps[name] * args.global_batch_size), name


# --- Layout checks (megatron_dsv3.launch)


PROXY = ["--dsv3-preset", "proxy", "--micro-batch-size", "4", "--global-batch-size", "256", "--eval-iters", "0", "--dry-run",
         "--pipeline-model-parallel-size", "8"]


@pytest.mark.parametrize(
    "world_size, extra, message",
    [
        (12, [], "WORLD_SIZE=12 is not divisible by --tensor-model-parallel-size=1 x --pipeline-model-parallel-size=8 x "
                 "--context-parallel-size=1"),
        (16, ["--expert-model-parallel-size", "8"], "--expert-model-parallel-size=8 x --expert-tensor-parallel-size=1 does "
                                                    "not divide the 2 GPUs of a pipeline stage (WORLD_SIZE=16 / --pipeline-model-parallel-size=8)"),
        (16, ["--global-batch-size", "100"], "--global-batch-size=100 is not divisible by --micro-batch-size=4 x data-parallel size 2"),
        (16, ["--pipeline-schedule", "dualpipev", "--global-batch-size", "48"],  # checked before Megatron's 12 % 8
         "--pipeline-schedule=dualpipev with --pipeline-model-parallel-size=8 and 6 micro-batches"),
        (16, ["--pipeline-schedule", "dualpipev", "--num-layers", "8", "--moe-layer-freq", "[0]+[1]*7",
              "--no-gradient-accumulation-fusion"],
         "gives stages of [1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0] layers"),
        (16, ["--pipeline-schedule", "dualpipev"], "--pipeline-schedule=dualpipev needs --no-gradient-accumulation-fusion: "
                                                   "gradient_accumulation_fusion=True: DualPipe and DualPipeV defer the local "
                                                   "linears' weight gradients (megatron_dsv3.weight_grad)"),
        (16, ["--dsv3-fb-overlap"], "--dsv3-fb-overlap: fb_overlap=True: the FB step hands over at expert-parallel all-to-alls, "
                                    "and this model has none"),
        (16, ["--dsv3-fb-overlap", "--expert-model-parallel-size", "2"],
         "--dsv3-fb-overlap with --pipeline-schedule=1f1b: FB steps are DualPipe's and DualPipeV's"),
    ],
)
def test_impossible_layouts_name_the_flags(monkeypatch, capsys, world_size, extra, message):
    assert _main(monkeypatch, [*PROXY, *extra], world_size) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "name, extra, nodes, message",
    [
        ("deepseek_v3_671b", ["--expert-model-parallel-size", "48"], None,
         "--expert-model-parallel-size: expert_model_parallel_size=48: does not divide num_moe_experts=256"),
        ("deepseek_v3_671b", [], "255", "WORLD_SIZE=2040 is not divisible by --tensor-model-parallel-size=1 x "
                                        "--pipeline-model-parallel-size=16 x --context-parallel-size=1"),
        ("deepseek_v2_lite", [], "3", "--expert-model-parallel-size=8 x --expert-tensor-parallel-size=1 does not divide "
                                      "the 12 GPUs of a pipeline stage (WORLD_SIZE=24 / --pipeline-model-parallel-size=2)"),
        ("deepseek_v3_671b", ["--global-batch-size", "3072"], None,
         "--pipeline-schedule=dualpipev with --pipeline-model-parallel-size=16 and 24 micro-batches"),
    ],
)
def test_a_wrong_sbatch_layout_fails_naming_the_flags(tmp_path, monkeypatch, capsys, name, extra, nodes, message):
    if nodes:
        monkeypatch.setenv("NODES", nodes)
    assert _sbatch_dry_run(tmp_path, monkeypatch, name, *extra) == 2
    assert f"error: {message}" in capsys.readouterr().err


# Last: these wait for the 671B dry run's process, which the tests above ran beside.


def test_671b_dry_run_prints_the_papers_layout(dry_run_671b):
    returncode, out, err = dry_run_671b()
    assert returncode == 0, err[-3000:]
    for line in (
        "deepseek-v3: 2048 GPUs = 256 nodes x 8",
        "parallelism  TP 1, PP 16, CP 1, DP 128 (ZeRO-1: distributed optimizer)",
        "dualpipev: 32 stages, 2 per rank",
        "256 routed, EP 64 x ETP 1: 4 per GPU, an EP group spans 8 nodes",
        "flex (deepep, 20 SMs) dispatcher",
        "15360 = micro 1 x DP 128 x 120 micro-batches",
        "61 + 1 MTP",
        "FP8 te; recompute selective layernorm mla_up_proj",
    ):
        assert line in out, out
    rows = [line.split() for line in out.splitlines() if line.split() and line.split()[0].isdigit()]
    assert len(rows) == 16
    assert " ".join(rows[0]) == "0 stage 0: 1 +embedding stage 31: 61 +head +MTP"
    assert " ".join(rows[15]) == "15 stage 15: 30-31 stage 16: 32"


def test_every_sbatch_dry_run_passes_and_prints_the_layout(dry_run_671b, tmp_path, monkeypatch, capsys):
    assert set(SBATCH) == {"deepseek_v3_671b", "deepseek_v2_lite", "proxy"}
    layouts = {}
    for name in SBATCH:
        assert _sbatch_dry_run(tmp_path, monkeypatch, name) == 0, name
        layouts[name] = capsys.readouterr().out
        assert "parallelism  TP 1" in layouts[name] and "micro-batches" in layouts[name], layouts[name]
    assert layouts["deepseek_v3_671b"] == dry_run_671b()[1].split("\n", 1)[1]  # as printed by a process of its own
    assert "deepseek-v2-lite: 16 GPUs = 2 nodes x 8" in layouts["deepseek_v2_lite"]
    assert "27; per stage [7, 7, 7, 6]" in layouts["deepseek_v2_lite"]
    assert "0  stage 0: 1-7 +embedding" in layouts["deepseek_v2_lite"]
    assert "proxy: 8 GPUs = 1 node x 8" in layouts["proxy"] and "EP 8 x ETP 1: 8 per GPU" in layouts["proxy"]
