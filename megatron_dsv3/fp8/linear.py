"""A Linear whose three GEMMs (Fprop, Dgrad, Wgrad) run in block-scaled FP8 (report §3.3).

y = x W^T + b, x: [..., K] (leading dims flattened to T tokens), W: [N, K] the FP32 master
weight (read, never modified), b: [N] or None.
  Fprop  y  [T, N] = x (1x128 tiles)  @ W (128x128 blocks)^T
  Dgrad  dx [T, K] = dy (1x128 tiles along N) @ W (the same 128x128 blocks, transposed)
  Wgrad  dW [N, K] = dy^T [N, T] @ x^T [K, T]^T, both 128x1-tiled over tokens, i.e. 1x128
                     along the inner dim T of the transposed tensors
All accumulate in FP32 with promotion every 128 inner elements (`blockwise_gemm`). The bias
is added, and its gradient summed, in FP32. Wgrad goes through
`weight_grad.defer_or_compute`: inside a zero-bubble B it waits for its W.

What is saved for backward (the paper caches activations in FP8): x quantised with 128x1
tiles, taken in the forward pass from the high-precision x (a single quantisation, no
1x128 -> 128x1 re-quantisation error), and the FP8 weight blocks used by Fprop (so Dgrad
uses exactly those blocks). The high-precision x is not saved. Memory: 1 byte per element
of x and W plus one FP32 scale per tile.

`pow2_input_scale=True` rounds the scales of x (both tilings) to powers of two, the paper's
choice for the input of the Linear after attention.
"""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

from megatron_dsv3.fp8.gemm import blockwise_gemm
from megatron_dsv3.fp8.quant import TILE, BlockwiseFP8, quantize_1x128, quantize_128x1, quantize_128x128
from megatron_dsv3.weight_grad import defer_or_compute


class BlockwiseFP8LinearFunction(torch.autograd.Function):
    """autograd for `fp8_linear`: forward(x, weight, bias, backend, pow2_input_scale)."""

    @staticmethod
    def forward(ctx, x, weight, bias, backend: str, pow2_input_scale: bool):
        N, K = weight.shape
        if x.shape[-1] != K:
            raise ValueError(
                f"fp8_linear: x has {x.shape[-1]} features (last dim) but weight [N, K] is {tuple(weight.shape)}"
            )
        x_TK = x.reshape(-1, K)
        x_rows = quantize_1x128(x_TK, pow2_scale=pow2_input_scale, name="fp8_linear input x")
        w_blocks = quantize_128x128(weight, name="fp8_linear weight")
        y_TN = blockwise_gemm(x_rows, w_blocks, backend=backend)
        if bias is not None:
            y_TN = y_TN + bias.float()

        # cached for Wgrad: x in 128x1 tiles (FP8 codes + FP32 scales), not the fp32 x
        x_cols = quantize_128x1(x_TK, pow2_scale=pow2_input_scale, name="fp8_linear input x")
        ctx.save_for_backward(x_cols.data, x_cols.scale, w_blocks.data, w_blocks.scale)
        ctx.backend = backend
        ctx.weight = weight  # the parameter a deferred weight gradient goes to (megatron_dsv3/weight_grad.py)
        ctx.x_shape, ctx.x_dtype, ctx.weight_dtype = x.shape, x.dtype, weight.dtype
        ctx.has_bias = bias is not None
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return y_TN.to(x.dtype).reshape(*x.shape[:-1], N)

    @staticmethod
    def backward(ctx, grad_y):
        x_codes_TK, x_scale, w_codes_NK, w_scale = ctx.saved_tensors
        N, K = w_codes_NK.shape
        dy_TN = grad_y.reshape(-1, N)
        grad_x = grad_w = grad_b = None

        if ctx.needs_input_grad[0]:
            w_blocks = BlockwiseFP8(w_codes_NK, w_scale, (TILE, TILE), (N, K))
            dy_rows = quantize_1x128(dy_TN, name="fp8_linear output grad dy")
            dx_TK = blockwise_gemm(dy_rows, w_blocks.t(), backend=ctx.backend)
            grad_x = dx_TK.to(ctx.x_dtype).reshape(ctx.x_shape)

        if ctx.needs_input_grad[1]:
            backend, weight_dtype = ctx.backend, ctx.weight_dtype

            def wgrad():
                x_cols = BlockwiseFP8(x_codes_TK, x_scale, (TILE, 1), tuple(x_codes_TK.shape))
                dy_cols = quantize_128x1(dy_TN, name="fp8_linear output grad dy")
                return blockwise_gemm(dy_cols.t(), x_cols.t(), backend=backend).to(weight_dtype)

            grad_w = defer_or_compute(ctx.weight, wgrad)

        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = dy_TN.float().sum(dim=0).to(ctx.bias_dtype)

        return grad_x, grad_w, grad_b, None, None


def fp8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    backend: str = "auto",
    pow2_input_scale: bool = False,
) -> torch.Tensor:
    """y = x @ weight.T + bias with all three GEMMs in block-scaled FP8; y has x's dtype.

    x: [..., K]; weight: [N, K] (FP32 master weight, never modified); bias: [N] or None.
    """
    return BlockwiseFP8LinearFunction.apply(x, weight, bias, backend, pow2_input_scale)


class _BlockwiseFP8Forward:
    """Runs a Megatron local linear's GEMMs through `fp8_linear` (config.fp8_blockwise picks
    the backend). Validation guarantees TP = 1, so the parallel-linear arguments (all-reduce,
    sequence parallelism, fused gradient accumulation) have nothing to do here."""

    pow2_input_scale = False

    def _forward_impl(self, input, weight, bias=None, **parallel_linear_args):
        backend = self.config.fp8_blockwise
        return fp8_linear(input, weight, bias, backend=backend, pow2_input_scale=self.pow2_input_scale)


class FP8ColumnParallelLinear(_BlockwiseFP8Forward, ColumnParallelLinear):
    """Megatron's local ColumnParallelLinear with Fprop, Dgrad and Wgrad in block-scaled FP8."""


class FP8RowParallelLinear(_BlockwiseFP8Forward, RowParallelLinear):
    """Megatron's local RowParallelLinear with Fprop, Dgrad and Wgrad in block-scaled FP8."""


class FP8AttentionOutputLinear(FP8RowParallelLinear):
    """The Linear after attention: its input scales are powers of two (report §3.3)."""

    pow2_input_scale = True


# Kept in high precision (report §3.3): the output head; and MTP's eh_proj, which the
# released FP8 checkpoint also keeps in BF16. Embedding, router, norms and the attention
# core are not Column/RowParallelLinear.
HIGH_PRECISION_LINEARS = ("output_layer", "eh_proj")


def convert_to_fp8_linears(model: torch.nn.Module) -> torch.nn.Module:
    """Switch every transformer-layer Column/RowParallelLinear of `model` to its FP8 class.

    In place, after construction: Megatron's MLA accepts only the exact upstream classes for
    its down projections (multi_latent_attention.py checks `in [ColumnParallelLinear, ...]`),
    so the FP8 classes cannot come through the spec. They add no state, only the forward.
    """
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in HIGH_PRECISION_LINEARS:
            continue
        if type(module) is ColumnParallelLinear:
            module.__class__ = FP8ColumnParallelLinear
        elif type(module) is RowParallelLinear:
            is_attention_output = name.endswith("self_attention.linear_proj")
            module.__class__ = FP8AttentionOutputLinear if is_attention_output else FP8RowParallelLinear
    return model
