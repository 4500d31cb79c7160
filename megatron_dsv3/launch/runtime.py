"""What a Megatron-LM launch sets up between parsing its flags and calling `pretrain`.

`prepare(args, model_config)` checks, on a machine without CUDA, that the flags ask for nothing
the CPU path cannot run (`check_runs_on_cpu`: errors naming the flag), then applies, in order:
  - fixes to the megatron-core 0.19.2 wheel that any machine needs (GPU or not):
      * the dataset helpers: Megatron-LM's `initialize` runs `make` in
        megatron/core/datasets to build `helpers_cpp`, but the wheel ships that extension
        prebuilt and no Makefile, so `make` fails and the launch exits before step 0.
        Where the prebuilt module imports, the build is skipped;
      * the distributed optimizer without Apex or TE (torch's AdamW): its `state_dict()`
        reads Adam's `step` from the per-parameter state, which is empty before the first
        step, and `--load` builds the loading template from it (`assert len(steps) == 1`
        fails). For that call only, an empty state is given Megatron's own zero state
        (`init_state_fn`) with step 0, and emptied again: loading then allocates it as
        Megatron does, with the checkpoint's step;
      * the distributed optimizer's per-parameter copy of a loaded checkpoint
        (`_set_main_param_and_optimizer_states`), twice:
          - with FP32 parameters its main parameters are views of the model's own (leaf)
            parameters (distrib_optimizer.py, `model_param.view(-1)[...]`), and the copy runs
            outside `no_grad` ("a view of a leaf Variable that requires grad is being used in
            an in-place operation"): it runs under `torch.no_grad()`;
          - without Apex or TE it also copies Adam's per-parameter `step` from the loading
            template (a placeholder 0), over the step `load_state_dict` has just taken from
            the checkpoint's parameter groups, so the resumed run's bias correction restarts:
            the step is left as loaded;
      * and `load_state_dict` without Apex or TE gives every parameter the *same* step tensor,
        which torch's AdamW then increments once per parameter at each step (the resumed
        run's bias correction runs ahead): each parameter gets its own copy;
      * selective recompute without TE (`--recompute-modules layernorm`, and `mla_up_proj`
        when its layer is not in FP8): `CheckpointWithoutOutput(fp8=False)` sets
        `self.fp8 = fp8 is not None`, i.e. True, so its forward asks TE's
        `FP8GlobalStateManager`, which is not imported (NameError at the first recomputed
        layer). Without TE, `fp8` is set to what the caller asked for;
  - `safe_load.install()`, so Megatron-LM's `--load` runs no code from the checkpoint;
  - on a machine without CUDA: the CPU layer for Megatron-LM's loop
    (`megatron_dsv3.cpu.enable_megatron_lm`, docs/cpu.md), and the process groups, which
    Megatron-LM builds only where `torch.cuda.device_count() > 0`: the same
    `initialize_model_parallel` call, made here from the parsed flags before `pretrain`
    (which then finds them and keeps them). `--distributed-backend gloo` is required there.
"""

from __future__ import annotations

import argparse
import datetime
import functools

import torch

from megatron_dsv3 import config, cpu, distributed, safe_load
from megatron_dsv3.config import DeepSeekV3Config
from megatron_dsv3.launch.errors import require
from megatron_dsv3.launch.layout import flagged
from megatron_dsv3.pipeline import registry


def prepare(args: argparse.Namespace, model_config: DeepSeekV3Config) -> None:
    """Everything between Megatron-LM's parsed flags and `pretrain` (module note); on a machine
    without CUDA, first rejects what the CPU path cannot run, naming the flag and the fix."""
    on_cpu = not torch.cuda.is_available()
    if on_cpu:
        check_runs_on_cpu(args, model_config)
    safe_load.install()  # Megatron-LM's --load: nothing in the checkpoint runs code
    use_prebuilt_dataset_helpers()
    let_distributed_optimizer_load()
    let_recompute_run_without_te()
    if not on_cpu:
        return
    cpu.enable_megatron_lm()
    distributed.init_distributed(
        args.pipeline_model_parallel_size,
        get_embedding_ranks=registry.SCHEDULES[args.pipeline_schedule].get_embedding_ranks,
        timeout=datetime.timedelta(minutes=args.distributed_timeout_minutes),
        backend=args.distributed_backend,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        context_parallel_size=args.context_parallel_size,
        expert_model_parallel_size=args.expert_model_parallel_size,
    )


