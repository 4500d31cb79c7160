"""Benchmarks: `python -m megatron_dsv3.bench SUBCOMMAND` (each prints a table, then one JSON line)."""
