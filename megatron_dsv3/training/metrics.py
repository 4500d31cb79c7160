"""The metrics of one training step, and of one evaluation of the validation split, gathered
over the pipeline and data-parallel ranks."""

from __future__ import annotations

import math

import torch
from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker, get_moe_layer_wise_logging_tracker
from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

from megatron_dsv3.config import moe_layer_pattern
from megatron_dsv3.routing import expert_load


def _local_loss_sums(losses: list[dict]) -> dict:
    """This rank's LM and MTP loss sums: the loss dicts it returned (rank P-1 of a pipeline),
    the MTP losses its MTP block tracked (then cleared)."""
    sums = {}
    if losses:
        lm = torch.stack([d["lm loss"] for d in losses]).sum(dim=0)
        sums["lm"] = (float(lm[0]), float(lm[1]))
    tracker = MTPLossLoggingHelper.tracker
    if "loss_values" in tracker:  # one mean loss per micro-batch and depth, accumulated
        sums["mtp"] = float(tracker["loss_values"].sum())
        MTPLossLoggingHelper.clean_metrics_in_tracker()
    return sums


def _local_step_sums(losses: list[dict], model_chunks) -> dict:
    """This rank's share of the step's metrics: its LM and MTP loss sums, the sequence-balance
    losses its layers tracked, its layers' loads."""
    sums = _local_loss_sums(losses)
    moe = get_moe_layer_wise_logging_tracker()
    if "seq_load_balancing_loss" in moe:  # sum_i f_i P_i per layer and micro-batch
        sums["seq_balance"] = float(moe["seq_load_balancing_loss"]["values"].sum())
    clear_aux_losses_tracker()
    sums["loads"] = {l.name: {"tokens_per_expert": l.tokens_per_expert, "max_violation": l.max_violation} for l in expert_load(model_chunks)}
    return sums


def _layer_order(name: str) -> tuple[int, int]:
    kind, number = name.split(".")
    return (kind == "mtp", int(number))


def _over_ranks(local: dict, pipeline_group, data_parallel_group) -> tuple[list[dict], torch.Tensor, int]:
    """Every pipeline rank's part (collectives on the groups given), and the sums of the LM
    loss, its token count, the MTP and the sequence-balance losses over the pipeline and the
    data-parallel replicas (FP64); the replica count."""
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
    return parts, sums, replicas


def _loss_record(parts: list[dict], sums: torch.Tensor, microbatches: int, config) -> dict:
    """The LM loss (the token mean over every micro-batch) and, with MTP, the MTP loss (the
    mean over micro-batches and depths of each micro-batch's token mean)."""
    record = {"lm_loss": float(sums[0] / sums[1])}
    if any("mtp" in part for part in parts):
        record["mtp_loss"] = float(sums[2]) / (microbatches * config.mtp_num_layers)
    return record


def step_metrics(losses: list[dict], config, model_chunks, num_microbatches: int, pipeline_group=None, data_parallel_group=None) -> dict:
    """LM, MTP and sequence-balance losses of the step just run, and each MoE layer's load:
    gathered over the pipeline, and the losses summed over data-parallel replicas
    (collectives on the groups given). Loads are already global (routing.py). DualPipe's
    mirrored layers report the same load twice: one is kept."""
    parts, sums, replicas = _over_ranks(_local_step_sums(losses, model_chunks), pipeline_group, data_parallel_group)
    microbatches = num_microbatches * replicas
    record = _loss_record(parts, sums, microbatches, config)
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


def perplexity(lm_loss: float) -> float:
    """exp of a token-mean LM loss (nats); infinite past what a float holds."""
    return math.exp(lm_loss) if lm_loss < math.log(1e308) else math.inf


def validation_metrics(losses: list[dict], config, num_microbatches: int, pipeline_group=None, data_parallel_group=None) -> dict:
    """The LM loss, its perplexity and the MTP loss of one evaluation: `losses` are the loss
    dicts of its forward-only passes (`num_microbatches` in all per replica), the MTP tracker
    holds their MTP losses. Summed as `step_metrics` sums a step's: the LM loss is the token
    mean over every micro-batch of every replica, the perplexity exp of it."""
    parts, sums, replicas = _over_ranks(_local_loss_sums(losses), pipeline_group, data_parallel_group)
    record = _loss_record(parts, sums, num_microbatches * replicas, config)
    record["ppl"] = perplexity(record["lm_loss"])
    return record


# The validation fields of a record (training/loop.py writes them on the steps it evaluates):
# the training weights' and, with --ema-decay, the EMA weights'
VALIDATION_KEYS = ("val_lm_loss", "val_ppl", "val_mtp_loss", "ema_val_lm_loss", "ema_val_ppl", "ema_val_mtp_loss")


def summarize(records: list[dict]) -> dict:
    """First vs final LM loss, and MaxVio over the first vs the last 10% of steps; with
    validation, the last evaluation's step and fields (`final_val_ppl`, ...)."""
    tenth = max(1, len(records) // 10)

    def mean(key, rows):
        values = [r[key] for r in rows if r.get(key) is not None]
        return sum(values) / len(values) if values else None

    summary = {
        "steps": len(records),
        "first_lm_loss": records[0]["lm_loss"],
        "final_lm_loss": mean("lm_loss", records[-tenth:]),
        "max_violation_first_10pct": mean("max_violation", records[:tenth]),
        "max_violation_last_10pct": mean("max_violation", records[-tenth:]),
    }
    evaluated = [r for r in records if "val_lm_loss" in r]
    if evaluated:
        summary["final_val_step"] = evaluated[-1]["step"]
        summary.update({f"final_{key}": evaluated[-1][key] for key in VALIDATION_KEYS if key in evaluated[-1]})
    return summary
