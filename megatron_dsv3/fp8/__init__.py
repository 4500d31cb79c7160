"""Fine-grained FP8 (E4M3) training numerics, DeepSeek-V3 report §3.3: tile-wise quantisation
(1x128 activations, 128x1 for their transposes, 128x128 weights), block-scaled GEMMs with
FP32 promotion every 128 inner elements, and a Linear whose three GEMMs run in FP8."""

from megatron_dsv3.fp8.gemm import blockwise_gemm
from megatron_dsv3.fp8.linear import BlockwiseFP8LinearFunction, fp8_linear
from megatron_dsv3.fp8.quant import (
    E4M3_MAX,
    BlockwiseFP8,
    quantize_1x128,
    quantize_128x1,
    quantize_128x128,
    quantize_tiles,
)

__all__ = [
    "E4M3_MAX",
    "BlockwiseFP8",
    "BlockwiseFP8LinearFunction",
    "blockwise_gemm",
    "fp8_linear",
    "quantize_1x128",
    "quantize_128x1",
    "quantize_128x128",
    "quantize_tiles",
]
