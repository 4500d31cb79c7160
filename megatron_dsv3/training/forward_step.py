"""The forward step of a GPT model for Megatron's schedules (`forward_step_func` and its loss).

Megatron's contract: `forward_step(data_iterator, model) -> (output, loss_func)`, and
`loss_func(output) -> (sum of losses, token count, values to report)`; the schedule divides
by the token count (`calculate_per_token_loss`) or the micro-batch count. Used by the compact
loop, the benchmarks and the tests; examples/pretrain_dsv3.py has its own forward step (it
sets gamma and lambda first, and some of its ranks have no data) with this `loss_func`.
"""

from __future__ import annotations

from functools import partial

import torch


def loss_func(loss_mask: torch.Tensor, per_token_loss: torch.Tensor):
    """Megatron's 3-tuple contract: (sum of losses, token count, values to report)."""
    mask = loss_mask.float()
    loss_sum = (per_token_loss.float() * mask).sum()
    num_tokens = mask.sum().to(torch.int)
    return loss_sum, num_tokens, {"lm loss": torch.stack([loss_sum.detach(), mask.sum()])}


def forward_step(data_iterator, model):
    """One micro-batch through `model` (a GPTModel chunk: its per-token loss on the last stage)."""
    batch = next(data_iterator)
    device = next(model.parameters()).device
    tokens, labels, loss_mask, position_ids = (
        batch[k].to(device) for k in ("tokens", "labels", "loss_mask", "position_ids")
    )
    per_token_loss = model(tokens, position_ids, None, labels=labels, loss_mask=loss_mask)
    return per_token_loss, partial(loss_func, loss_mask)


def random_microbatches(seed: int, count: int, micro_batch_size: int, seq_length: int, vocab_size: int) -> list[dict]:
    """`count` micro-batches of uniform random tokens, next-token labels, every token counted,
    as `forward_step` reads them (the benchmarks' data)."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        tokens = torch.randint(0, vocab_size, (micro_batch_size, seq_length), generator=generator)
        batches.append({"tokens": tokens, "labels": torch.roll(tokens, -1, 1), "loss_mask": torch.ones(micro_batch_size, seq_length),
                        "position_ids": torch.arange(seq_length).expand(micro_batch_size, seq_length)})
    return batches