def check_runs_on_cpu(args: argparse.Namespace, model_config: DeepSeekV3Config) -> None:
    """The CPU path's rules (`config.check_runs_on_cpu`) as flags, and gloo."""
    require(
        args.distributed_backend == "gloo",
        f"--distributed-backend={args.distributed_backend} on a machine without CUDA",
        "pass --distributed-backend gloo",
    )
    require(
        not args.use_precision_aware_optimizer,
        "--use-precision-aware-optimizer on a machine without CUDA: it needs Transformer Engine's FusedAdam",
        "drop it (and --exp-avg-dtype / --exp-avg-sq-dtype) on CPU",
    )
    try:
        config.check_runs_on_cpu(model_config)
    except config.ConfigError as error:
        raise flagged(error, "on a machine without CUDA, ") from None


def use_prebuilt_dataset_helpers() -> None:
    """Skip Megatron-LM's `make` of the dataset helpers where the wheel's prebuilt one imports."""
    from megatron.core.datasets import utils

    try:
        from megatron.core.datasets import helpers_cpp  # noqa: F401  (the wheel's prebuilt extension)
    except ImportError:
        return  # a source checkout: Megatron-LM's make builds it
    utils.compile_helpers = lambda: None


def let_distributed_optimizer_load() -> None:
    """The load fixes of the distributed optimizer (module note). Idempotent."""
    from megatron.core.optimizer import distrib_optimizer

    optimizer_class = distrib_optimizer.DistributedOptimizer
    if getattr(optimizer_class, "_megatron_dsv3_load_fixes", False):
        return
    megatron_state_dict = optimizer_class.state_dict
    megatron_set_states = optimizer_class._set_main_param_and_optimizer_states

    @functools.wraps(megatron_state_dict)
    def state_dict(self):
        if distrib_optimizer.HAVE_APEX_OR_TE or len(self.optimizer.state) > 0 or self.init_state_fn is None:
            return megatron_state_dict(self)
        self.init_state_fn(self.optimizer, self.config)  # what Megatron reads: zero moments, step 0
        for state in self.optimizer.state.values():
            state["step"] = torch.zeros((), dtype=torch.float32)
        try:
            return megatron_state_dict(self)
        finally:  # empty again: loading allocates the state itself, step included
            self.optimizer.state.clear()

    @functools.wraps(megatron_set_states)
    def set_main_param_and_optimizer_states(self, model_param, tensors):
        if not distrib_optimizer.HAVE_APEX_OR_TE:  # keep the step load_state_dict took from the param groups
            tensors = {**tensors, "step": None}
        with torch.no_grad():
            megatron_set_states(self, model_param, tensors)

    megatron_load_state_dict = optimizer_class.load_state_dict

    @functools.wraps(megatron_load_state_dict)
    def load_state_dict(self, state_dict):
        megatron_load_state_dict(self, state_dict)
        if not distrib_optimizer.HAVE_APEX_OR_TE:  # one step counter per parameter, as torch's AdamW keeps them
            for state in self.optimizer.state.values():
                if isinstance(state.get("step"), torch.Tensor):
                    state["step"] = state["step"].clone()

    optimizer_class.state_dict = state_dict
    optimizer_class._set_main_param_and_optimizer_states = set_main_param_and_optimizer_states
    optimizer_class.load_state_dict = load_state_dict
    optimizer_class._megatron_dsv3_load_fixes = True


def let_recompute_run_without_te() -> None:
    """`CheckpointWithoutOutput` without TE (module note): its `fp8` as the caller gave it. Idempotent."""
    from megatron.core.tensor_parallel import random

    checkpoint_class = random.CheckpointWithoutOutput
    if random.HAVE_TE or getattr(checkpoint_class, "_megatron_dsv3_fp8_fix", False):
        return
    megatron_init = checkpoint_class.__init__

    @functools.wraps(megatron_init)
    def __init__(self, fp8=False):
        megatron_init(self, fp8)
        self.fp8 = bool(fp8)

    checkpoint_class.__init__ = __init__
    checkpoint_class._megatron_dsv3_fp8_fix = True
