"""Block-scaled FP8 GEMM with FP32 promotion every 128 inner elements (DeepSeek-V3 report §3.3).

`blockwise_gemm(a, b)` computes `dequant(a) @ dequant(b).T` for a: [M, K] and b: [N, K], both
`BlockwiseFP8` whose tiles run along K in 128-wide slices: each operand is tiled (1, 128)
(an activation or gradient, one scale per row per K-slice) or (128, 128) (a weight block).
"Increased accumulation precision": the product of the FP8 codes of one 128-wide K-slice is
a partial sum; it is promoted to FP32, multiplied by the two scales of that slice, and
added to an FP32 accumulator (N_C = 128).

The three GEMMs of a Linear y = x W^T (x: [T, K] tokens x channels, W: [N, K]):
  Fprop  y  [T, N] = blockwise_gemm(quantize_1x128(x),  quantize_128x128(W))
  Dgrad  dx [T, K] = blockwise_gemm(quantize_1x128(dy), quantize_128x128(W).t())
         (W^T is [K, N] in the same 128x128 blocks, transposed; inner dim = N)
  Wgrad  dW [N, K] = blockwise_gemm(quantize_128x1(dy).t(), quantize_128x1(x).t())
         (dy^T [N, T] and x^T [K, T]: 128x1 tiles over tokens become 1x128 tiles along
          the inner dim T after `.t()`)

Backends (`backend=`):
  "emulate"   any device: the slice-by-slice FP32 promotion above, written in torch.
  "scaled_mm" `torch.nn.functional.scaled_mm` with ScalingType.BlockWise1x128 /
              BlockWise128x128 (torch >= 2.9, CUDA sm90 (Hopper) only, cuBLASLt >= 12.9).
  (Transformer Engine's blockwise FP8 is not a backend of this function: it runs inside TE's
  own modules, selected by the config's `fp8_blockwise="te"`.)
  "auto"      scaled_mm for CUDA tensors on an sm90 device when the tile pair has a
              kernel, else emulate.
Asking explicitly for a backend that cannot run is a RuntimeError saying why.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from megatron_dsv3.config import FP8_GEMM_BACKENDS
from megatron_dsv3.config import FP8_TILE as TILE
from megatron_dsv3.fp8.quant import BlockwiseFP8

_ROW_TILE = (1, TILE)
_BLOCK_TILE = (TILE, TILE)


def _check_operands(a: BlockwiseFP8, b: BlockwiseFP8) -> None:
    for label, op in (("a", a), ("b", b)):
        if op.tile not in (_ROW_TILE, _BLOCK_TILE):
            raise ValueError(
                f"blockwise_gemm operand {label} has tile {op.tile}; it needs (1, 128) or (128, 128) "
                f"tiles along its inner (last) dim. For a 128x1-tiled tensor pass its `.t()`"
            )
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"blockwise_gemm: inner dims differ: a is {a.shape} [M, K], b is {b.shape} [N, K]")
    if a.data.device != b.data.device:
        raise ValueError(f"blockwise_gemm: a is on {a.data.device}, b is on {b.data.device}")


def _scale_per_row(op: BlockwiseFP8) -> torch.Tensor:
    """[rows, K/128]: the scale of each row in each K-slice (128x128 blocks repeat per row)."""
    if op.tile == _ROW_TILE:
        return op.scale
    return op.scale.repeat_interleave(TILE, dim=0)[: op.shape[0]]


def _emulate_gemm(a: BlockwiseFP8, b: BlockwiseFP8) -> torch.Tensor:
    """FP32 accumulation of per-slice partial products, scales applied at promotion."""
    (M, K), N = a.shape, b.shape[0]
    scale_a_M_Kt, scale_b_N_Kt = _scale_per_row(a), _scale_per_row(b)
    acc_MN = torch.zeros(M, N, dtype=torch.float32, device=a.data.device)
    for s, k0 in enumerate(range(0, K, TILE)):
        codes_a_M_128 = a.data[:, k0 : k0 + TILE].float()
        codes_b_N_128 = b.data[:, k0 : k0 + TILE].float()
        partial_MN = codes_a_M_128 @ codes_b_N_128.T  # the tensor-core part of one slice
        acc_MN += partial_MN * (scale_a_M_Kt[:, s, None] * scale_b_N_Kt[None, :, s])
    return acc_MN


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _scaled_mm_unavailable(a: BlockwiseFP8, b: BlockwiseFP8) -> str | None:
    """Why scaled_mm cannot run these operands here, or None if it can."""
    if not hasattr(F, "scaled_mm"):
        return f"scaled_mm needs torch >= 2.9 (torch.nn.functional.scaled_mm); this is torch {torch.__version__}"
    device = a.data.device
    if device.type != "cuda":
        return f"scaled_mm needs a CUDA sm90 device; tensors are on {device}"
    capability = torch.cuda.get_device_capability(device)
    if capability[0] != 9:
        sm = f"sm{capability[0]}{capability[1]}"
        return f"scaled_mm's 1x128/128x128 kernels exist on sm90 (Hopper) only; {device} is {sm}"
    if a.tile == _BLOCK_TILE and b.tile == _BLOCK_TILE:
        return "scaled_mm has no 128x128 x 128x128 kernel (one operand must be 1x128); use backend='emulate'"
    return None


def _scaled_mm_gemm(a: BlockwiseFP8, b: BlockwiseFP8, out_dtype: torch.dtype) -> torch.Tensor:
    """`F.scaled_mm(a [M, K] row-major, b^T [K, N] column-major)` with block scales.

    torch's scales are dequantisation multipliers, like ours (out = (a * s_a) @ (b * s_b)^T),
    so they are passed as they are, only re-laid out as cuBLASLt wants them:
      1x128 operand  [R, K]: scale [R, K/128] with strides (1, R) ("outer-dim-major"),
                              i.e. `scale.t().contiguous().t()`.
      128x128 operand [R, K]: scale stored as [R/128, L4] row-major with L4 = round_up(K/128, 4)
                              (the K-blocks padded to a multiple of 4), passed transposed:
                              shape [L4, R/128], strides (1, L4).
    The same layouts serve a and b (b is given as the [N, K] operand; torch reads its scale
    against b^T). Codes are padded with zeros to K % 128 == 0 and M, N % 16 == 0 (cuBLAS FP8
    alignment); padded K adds nothing, padded rows are sliced off the output.
    """
    (M, K), N = a.shape, b.shape[0]
    K_pad, M_pad, N_pad = _round_up(K, TILE), _round_up(M, 16), _round_up(N, 16)

    def codes(op: BlockwiseFP8, rows_pad: int) -> torch.Tensor:
        data = op.data.contiguous()
        if data.shape != (rows_pad, K_pad):
            # F.pad has no float8 kernel: pad through a zero buffer
            padded = torch.zeros(rows_pad, K_pad, dtype=data.dtype, device=data.device)
            padded[: data.shape[0], : data.shape[1]] = data
            data = padded
        return data

    def scale_and_recipe(op: BlockwiseFP8, rows_pad: int):
        if op.tile == _ROW_TILE:
            scale_R_Kt = F.pad(op.scale, (0, 0, 0, rows_pad - op.shape[0]), value=1.0)
            return scale_R_Kt.t().contiguous().t(), F.ScalingType.BlockWise1x128
        k_tiles = op.scale.shape[1]
        scale_Rt_L4 = F.pad(op.scale, (0, _round_up(k_tiles, 4) - k_tiles), value=1.0).contiguous()
        return scale_Rt_L4.t(), F.ScalingType.BlockWise128x128

    scale_a, recipe_a = scale_and_recipe(a, M_pad)
    scale_b, recipe_b = scale_and_recipe(b, N_pad)
    out = F.scaled_mm(
        codes(a, M_pad),
        codes(b, N_pad).t(),
        scale_a,
        recipe_a,
        scale_b,
        recipe_b,
        output_dtype=out_dtype,
    )
    return out[:M, :N]


def blockwise_gemm(
    a: BlockwiseFP8, b: BlockwiseFP8, *, backend: str = "auto", out_dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """dequant(a) @ dequant(b).T, [M, N], for a: [M, K] and b: [N, K] (see module docstring)."""
    _check_operands(a, b)
    if backend == "te":
        raise ValueError(
            "blockwise_gemm backend='te': TE's blockwise FP8 runs inside TE modules, not on these "
            "tensors. Fix: set the config's fp8_blockwise='te' with transformer_impl='transformer_engine'."
        )
    if backend not in FP8_GEMM_BACKENDS:
        raise ValueError(f"blockwise_gemm backend={backend!r} is not one of {FP8_GEMM_BACKENDS}")
    if backend == "auto":
        reason = _scaled_mm_unavailable(a, b)
        if reason and a.data.is_cuda:  # a GPU run that will not get FP8 tensor cores: say so
            warnings.warn(f"blockwise_gemm backend='auto' emulates FP8 on this GPU: {reason}", stacklevel=2)
        backend = "emulate" if reason else "scaled_mm"
    if backend == "emulate":
        return _emulate_gemm(a, b).to(out_dtype)
    reason = _scaled_mm_unavailable(a, b)
    if reason:
        raise RuntimeError(f"blockwise_gemm backend='scaled_mm' cannot run: {reason}")
    return _scaled_mm_gemm(a, b, out_dtype)
