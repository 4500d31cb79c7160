"""`python -m megatron_dsv3.bench SUBCOMMAND [options]`; with no or an unknown subcommand, usage.

Each subcommand module has `add_parser(subparsers)`, which registers its options and sets
`main(args) -> exit code` as the parser default.
"""

import argparse
import sys

from megatron_dsv3.bench import convert, decode, fp8_accumulation, fp8_convergence, fp8_error, overlap, pipeline

SUBCOMMAND_MODULES = (fp8_error, fp8_accumulation, fp8_convergence, pipeline, overlap, convert, decode)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m megatron_dsv3.bench",
        description="Benchmarks of megatron_dsv3; each prints a readable table, then one JSON line.",
    )
    subparsers = parser.add_subparsers(title="subcommands", metavar="SUBCOMMAND")
    for module in SUBCOMMAND_MODULES:
        module.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # an unknown subcommand exits 2 with usage and the choices
    if not hasattr(args, "main"):
        parser.print_help(sys.stderr)
        return 2
    return args.main(args)


if __name__ == "__main__":
    sys.exit(main())
