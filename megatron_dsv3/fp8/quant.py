"""Fine-grained (tile-wise) E4M3 quantisation (DeepSeek-V3 report §3.3, fine-grained quantization).

Every tensor is E4M3 (`torch.float8_e4m3fn`, largest finite value 448). A 2-D tensor is
cut into tiles and each tile gets its own FP32 scale, computed online from the current
tensor: `scale = amax(|tile|) / 448`, so the tile's largest value maps to +-448.
  - activations: 1x128 tiles (one token, 128 channels)            -> `quantize_1x128`
  - activations for the backward pass: 128x1 tiles (128 tokens, one channel) -> `quantize_128x1`
  - weights: 128x128 blocks                                        -> `quantize_128x128`

Conventions:
  - `scale` is the *dequantisation multiplier*: `value ~= float(code) * scale`.
  - Codes are `clamp(x / scale, -448, 448)` cast to E4M3 with torch's cast
    (round-to-nearest-even).
  - `pow2_scale=True` rounds each scale UP to a power of two (exactly representable, so
    scaling is exact and codes never exceed 448): the paper's choice for the activations
    of the Linear after attention.
  - An all-zero tile gets scale 1 and zero codes (never NaN). A tile whose amax / 448
    underflows FP32 is treated the same way.
  - Non-finite input (NaN/Inf) raises `ValueError` naming the tensor before anything is
    quantised: an overflow upstream must not turn silently into saturated codes.
  - Sizes that are not multiples of the tile: the last partial tile along a dimension is
    a tile of its own; its amax is taken over its valid elements only (the tensor is
    zero-padded internally, and zeros never raise an amax). `data` is stored UNPADDED in
    the original shape; `scale` has ceil(rows / tile_rows) x ceil(cols / tile_cols) entries.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from megatron_dsv3.config import FP8_TILE as TILE

E4M3_MAX = 448.0
FP8_DTYPE = torch.float8_e4m3fn


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class BlockwiseFP8:
    """A 2-D tensor in E4M3 with one FP32 scale per tile.

    data:  float8_e4m3fn [rows, cols], the original (unpadded) layout; may be a
           transposed view (see `t`).
    scale: float32 [ceil(rows / tile[0]), ceil(cols / tile[1])], dequantisation multipliers.
    tile:  (rows, cols) of one tile: (1, 128), (128, 1) or (128, 128); any other tile
           shape is allowed (e.g. the whole tensor for per-tensor scaling).
    shape: the logical shape (rows, cols) == data.shape.
    """

    data: torch.Tensor
    scale: torch.Tensor
    tile: tuple[int, int]
    shape: tuple[int, int]

    def __post_init__(self) -> None:
        if self.data.dtype != FP8_DTYPE:
            raise ValueError(f"BlockwiseFP8.data must be {FP8_DTYPE}, got {self.data.dtype}")
        if tuple(self.data.shape) != tuple(self.shape):
            raise ValueError(f"BlockwiseFP8.shape {tuple(self.shape)} != data.shape {tuple(self.data.shape)}")
        expected = (_ceil_div(self.shape[0], self.tile[0]), _ceil_div(self.shape[1], self.tile[1]))
        if self.scale.dtype != torch.float32 or tuple(self.scale.shape) != expected:
            raise ValueError(
                f"BlockwiseFP8.scale must be float32 of shape {expected} for shape {tuple(self.shape)} "
                f"and tile {self.tile}, got {self.scale.dtype} {tuple(self.scale.shape)}"
            )

    def t(self) -> BlockwiseFP8:
        """The transpose, as views: a 128x1-tiled [T, C] tensor becomes a 1x128-tiled [C, T] one."""
        return BlockwiseFP8(
            data=self.data.t(),
            scale=self.scale.t(),
            tile=(self.tile[1], self.tile[0]),
            shape=(self.shape[1], self.shape[0]),
        )

    def expanded_scale(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The scale of every element, [rows, cols]."""
        rows, cols = self.shape
        full = self.scale.to(dtype).repeat_interleave(self.tile[0], dim=0).repeat_interleave(self.tile[1], dim=1)
        return full[:rows, :cols]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """code * scale in `dtype` (exact in float32 and float64)."""
        return self.data.to(dtype) * self.expanded_scale(dtype)


