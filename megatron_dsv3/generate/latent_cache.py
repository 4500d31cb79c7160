"""MLA attention over a KV cache, on the weights of Megatron's `MLASelfAttention` (report §2.1.1).

Whose part is whose: the projections, the two latent RMSNorms, the rotary table (`RotaryEmbedding`
or `YarnRotaryEmbedding` of the module itself, applied by Megatron's `apply_rotary_pos_emb` with
`mla_rotary_interleaved=True`, YaRN's mscale included), the softmax scale (`softmax_scale`, with
YaRN's mscale^2) and the output projection are Megatron's, called or read from the module. Ours:
the caches and the attention of new tokens over them, in two forms:

  absorbed (LatentCache)   per token and layer the cache holds c^KV (kv_lora_rank values, after
                           kv_layernorm) and the RoPE'd k^R (qk_pos_emb_head_dim values), one row
                           of one tensor [B, S_max, d_c + d_R]. Keys and values are never made:
                           W^UK is absorbed into the query (q^C_i W^UK_i, a d_c-wide query per head),
                           so each head's scores are [q^C_i W^UK_i ; q^R_i] . [c^KV ; k^R], i.e.
                           multi-query attention of n_h heads over the one latent "head"; W^UV is
                           absorbed into the output projection: the heads' latent outputs
                           sum_s p_s c^KV_s are taken through W^UV_i, then W^O (Megatron's
                           linear_proj). The two absorptions are applied as products in that order
                           rather than as pre-multiplied matrices (DeepSeek's own inference code
                           does the same): fewer FLOPs per token than W^UQ W^UK (q_lora x n_h d_c)
                           or W^O W^UV (hidden x n_h d_c).
  uncompressed (FullKVCache)   per token and layer per-head k = [k^C ; k^R] and v (what upstream's
                           StaticInferenceContext caches for MLA): n_h (d_h + d_R + d_v) values.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core.models.common.embeddings import apply_rotary_pos_emb


@dataclass(frozen=True)
class Rope:
    """Megatron's rotary table for positions 0..max_len-1 ([S, 1, 1, d_R]) and YaRN's mscale."""

    freqs: torch.Tensor
    mscale: float

    @classmethod
    def of(cls, mla, max_len: int) -> "Rope":
        out = mla.rotary_pos_emb(max_len, packed_seq=False)  # "yarn" also returns its mscale
        freqs, mscale = out if isinstance(out, tuple) else (out, 1.0)
        return cls(freqs, mscale)

    def apply(self, mla, x: torch.Tensor, start: int) -> torch.Tensor:
        """x [T, B, heads, d_R] at positions start..start+T-1, as MLASelfAttention rotates q^R, k^R."""
        return apply_rotary_pos_emb(x, self.freqs[start:start + x.shape[0]], config=mla.config, mscale=self.mscale,
                                    cp_group=mla.pg_collection.cp, mla_rotary_interleaved=True)


def _dims(config) -> tuple[int, int, int, int, int]:
    return (config.num_attention_heads, config.qk_head_dim, config.qk_pos_emb_head_dim, config.v_head_dim,
            config.kv_lora_rank)


def queries(mla, x: torch.Tensor, rope: Rope, start: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(q^C [T, B, n_h, d_h], RoPE'd q^R [T, B, n_h, d_R]) of the normed hidden states x [T, B, H]."""
    n, d_h, d_r, _, _ = _dims(mla.config)
    if mla.config.q_lora_rank is None:
        q, _ = mla.linear_q_proj(x)
    else:
        c_q, _ = mla.linear_q_down_proj(x)
        q, _ = mla.linear_q_up_proj(mla.q_layernorm(c_q))
    q = q.view(*x.shape[:2], n, d_h + d_r)
    q_nope, q_rope = q.split([d_h, d_r], dim=-1)
    return q_nope, rope.apply(mla, q_rope, start)


