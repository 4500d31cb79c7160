"""README.md's code, run as written: the Python snippet of "Use the specs in a Megatron project" in
a fresh process (with the 671B model on the meta device), and the flag list of "From Megatron-LM's
`pretrain_gpt.py`" against `megatron_dsv3.launch.preset_argv`."""

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from megatron.training.arguments import moe_freq_type
from megatron.training.arguments import parse_args as megatron_parse_args
from megatron.training.global_vars import set_global_variables, unset_global_variables
from megatron.training.training import get_train_valid_test_num_samples, update_train_iters

from megatron_dsv3 import launch
from megatron_dsv3.config import count_parameters, preset

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text()

# A fresh process: without this one's torch.distributed rendezvous (tests/conftest.py's
# init_distributed put it in os.environ).
CHILD_ENV = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")}


def section(title: str) -> str:
    """The README's text under the heading `title`, up to the next heading of any level (## or
    deeper: a line starting "# " is a comment in a code block)."""
    match = re.search(rf"^#{{2,6}} {re.escape(title)}\n(.*?)(?=^#{{2,6}} |\Z)", README, re.S | re.M)
    assert match, f"README.md has no heading {title!r}"
    return match.group(1)


def code_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", text, re.S | re.M)


# --- "Use the specs in a Megatron project": the snippet, verbatim, in a process of its own

# Runs the snippet (argv[1]) one top-level statement at a time, timing each, then reports on the
# names it defines: `v3`, the 671B model, and `config`, its config.
RUN_SNIPPET = r"""
import ast, json, resource, sys, time
source = open(sys.argv[1]).read()
namespace = {"__name__": "__main__"}
seconds = {}
for statement in ast.parse(source).body:
    code = compile(ast.Module([statement], type_ignores=[]), "README.md snippet", "exec")
    start = time.perf_counter()
    exec(code, namespace)
    seconds[ast.get_source_segment(source, statement)] = time.perf_counter() - start
v3 = namespace["v3"]
print(json.dumps({
    "seconds": seconds,
    "all_meta": all(p.is_meta for p in v3.parameters()),
    "parameters": sum(p.numel() for p in v3.parameters()),
    "mtp_parameters": sum(p.numel() for name, p in v3.named_parameters() if name.startswith("mtp.")),
    "num_layers": len(v3.decoder.layers),
    "preset_name": namespace["config"].preset_name,
    "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
}))
"""


def mtp_parameters(config) -> int:
    """The MTP module (report §2.2) from the config: one more MoE layer (the count of a model one
    MoE layer longer, less this one's), eh_proj (2h -> h) and three RMSNorms (enorm, hnorm and its
    final norm); it shares the embedding and the output head."""
    h = config.hidden_size
    moe_layer = count_parameters(preset(config.preset_name, num_layers=config.num_layers + 1))[0] - count_parameters(config)[0]
    return moe_layer + 2 * h * h + 3 * h


