"""megatron_dsv3: DeepSeek-V3's training system as a Megatron-Core plugin."""

from megatron_dsv3.config import ConfigError, DeepSeekV3Config, count_parameters, preset

__all__ = ["ConfigError", "DeepSeekV3Config", "count_parameters", "preset"]