def check_finite(x: torch.Tensor, name: str) -> None:
    """Raise ValueError naming `name` if `x` holds any NaN or Inf."""
    n_bad = int((~torch.isfinite(x)).sum())
    if n_bad:
        raise ValueError(
            f"cannot quantise '{name}' to FP8: it holds {n_bad} non-finite value(s) (NaN/Inf) "
            f"out of {x.numel()}; find where it overflowed (e.g. lower the learning rate or check "
            f"the loss scale) instead of quantising it"
        )


def pow2_ceil(scale: torch.Tensor) -> torch.Tensor:
    """The smallest power of two >= scale, for positive finite FP32 `scale`; exact.

    frexp gives scale = m * 2**e with m in [0.5, 1): a power of two has m == 0.5 and is
    2**(e - 1); anything else rounds up to 2**e.
    """
    mantissa, exponent = torch.frexp(scale)
    exponent = exponent - (mantissa == 0.5).to(exponent.dtype)
    return torch.ldexp(torch.ones_like(scale), exponent)


def quantize_tiles(
    x: torch.Tensor, tile: tuple[int, int], *, pow2_scale: bool = False, name: str = "tensor"
) -> BlockwiseFP8:
    """Quantise a 2-D tensor to E4M3 with one scale per `tile` = (tile_rows, tile_cols)."""
    if x.dim() != 2:
        raise ValueError(f"'{name}' must be 2-D [rows, cols] to quantise, got shape {tuple(x.shape)}")
    check_finite(x, name)
    rows, cols = x.shape
    tr, tc = tile
    rows_t, cols_t = _ceil_div(rows, tr), _ceil_div(cols, tc)

    # zero-pad to whole tiles, then view as [rows_t, tr, cols_t, tc]
    x_pad = F.pad(x.float(), (0, cols_t * tc - cols, 0, rows_t * tr - rows))
    x_tiles = x_pad.view(rows_t, tr, cols_t, tc)
    amax_Rt_Ct = x_tiles.abs().amax(dim=(1, 3))

    scale_Rt_Ct = amax_Rt_Ct / E4M3_MAX
    scale_Rt_Ct = torch.where(scale_Rt_Ct > 0, scale_Rt_Ct, torch.ones_like(scale_Rt_Ct))
    if pow2_scale:
        scale_Rt_Ct = pow2_ceil(scale_Rt_Ct)

    codes = (x_tiles / scale_Rt_Ct[:, None, :, None]).clamp(-E4M3_MAX, E4M3_MAX).to(FP8_DTYPE)
    data = codes.view(rows_t * tr, cols_t * tc)[:rows, :cols].contiguous()
    return BlockwiseFP8(data=data, scale=scale_Rt_Ct, tile=(tr, tc), shape=(rows, cols))


def quantize_1x128(x: torch.Tensor, *, pow2_scale: bool = False, name: str = "tensor") -> BlockwiseFP8:
    """Activation tiles: 1 row x 128 columns (along the last dim). x: [rows, cols]."""
    return quantize_tiles(x, (1, TILE), pow2_scale=pow2_scale, name=name)


def quantize_128x1(x: torch.Tensor, *, pow2_scale: bool = False, name: str = "tensor") -> BlockwiseFP8:
    """Transposed-activation tiles: 128 rows x 1 column (along the first dim). x: [rows, cols]."""
    return quantize_tiles(x, (TILE, 1), pow2_scale=pow2_scale, name=name)


def quantize_128x128(w: torch.Tensor, *, pow2_scale: bool = False, name: str = "tensor") -> BlockwiseFP8:
    """Weight blocks: 128 x 128. w: [rows, cols]."""
    return quantize_tiles(w, (TILE, TILE), pow2_scale=pow2_scale, name=name)
