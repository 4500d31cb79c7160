"""Block-scaled FP8 GEMM (emulate backend) and the FP8 Linear's three GEMMs (report §3.3).

Every reference is a plain float64 matmul of the dequantised FP8 operands, so what is
checked is the GEMM and the Linear's wiring (which tensor, which tiling, which transpose);
the quantisation itself is tested in test_fp8_quant.py.
"""


import pytest
import torch

from megatron_dsv3.fp8 import (
    blockwise_gemm,
    fp8_linear,
    quantize_1x128,
    quantize_128x1,
    quantize_128x128,
)

REL_TOL = 1e-6


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.detach().double() - ref).norm() / ref.norm())


def deq64(q) -> torch.Tensor:
    return q.dequantize(torch.float64)


OPERANDS = {"1x128": quantize_1x128, "128x128": quantize_128x128}


TILE_PAIRS = [("1x128", "128x128"), ("1x128", "1x128"), ("128x128", "1x128"), ("128x128", "128x128")]


@pytest.mark.parametrize("tiles", TILE_PAIRS)
@pytest.mark.parametrize("M,K,N", [(64, 256, 96), (130, 300, 200), (1, 128, 1), (257, 1000, 129)])
def test_emulate_matches_float64_dequantised_matmul(tiles, M, K, N):
    torch.manual_seed(0)
    a = OPERANDS[tiles[0]](torch.randn(M, K) * torch.logspace(-2, 2, K))
    b = OPERANDS[tiles[1]](torch.randn(N, K))
    out = blockwise_gemm(a, b, backend="emulate")
    assert out.shape == (M, N) and out.dtype == torch.float32
    assert rel_err(out, deq64(a) @ deq64(b).T) < REL_TOL


def test_auto_on_cpu_is_emulate():
    torch.manual_seed(1)
    a, b = quantize_1x128(torch.randn(8, 256)), quantize_128x128(torch.randn(16, 256))
    assert torch.equal(blockwise_gemm(a, b), blockwise_gemm(a, b, backend="emulate"))


def test_scaled_mm_on_cpu_raises_with_reason():
    a, b = quantize_1x128(torch.randn(8, 256)), quantize_128x128(torch.randn(16, 256))
    with pytest.raises(RuntimeError, match=r"scaled_mm.*(CUDA sm90 device; tensors are on cpu|torch >= 2\.9)"):
        blockwise_gemm(a, b, backend="scaled_mm")


def test_te_is_not_a_gemm_backend_and_says_where_te_fp8_lives():
    a, b = quantize_1x128(torch.randn(8, 256)), quantize_128x128(torch.randn(16, 256))
    with pytest.raises(ValueError, match="fp8_blockwise='te'"):
        blockwise_gemm(a, b, backend="te")


def test_bad_backend_and_operands_raise():
    a, b = quantize_1x128(torch.randn(8, 256)), quantize_128x128(torch.randn(16, 256))
    with pytest.raises(ValueError, match="backend='cublas' is not one of"):
        blockwise_gemm(a, b, backend="cublas")
    with pytest.raises(ValueError, match=r"tile \(128, 1\).*\.t\(\)"):
        blockwise_gemm(quantize_128x1(torch.randn(8, 256)), b)
    with pytest.raises(ValueError, match="inner dims differ"):
        blockwise_gemm(a, quantize_128x128(torch.randn(16, 384)))


def run_linear(x, w, bias, grad_y, **kwargs):
    x = x.clone().requires_grad_()
    w_leaf = w.clone().requires_grad_()
    b_leaf = bias.clone().requires_grad_() if bias is not None else None
    y = fp8_linear(x, w_leaf, b_leaf, **kwargs)
    y.backward(grad_y)
    return y, x.grad, w_leaf.grad, (b_leaf.grad if b_leaf is not None else None)


@pytest.mark.parametrize("pow2_input_scale", [False, True])
@pytest.mark.parametrize("lead,K,N", [((2, 37), 300, 200), ((256,), 256, 128), ((3, 1, 5), 130, 7)])
def test_fp8_linear_three_gemms_match_float64_references(lead, K, N, pow2_input_scale):
    torch.manual_seed(2)
    x = torch.randn(*lead, K) * torch.logspace(-1, 1, K)
    w = torch.randn(N, K) / K**0.5
    bias = torch.randn(N)
    grad_y = torch.randn(*lead, N)
    w_before = w.clone()

    y, dx, dw, db = run_linear(x, w, bias, grad_y, backend="emulate", pow2_input_scale=pow2_input_scale)

    x_TK, dy_TN = x.reshape(-1, K), grad_y.reshape(-1, N)
    w_blocks = deq64(quantize_128x128(w))
    y_ref = deq64(quantize_1x128(x_TK, pow2_scale=pow2_input_scale)) @ w_blocks.T + bias.double()
    dx_ref = deq64(quantize_1x128(dy_TN)) @ w_blocks
    dw_ref = deq64(quantize_128x1(dy_TN)).T @ deq64(quantize_128x1(x_TK, pow2_scale=pow2_input_scale))

    assert y.shape == (*lead, N) and dx.shape == x.shape and dw.shape == w.shape
    assert rel_err(y.reshape(-1, N), y_ref) < REL_TOL
    assert rel_err(dx.reshape(-1, K), dx_ref) < REL_TOL
    assert rel_err(dw, dw_ref) < REL_TOL
    assert rel_err(db, dy_TN.double().sum(0)) < REL_TOL
    assert torch.equal(w, w_before)


def test_fp8_linear_caches_fp8_not_fp32_activations():
    torch.manual_seed(3)
    x = torch.randn(64, 256, requires_grad=True)
    w = torch.randn(128, 256, requires_grad=True)
    saved = []

    def pack(t):
        saved.append((t.dtype, tuple(t.shape)))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fp8_linear(x, w, backend="emulate")
    y.sum().backward()
    assert (torch.float8_e4m3fn, (64, 256)) in saved  # x codes, 128x1 tiles
    assert (torch.float32, (64, 256)) not in saved  # never the fp32 x
    assert {dtype for dtype, shape in saved if shape in ((64, 256), (128, 256))} == {torch.float8_e4m3fn}


def test_fp8_linear_keeps_input_dtype_and_works_without_bias():
    torch.manual_seed(4)
    x = torch.randn(2, 10, 256, dtype=torch.bfloat16)
    w = torch.randn(64, 256)
    y, dx, dw, db = run_linear(x, w, None, torch.randn(2, 10, 64, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and dx.dtype == torch.bfloat16
    assert dw.dtype == torch.float32 and db is None


def test_fp8_linear_non_finite_grad_raises_naming_it():
    x = torch.randn(4, 128, requires_grad=True)
    y = fp8_linear(x, torch.randn(8, 128))
    grad = torch.ones_like(y)
    grad[0, 0] = float("inf")
    with pytest.raises(ValueError, match="'fp8_linear output grad dy'.*1 non-finite"):
        y.backward(grad)
