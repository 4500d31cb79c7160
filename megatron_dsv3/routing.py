"""Auxiliary-loss-free balancing additions to Megatron's router (report §2.1.2).

Upstream `TopKRouter` already implements the paper's routing: sigmoid affinities, top-K by
`s + b` with the gate from the unbiased `s`, normalised and scaled; node-limited groups;
the sequence-wise loss (`seq_aux_loss`); and the end-of-step bias update by the sign rule
(`finalize_model_grads` -> `_update_router_expert_bias`). What it lacks, and this module adds:
  - the gamma schedule (`config.StepSchedule`, applied by `DeepSeekV3Config.apply_token_schedules`);
  - per-layer load statistics for the last step: tokens per expert over the global batch
    and MaxVio = max load / mean load - 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core import parallel_state
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.utils import get_attr_wrapped_model


def max_violation(tokens_per_expert_E: torch.Tensor) -> float:
    """MaxVio = max_i load_i / mean_i load_i - 1 (0 for a perfectly balanced layer)."""
    load = tokens_per_expert_E.double()
    mean = load.mean()
    return float(load.max() / mean - 1) if mean > 0 else 0.0


class LoadRecordingRouter(TopKRouter):
    """Megatron's TopKRouter that also counts the tokens each expert receives in a step.

    The count covers training forwards only (grad enabled), as the bias update's does, and
    is closed by `close_load_step` once per global batch.
    """

    def __init__(self, config, pg_collection=None, **kwargs):
        super().__init__(config=config, pg_collection=pg_collection, **kwargs)
        self.register_buffer(
            "step_tokens_per_expert",
            torch.zeros(config.num_moe_experts, dtype=torch.float32, device=self.weight.device),
            persistent=False,
        )
        self.last_tokens_per_expert: torch.Tensor | None = None
        self.last_max_violation: float | None = None

    def forward(self, input: torch.Tensor, padding_mask: torch.Tensor | None = None):
        probs, routing_map = super().forward(input, padding_mask=padding_mask)
        if self.training and torch.is_grad_enabled():
            with torch.no_grad():
                counted = routing_map if padding_mask is None else routing_map & padding_mask.reshape(-1, 1)
                self.step_tokens_per_expert += counted.sum(dim=0)
        return probs, routing_map

    def close_load_step(self, group: torch.distributed.ProcessGroup | None) -> None:
        """Sum the step's counts over `group` (the global batch) and reset them."""
        tokens = self.step_tokens_per_expert.clone()
        if group is not None and torch.distributed.get_world_size(group) > 1:
            torch.distributed.all_reduce(tokens, group=group)
        self.last_tokens_per_expert = tokens
        self.last_max_violation = max_violation(tokens)
        self.step_tokens_per_expert.zero_()


@dataclass
class LayerLoad:
    name: str  # "decoder.<layer number>" or "mtp.<depth>"
    tokens_per_expert: list[float]
    max_violation: float


def load_recording_routers(model_chunks) -> list[LoadRecordingRouter]:
    routers = []
    for chunk in model_chunks:
        for module in get_attr_wrapped_model(chunk, "modules")():
            if isinstance(module, LoadRecordingRouter):
                routers.append(module)
    return routers


def expert_load_counts(chunk) -> list[torch.Tensor]:
    """The step's token counts that the end-of-step bias update and load recording read, for
    every router of `chunk`, in module order: Megatron's `local_tokens_per_expert` (the bias
    update's) and our `step_tokens_per_expert`. The DualPipe executor sums a stage's two
    copies of these before `finalize_model_grads`, so both copies take the same update."""
    counts = []
    for module in chunk.modules():
        if isinstance(module, TopKRouter) and module.local_tokens_per_expert is not None:
            counts.append(module.local_tokens_per_expert)
        if isinstance(module, LoadRecordingRouter):
            counts.append(module.step_tokens_per_expert)
    return counts


def expert_load(model_chunks) -> list[LayerLoad]:
    """The last step's load of every MoE layer in `model_chunks` (MTP layers included)."""
    return [
        LayerLoad(
            f"{'mtp' if r.is_mtp_layer else 'decoder'}.{r.layer_number}",
            r.last_tokens_per_expert.tolist(),
            r.last_max_violation,
        )
        for r in load_recording_routers(model_chunks)
        if r.last_tokens_per_expert is not None
    ]


def finalize_model_grads_with_load(model_chunks, num_tokens=None, pg_collection=None, force_all_reduce=False):
    """Megatron's `finalize_model_grads` (DP sync, bias update), then close the load step.

    Install as `config.finalize_model_grads_func`. The load is summed over the same
    tensor x data x context-parallel group the bias update sums it over.
    """
    finalize_model_grads(model_chunks, num_tokens, pg_collection=pg_collection, force_all_reduce=force_all_reduce)
    group = parallel_state.get_tensor_and_data_parallel_group(with_context_parallel=True)
    for router in load_recording_routers(model_chunks):
        router.close_load_step(group)
