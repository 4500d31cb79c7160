"""MLA on the local backend equals a from-scratch report §2.1.1 with the same weights."""

import math

import pytest
import torch

from megatron_dsv3.config import preset
from megatron_dsv3.specs import gpt_model


def rms_norm(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def rope(x_SHD, base):
    """RoPE on pairs (x_2i, x_2i+1) rotated by pos * base^(-2i/d), as in RoFormer."""
    seq, d = x_SHD.shape[0], x_SHD.shape[-1]
    inv_freq = base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    angle = torch.arange(seq, dtype=torch.float64)[:, None] * inv_freq[None, :]  # [S, d/2]
    cos, sin = angle.cos()[:, None, :], angle.sin()[:, None, :]
    even, odd = x_SHD[..., 0::2], x_SHD[..., 1::2]
    return torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2)


def mla_reference(attn, h_SD, c):
    """Report §2.1.1 for one sequence in float64: h [S, d] -> u [S, d]."""
    w = lambda m: m.weight.detach().double()  # noqa: E731
    n_h, d_h, d_r, d_v = c.num_attention_heads, c.qk_head_dim, c.qk_pos_emb_head_dim, c.v_head_dim
    S = h_SD.shape[0]
    eps = c.layernorm_epsilon

    c_q = rms_norm(h_SD @ w(attn.linear_q_down_proj).T, w(attn.q_layernorm), eps)  # c_t^Q (normalised)
    q = (c_q @ w(attn.linear_q_up_proj).T).view(S, n_h, d_h + d_r)
    q_c, q_r = q[..., :d_h], rope(q[..., d_h:], c.rotary_base)  # q^C, RoPE(W^QR c^Q)

    kv_down = h_SD @ w(attn.linear_kv_down_proj).T
    c_kv = rms_norm(kv_down[:, : c.kv_lora_rank], w(attn.kv_layernorm), eps)  # c_t^KV
    k_r = rope(kv_down[:, None, c.kv_lora_rank :], c.rotary_base)  # k^R: one head, shared
    kv = (c_kv @ w(attn.linear_kv_up_proj).T).view(S, n_h, d_h + d_v)
    k_c, v_c = kv[..., :d_h], kv[..., d_h:]

    q_full = torch.cat([q_c, q_r], dim=-1)  # q_t,i = [q^C ; q^R]
    k_full = torch.cat([k_c, k_r.expand(S, n_h, d_r)], dim=-1)  # k_t,i = [k^C ; k^R]
    scores = torch.einsum("shd,thd->hst", q_full, k_full) / math.sqrt(d_h + d_r)
    causal = torch.ones(S, S, dtype=torch.bool).tril()
    probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
    o = torch.einsum("hst,thd->shd", probs, v_c).reshape(S, n_h * d_v)
    return o @ w(attn.linear_proj).T  # u_t = W^O [o_1; ...; o_nh]


@pytest.mark.parametrize("seq", [1, 17, 64])
def test_local_mla_equals_the_papers_equations(seq, seeded):
    c = preset("tiny", seq_length=64)
    model = gpt_model(c)
    attn = model.decoder.layers[1].self_attention
    with torch.no_grad():  # non-trivial norm scales, so a missing latent norm would show
        attn.q_layernorm.weight.uniform_(0.5, 1.5)
        attn.kv_layernorm.weight.uniform_(0.5, 1.5)
    batch = 3
    h = torch.randn(seq, batch, c.hidden_size)
    out, bias = attn(h, attention_mask=None)
    assert bias is None
    for b in range(batch):
        expected = mla_reference(attn, h[:, b].double(), c)
        rel = (out[:, b].double() - expected).norm() / expected.norm()
        assert rel <= 1e-5, rel


def test_mla_kv_latents_are_what_the_paper_caches(seeded):
    """Per token per layer the cache holds d_c + d_h^R values: 576 for DeepSeek-V3."""
    c = preset("deepseek-v3")
    assert c.kv_lora_rank + c.qk_pos_emb_head_dim == 576
    assert 2 * c.num_attention_heads * c.qk_head_dim == 32768
