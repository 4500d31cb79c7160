"""The scaled_mm backend (cuBLASLt 1x128 / 128x128 block scaling) against the emulate backend.

Both get the same quantised operands, so only the GEMM differs. The tolerance is not FP32
rounding alone: inside one 128-wide K-slice the Hopper tensor core accumulates with a
reduced-precision (about 14-bit) accumulator before the FP32 promotion that report §3.3
describes, so the two agree to ~1e-5 relative, not to 1e-7.
"""

import pytest
import torch
import torch.nn.functional as F

from megatron_dsv3.fp8 import blockwise_gemm, fp8_linear, quantize_1x128, quantize_128x128

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and hasattr(F, "scaled_mm") and torch.cuda.get_device_capability()[0] == 9),
    reason="needs a CUDA sm90 (Hopper) GPU and torch >= 2.9",
)

REL_TOL = 1e-4
OPERANDS = {"1x128": quantize_1x128, "128x128": quantize_128x128}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.detach().double() - ref.detach().double()).norm() / ref.detach().double().norm())


@pytest.mark.parametrize("tiles", [("1x128", "128x128"), ("1x128", "1x128"), ("128x128", "1x128")])
@pytest.mark.parametrize("M,K,N", [(256, 512, 768), (384, 1280, 128), (200, 300, 72)])
def test_scaled_mm_matches_emulate(tiles, M, K, N):
    torch.manual_seed(0)
    a = OPERANDS[tiles[0]](torch.randn(M, K, device="cuda") * torch.logspace(-2, 2, K, device="cuda"))
    b = OPERANDS[tiles[1]](torch.randn(N, K, device="cuda"))
    out = blockwise_gemm(a, b, backend="scaled_mm")
    ref = blockwise_gemm(a, b, backend="emulate")
    assert out.shape == (M, N) and out.dtype == torch.float32
    assert rel_err(out, ref) < REL_TOL


def test_auto_picks_scaled_mm_on_hopper():
    torch.manual_seed(1)
    a = quantize_1x128(torch.randn(256, 512, device="cuda"))
    b = quantize_128x128(torch.randn(256, 512, device="cuda"))
    assert torch.equal(blockwise_gemm(a, b), blockwise_gemm(a, b, backend="scaled_mm"))


def test_scaled_mm_refuses_two_weight_blocks():
    w = quantize_128x128(torch.randn(256, 512, device="cuda"))
    with pytest.raises(RuntimeError, match="no 128x128 x 128x128 kernel"):
        blockwise_gemm(w, w, backend="scaled_mm")


def test_fp8_linear_scaled_mm_matches_emulate():
    torch.manual_seed(2)
    x = torch.randn(4, 96, 512, device="cuda")
    w = torch.randn(384, 512, device="cuda") / 512**0.5
    grad_y = torch.randn(4, 96, 384, device="cuda")
    results = {}
    for backend in ("scaled_mm", "emulate"):
        x_leaf, w_leaf = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = fp8_linear(x_leaf, w_leaf, backend=backend)
        y.backward(grad_y)
        results[backend] = (y, x_leaf.grad, w_leaf.grad)
    for got, ref in zip(results["scaled_mm"], results["emulate"]):
        assert rel_err(got, ref) < REL_TOL