def latents(mla, x: torch.Tensor, rope: Rope, start: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(c^KV after kv_layernorm [T, B, d_c], RoPE'd k^R [T, B, d_R]): what the latent cache keeps."""
    _, _, d_r, _, d_c = _dims(mla.config)
    kv, _ = mla.linear_kv_down_proj(x)
    c_kv, k_rope = kv.split([d_c, d_r], dim=-1)
    return mla.kv_layernorm(c_kv), rope.apply(mla, k_rope.unsqueeze(-2), start).squeeze(-2)


def _future(T: int, L: int, start: int, device) -> torch.Tensor:
    """[T, L], True where key s is after query t (position start + t): masked."""
    return torch.arange(L, device=device)[None, :] > (start + torch.arange(T, device=device))[:, None]


class LatentCache:
    """c^KV and k^R of every cached token, one [B, S_max, d_c + d_R] tensor per layer."""

    absorbed = True

    def __init__(self, config, layers: int, batch: int, max_len: int, dtype: torch.dtype, device):
        width = config.kv_lora_rank + config.qk_pos_emb_head_dim
        self.buffers = [torch.zeros(batch, max_len, width, dtype=dtype, device=device) for _ in range(layers)]
        self.length = 0

    def tensors(self, layer: int) -> list[torch.Tensor]:
        return [self.buffers[layer]]

    def attend(self, mla, x: torch.Tensor, layer: int, start: int, rope: Rope) -> torch.Tensor:
        """Attention output before W^O, [T, B, n_h d_v], of new tokens x [T, B, H] at positions
        start.., writing their latents into the cache first."""
        n, d_h, _, d_v, d_c = _dims(mla.config)
        T, B = x.shape[:2]
        q_nope, q_rope = queries(mla, x, rope, start)
        c_kv, k_rope = latents(mla, x, rope, start)
        cache = self.buffers[layer]
        cache[:, start:start + T] = torch.cat([c_kv, k_rope], dim=-1).transpose(0, 1)
        kv = cache[:, :start + T]  # [B, L, d_c + d_R]
        w_ukv = mla.linear_kv_up_proj.weight.view(n, d_h + d_v, d_c)  # per head [W^UK_i ; W^UV_i]
        q_latent = torch.einsum("tbnd,ndc->btnc", q_nope, w_ukv[:, :d_h])  # W^UK absorbed into the query
        q = torch.cat([q_latent, q_rope.transpose(0, 1)], dim=-1).reshape(B, T * n, -1)
        scores = torch.bmm(q, kv.transpose(1, 2)).view(B, T, n, -1) * mla.softmax_scale
        scores = scores.masked_fill(_future(T, kv.shape[1], start, x.device)[None, :, None, :], float("-inf"))
        probs = scores.float().softmax(dim=-1).to(kv.dtype).view(B, T * n, -1)
        o_latent = torch.bmm(probs, kv[..., :d_c]).view(B, T, n, d_c)  # sum_s p_s c^KV_s per head
        o = torch.einsum("btnc,nvc->tbnv", o_latent, w_ukv[:, d_h:])  # W^UV, then W^O (the caller)
        return o.reshape(T, B, n * d_v)


class FullKVCache:
    """Per-head keys [k^C ; k^R] and values of every cached token (the uncompressed form)."""

    absorbed = False

    def __init__(self, config, layers: int, batch: int, max_len: int, dtype: torch.dtype, device):
        n, d_h, d_r, d_v, _ = _dims(config)
        self.keys = [torch.zeros(batch, max_len, n, d_h + d_r, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros(batch, max_len, n, d_v, dtype=dtype, device=device) for _ in range(layers)]
        self.length = 0

    def tensors(self, layer: int) -> list[torch.Tensor]:
        return [self.keys[layer], self.values[layer]]

    def attend(self, mla, x: torch.Tensor, layer: int, start: int, rope: Rope) -> torch.Tensor:
        n, d_h, d_r, d_v, _ = _dims(mla.config)
        T, B = x.shape[:2]
        q_nope, q_rope = queries(mla, x, rope, start)
        c_kv, k_rope = latents(mla, x, rope, start)
        kv, _ = mla.linear_kv_up_proj(c_kv)
        k_nope, v = kv.view(T, B, n, d_h + d_v).split([d_h, d_v], dim=-1)
        k = torch.cat([k_nope, k_rope.unsqueeze(-2).expand(T, B, n, d_r)], dim=-1)
        self.keys[layer][:, start:start + T] = k.transpose(0, 1)
        self.values[layer][:, start:start + T] = v.transpose(0, 1)
        keys, values = self.keys[layer][:, :start + T], self.values[layer][:, :start + T]
        q = torch.cat([q_nope, q_rope], dim=-1)
        scores = torch.einsum("tbnd,bsnd->btns", q, keys) * mla.softmax_scale
        scores = scores.masked_fill(_future(T, keys.shape[1], start, x.device)[None, :, None, :], float("-inf"))
        probs = scores.float().softmax(dim=-1).to(values.dtype)
        return torch.einsum("btns,bsnv->tbnv", probs, values).reshape(T, B, n * d_v)


def bytes_per_token_per_layer(cache) -> int:
    """Measured from the cache's own tensors: bytes of one layer / (batch x max_len)."""
    tensors = cache.tensors(0)
    slots = tensors[0].shape[0] * tensors[0].shape[1]
    return sum(t.nbytes for t in tensors) // slots


class CachedMLA(torch.nn.Module):
    """Stands in for a layer's `MLASelfAttention` during one cached forward: the attention of the
    new tokens over the cache, then the module's own `linear_proj`. The layer's norms, residuals
    and MLP (dense or MoE) stay Megatron's own (`decoder.CachedDecoder` swaps this in)."""

    def __init__(self, mla, cache, layer: int, start: int, rope: Rope):
        super().__init__()
        object.__setattr__(self, "mla", mla)  # a stand-in, not an owner: not a submodule
        self.cache, self.layer, self.start, self.rope = cache, layer, start, rope

    def forward(self, hidden_states, attention_mask=None, inference_context=None, packed_seq_params=None, **unused):
        if inference_context is not None or packed_seq_params is not None:
            raise NotImplementedError("the cached MLA takes neither Megatron's inference context nor packed sequences")
        o = self.cache.attend(self.mla, hidden_states, self.layer, self.start, self.rope)
        return self.mla.linear_proj(o)