@pytest.fixture(scope="module")
def snippet_run(tmp_path_factory):
    (code,) = code_blocks(section("Use the specs in a Megatron project"), "python")
    script = tmp_path_factory.mktemp("readme") / "snippet.py"
    script.write_text(code)
    run = subprocess.run([sys.executable, "-c", RUN_SNIPPET, str(script)], cwd=script.parent, env=CHILD_ENV,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_use_the_specs_snippet_runs_as_written_in_a_fresh_process(snippet_run):
    assert snippet_run["preset_name"] == "deepseek-v3"
    assert len(snippet_run["seconds"]) > 5  # every statement ran


def test_the_snippets_671b_model_is_on_the_meta_device_built_in_seconds(snippet_run):
    """All 671B (+ MTP) parameters, on the meta device: the process never holds more than a few
    GiB (FP32 storage would be 2.7 TB), and the statement that builds it takes seconds."""
    config = preset("deepseek-v3")
    total, _ = count_parameters(config)
    assert snippet_run["all_meta"]
    assert snippet_run["num_layers"] == config.num_layers
    assert snippet_run["mtp_parameters"] == mtp_parameters(config)
    assert snippet_run["parameters"] == total + mtp_parameters(config)
    assert snippet_run["max_rss_bytes"] < 4 * 2**30
    (build,) = [seconds for statement, seconds in snippet_run["seconds"].items() if "meta_model(config)" in statement]
    assert build < 60, snippet_run["seconds"]


# --- "From Megatron-LM's pretrain_gpt.py": the flag list is preset_argv's


def _our_flags() -> set[str]:
    """The flags examples/pretrain_dsv3.py adds to Megatron-LM's (`launch.add_args`)."""
    parser = launch.add_args(argparse.ArgumentParser(add_help=False))
    return {option for action in parser._actions for option in action.option_strings}


def _flag_values(argv: list[str]) -> dict[str, tuple[str, ...]]:
    """flag -> its values; `--moe-layer-freq` as Megatron-LM reads it (a list, however written)."""
    flags: dict[str, list[str]] = {}
    for token in argv:
        if token.startswith("--"):
            assert token not in flags, f"{token} given twice"
            flags[token] = []
        else:
            flags[list(flags)[-1]].append(token)
    if "--moe-layer-freq" in flags:
        flags["--moe-layer-freq"] = [str(moe_freq_type(value)) for value in flags["--moe-layer-freq"]]
    return {flag: tuple(values) for flag, values in flags.items()}


def _pretrain_gpt_argv() -> list[str]:
    (block,) = code_blocks(section("From Megatron-LM's `pretrain_gpt.py`"), "bash")
    return shlex.split(block, comments=True)


def test_pretrain_gpt_flags_are_preset_argv_less_our_own_flags():
    """Every flag of preset_argv("deepseek-v3") with its value, except the two schedule flags
    that only examples/pretrain_dsv3.py has, and --spec: no more, no fewer."""
    ours = _our_flags()
    expected = {flag: values for flag, values in _flag_values(launch.preset_argv("deepseek-v3")).items() if flag not in ours}
    assert set(_flag_values(launch.preset_argv("deepseek-v3"))) - set(expected) == {"--dsv3-gamma-schedule", "--dsv3-lambda-schedule"}
    readme = _flag_values(_pretrain_gpt_argv())
    assert readme.pop("--spec") == ("megatron_dsv3.specs", "te_layer_spec")
    assert readme == expected


def test_pretrain_gpt_flags_parse_with_megatron_lms_own_parser(monkeypatch):
    """pretrain_gpt.py's parser (Megatron-LM's, no extra flags) takes the list as it is."""
    monkeypatch.setattr(sys, "argv", ["pretrain_gpt.py", *_pretrain_gpt_argv()])
    args = megatron_parse_args()
    assert (args.rope_type, args.attention_dropout, args.hidden_dropout) == ("rope", 0.0, 0.0)
    assert args.moe_layer_freq == preset("deepseek-v3").moe_layer_freq
    assert args.spec == ["megatron_dsv3.specs", "te_layer_spec"]


# --- "Launch with Megatron-LM (examples/)": the command


def _launch_commands() -> list[tuple[int, list[str]]]:
    """(processes, flags) of each examples/pretrain_dsv3.py command in the README's launch section."""
    commands = []
    for block in code_blocks(section("Launch with Megatron-LM (examples/)"), "bash"):
        command = shlex.split(block.split("DRY_RUN=1")[0].replace("\\\n", " "), comments=True)
        if "examples/pretrain_dsv3.py" in command:
            processes = int(command[command.index("--nproc-per-node") + 1])
            commands.append((processes, command[command.index("examples/pretrain_dsv3.py") + 1:]))
    return commands


def test_the_readme_has_a_gpu_and_a_cpu_launch_command():
    assert [("--distributed-backend" in flags, processes) for processes, flags in _launch_commands()] == [(False, 8), (True, 2)]


@pytest.mark.parametrize("command", _launch_commands(), ids=["gpu", "cpu"])
def test_the_launch_commands_size_megatrons_datasets(monkeypatch, command):
    processes, flags = command
    monkeypatch.setenv("WORLD_SIZE", str(processes))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(sys, "argv", ["pretrain_dsv3.py", *launch.expand_argv([*flags, "--dry-run"])])
    args = launch.parse_args()
    set_global_variables(args, build_tokenizer=False)
    try:
        update_train_iters(args)
        train, _, _ = get_train_valid_test_num_samples()
        assert train == args.train_iters * args.global_batch_size
    finally:
        unset_global_variables()
