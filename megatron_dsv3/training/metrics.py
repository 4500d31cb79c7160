"""The metrics of one training step, gathered over the pipeline and data-parallel ranks."""

from __future__ import annotations

import torch
from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker, get_moe_layer_wise_logging_tracker
from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

from megatron_dsv3.config import moe_layer_pattern
from megatron_dsv3.routing import expert_load


def _local_step_sums(losses: list[dict], model_chunks) -> dict:
    """This rank's share of the step's metrics: the loss dicts it returned (rank P-1 of a
    pipeline), the MTP and sequence-balance losses its layers tracked, its layers' loads."""
    sums = {}
    if losses:
        lm = torch.stack([d["lm loss"] for d in losses]).sum(dim=0)
        sums["lm"] = (float(lm[0]), float(lm[1]))
    tracker = MTPLossLoggingHelper.tracker
    if "loss_values" in tracker:  # one mean loss per micro-batch and depth, accumulated
        sums["mtp"] = float(tracker["loss_values"].sum())
        MTPLossLoggingHelper.clean_metrics_in_tracker()
    moe = get_moe_layer_wise_logging_tracker()
    if "seq_load_balancing_loss" in moe:  # sum_i f_i P_i per layer and micro-batch
        sums["seq_balance"] = float(moe["seq_load_balancing_loss"]["values"].sum())
    clear_aux_losses_tracker()
    sums["loads"] = {l.name: {"tokens_per_expert": l.tokens_per_expert, "max_violation": l.max_violation} for l in expert_load(model_chunks)}
    return sums


def _layer_order(name: str) -> tuple[int, int]:
    kind, number = name.split(".")
    return (kind == "mtp", int(number))


def step_metrics(losses: list[dict], config, model_chunks, num_microbatches: int, pipeline_group=None, data_parallel_group=None) -> dict:
    """LM, MTP and sequence-balance losses of the step just run, and each MoE layer's load:
    gathered over the pipeline, and the losses summed over data-parallel replicas
    (collectives on the groups given). Loads are already global (routing.py). DualPipe's
    mirrored layers report the same load twice: one is kept."""
    local = _local_step_sums(losses, model_chunks)
    parts = [local]
    if pipeline_group is not None and pipeline_group.size() > 1:
        parts = [None] * pipeline_group.size()
        torch.distributed.all_gather_object(parts, local, group=pipeline_group)
    lm_sum, lm_tokens = next(part["lm"] for part in parts if "lm" in part)
    sums = torch.tensor([lm_sum, lm_tokens, sum(part.get("mtp", 0.0) for part in parts), sum(part.get("seq_balance", 0.0) for part in parts)],
                        dtype=torch.float64)
    replicas = 1
    if data_parallel_group is not None and data_parallel_group.size() > 1:
        torch.distributed.all_reduce(sums, group=data_parallel_group)
        replicas = data_parallel_group.size()
    microbatches = num_microbatches * replicas
    record = {"lm_loss": float(sums[0] / sums[1])}
    if any("mtp" in part for part in parts):
        record["mtp_loss"] = float(sums[2]) / (microbatches * config.mtp_num_layers)
    if any("seq_balance" in part for part in parts):
        # report alpha * the mean over layers and micro-batches
        moe_layers = sum(moe_layer_pattern(config)) + (config.mtp_num_layers or 0)
        record["seq_balance_loss"] = float(sums[3]) / microbatches / moe_layers * config.moe_aux_loss_coeff
    loads = {}
    for part in parts:
        loads.update(part["loads"])
    record["expert_load"] = {name: loads[name] for name in sorted(loads, key=_layer_order)}
    values = [load["max_violation"] for load in loads.values()]
    record["max_violation"] = sum(values) / len(values) if values else None
    return record


def summarize(records: list[dict]) -> dict:
    """First vs final LM loss, and MaxVio over the first vs the last 10% of steps."""
    tenth = max(1, len(records) // 10)

    def mean(key, rows):
        values = [r[key] for r in rows if r.get(key) is not None]
        return sum(values) / len(values) if values else None

    return {
        "steps": len(records),
        "first_lm_loss": records[0]["lm_loss"],
        "final_lm_loss": mean("lm_loss", records[-tenth:]),
        "max_violation_first_10pct": mean("max_violation", records[:tenth]),
        "max_violation_last_10pct": mean("max_violation", records[-tenth:]),
    }
