"""AdamW with FP32 master weights and BF16 first and second moments (report §3.3).

The paper stores AdamW's moments in BF16 to save memory while the master weights and the
gradients stay FP32. torch's AdamW keeps moments in the parameter's dtype and Megatron's
low-precision moments need TE's fused CUDA Adam, so this is the update written out: the
moments are read into FP32, updated, used, and stored back rounded to `moments_dtype`.
"""

from __future__ import annotations

import torch


class AdamWLowPrecisionMoments(torch.optim.Optimizer):
    """Decoupled-weight-decay Adam whose exp_avg / exp_avg_sq are stored in `moments_dtype`."""

    def __init__(self, params, lr: float, betas=(0.9, 0.95), eps: float = 1e-8, weight_decay: float = 0.0,
                 moments_dtype: torch.dtype = torch.bfloat16):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.moments_dtype = moments_dtype

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("closure is not supported: call step() after backward")
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, weight_decay = group["lr"], group["eps"], group["weight_decay"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                if param.dtype != torch.float32:
                    raise TypeError(f"parameter of dtype {param.dtype}: master weights must be FP32")
                state = self.state[param]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(param, dtype=self.moments_dtype)
                    state["exp_avg_sq"] = torch.zeros_like(param, dtype=self.moments_dtype)
                state["step"] += 1
                grad = param.grad.float()
                exp_avg = state["exp_avg"].float().mul_(beta1).add_(grad, alpha=1 - beta1)
                exp_avg_sq = state["exp_avg_sq"].float().mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                state["exp_avg"].copy_(exp_avg)  # rounded to moments_dtype
                state["exp_avg_sq"].copy_(exp_avg_sq)
                bias_correction1 = 1 - beta1 ** state["step"]
                bias_correction2 = 1 - beta2 ** state["step"]
                param.mul_(1 - lr * weight_decay)
                denominator = (exp_avg_sq / bias_correction2).sqrt_().add_(eps)
                param.addcdiv_(exp_avg / bias_correction1, denominator, value=-lr)
