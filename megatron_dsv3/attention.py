"""MLA core attention for the local (no-TE) backend (report §2.1.1).

Megatron's `MLASelfAttention` builds its core attention with `k_channels` (d_h + d_h^R) and
`v_channels` (d_h), which the local `DotProductAttention` rejects; MLA therefore only builds
with TE upstream. This module is the missing piece: torch's scaled_dot_product_attention with
a query/key head dim that differs from the value head dim, and the softmax scale MLA computes
(1/sqrt(d_h + d_h^R), times the YaRN mscale^2 when YaRN is on).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule


class MLASDPAttention(MegatronModule):
    """softmax(q k^T * scale) v over heads; q, k: [s, b, n_h, d_h + d_h^R], v: [s, b, n_h, d_v]."""

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        softmax_scale: float | None = None,
        k_channels: int | None = None,
        v_channels: int | None = None,
        attention_dropout: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError(
                f"context_parallel_size={config.context_parallel_size}: the local MLA attention "
                "has no context parallelism. Fix: use transformer_impl='transformer_engine' or CP=1."
            )
        self.attn_mask_type = attn_mask_type
        self.softmax_scale = softmax_scale
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias=None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError(
                "packed sequences and attention bias need the TE backend (transformer_impl='transformer_engine')"
            )
        mask_type = attn_mask_type or self.attn_mask_type
        seq_q, batch, heads, _ = query.shape
        q_BHSD, k_BHSD, v_BHSD = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        # Megatron masks are True where attention is *forbidden*; SDPA's are True where allowed.
        allowed = None if attention_mask is None else ~attention_mask
        causal = mask_type == AttnMaskType.causal
        if causal and allowed is not None:
            seq_k = key.shape[0]
            allowed = allowed & torch.ones(seq_q, seq_k, dtype=torch.bool, device=query.device).tril()
            causal = False
        out_BHSD = F.scaled_dot_product_attention(
            q_BHSD,
            k_BHSD,
            v_BHSD,
            attn_mask=allowed,
            dropout_p=self.dropout_p if self.training else 0.0,
            is_causal=causal,
            scale=self.softmax_scale,
        )
        return out_BHSD.permute(2, 0, 1, 3).reshape(seq_q, batch, heads * value.shape[-1])
