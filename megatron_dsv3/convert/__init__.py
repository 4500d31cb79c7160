"""Checkpoint interop: HF DeepSeek-V3 (BF16 or DeepSeek's FP8) <-> Megatron dist_checkpointing.

CLI: `python -m megatron_dsv3.convert {hf-to-mcore,mcore-to-hf} --help`.
"""

from megatron_dsv3.convert.hf import (
    HF_CONFIG_RECORD,
    TABLE,
    ConversionError,
    ConversionStats,
    dequantize_fp8,
    hf_to_mcore,
    load_mcore_tensors,
    mcore_to_hf,
    quantize_fp8,
    recorded_hf_config,
)

__all__ = [
    "HF_CONFIG_RECORD", "TABLE", "ConversionError", "ConversionStats", "dequantize_fp8", "hf_to_mcore",
    "load_mcore_tensors", "mcore_to_hf", "quantize_fp8", "recorded_hf_config",
]
