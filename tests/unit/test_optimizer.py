"""BF16-moment AdamW against the AdamW equations with moments rounded to BF16 each step."""

import torch

from megatron_dsv3.training.optimizer import AdamWLowPrecisionMoments

LR, BETAS, EPS, WD = 1e-2, (0.9, 0.95), 1e-8, 0.1


def reference_steps(p0, grads):
    """Loshchilov & Hutter's AdamW in float64, with m and v stored as BF16 between steps."""
    p, m, v = p0.double(), torch.zeros_like(p0, dtype=torch.bfloat16), torch.zeros_like(p0, dtype=torch.bfloat16)
    for t, g in enumerate(grads, start=1):
        g = g.double()
        m_t = BETAS[0] * m.double() + (1 - BETAS[0]) * g
        v_t = BETAS[1] * v.double() + (1 - BETAS[1]) * g * g
        m, v = m_t.to(torch.bfloat16), v_t.to(torch.bfloat16)
        p = p * (1 - LR * WD) - LR * (m_t / (1 - BETAS[0] ** t)) / ((v_t / (1 - BETAS[1] ** t)).sqrt() + EPS)
    return p, m, v


def test_bf16_moments_follow_adamw_with_fp32_master_weights():
    torch.manual_seed(0)
    param = torch.nn.Parameter(torch.randn(64, 32))
    p0 = param.detach().clone()
    grads = [torch.randn(64, 32) * 10 ** -k for k in range(4)]
    opt = AdamWLowPrecisionMoments([param], lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    for g in grads:
        param.grad = g.clone()
        opt.step()
    expected_p, expected_m, expected_v = reference_steps(p0, grads)
    state = opt.state[param]
    assert param.dtype == torch.float32
    assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.bfloat16
    torch.testing.assert_close(state["exp_avg"], expected_m, rtol=0, atol=0)
    torch.testing.assert_close(state["exp_avg_sq"], expected_v, rtol=0, atol=0)
    torch.testing.assert_close(param.detach().double(), expected_p, rtol=1e-6, atol=1e-7)


def test_with_fp32_moments_it_is_torch_adamw():
    torch.manual_seed(1)
    a = torch.nn.Parameter(torch.randn(16, 8))
    b = torch.nn.Parameter(a.detach().clone())
    ours = AdamWLowPrecisionMoments([a], lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, moments_dtype=torch.float32)
    torchs = torch.optim.AdamW([b], lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    for _ in range(3):
        g = torch.randn(16, 8)
        a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        torchs.step()
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
