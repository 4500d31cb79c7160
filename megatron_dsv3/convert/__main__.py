"""python -m megatron_dsv3.convert hf-to-mcore --hf DIR --out DIR --preset NAME [--set FIELD=JSON ...]
python -m megatron_dsv3.convert mcore-to-hf --mcore DIR --out DIR --preset NAME [--set FIELD=JSON ...] [--fp8]

hf-to-mcore also runs under torchrun (`torchrun --nproc-per-node N -m megatron_dsv3.convert
hf-to-mcore ...`): the N processes share the tensors, each writes its part, and the checkpoint
holds the same tensors as one process's. The checkpoint has no parallel layout of its own:
Megatron's dist_checkpointing reshards it to the TP/PP/EP of whatever loads it.
"""

from __future__ import annotations

import argparse
import sys

import torch

from megatron_dsv3 import cpu
from megatron_dsv3.config import ConfigError, parse_override, preset
from megatron_dsv3.convert.hf import ConversionError, hf_to_mcore, mcore_to_hf
from megatron_dsv3.distributed import init_distributed


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="python -m megatron_dsv3.convert", description=__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = top.add_subparsers(dest="command", required=True)
    to_mcore = commands.add_parser("hf-to-mcore", help="HF safetensors (BF16/FP32/DeepSeek FP8) -> dist_checkpointing")
    to_mcore.add_argument("--hf", required=True, help="directory with config.json and safetensors shards")
    to_hf = commands.add_parser("mcore-to-hf", help="dist_checkpointing -> HF safetensors (BF16, or FP8 with --fp8)")
    to_hf.add_argument("--mcore", required=True, help="dist_checkpointing checkpoint directory")
    to_hf.add_argument("--fp8", action="store_true", help="DeepSeek's FP8: float8_e4m3fn weights + 128x128 weight_scale_inv")
    for command in (to_mcore, to_hf):
        command.add_argument("--out", required=True, help="output directory (must not exist)")
        command.add_argument("--preset", required=True, help="megatron_dsv3.config preset name")
        command.add_argument("--set", dest="overrides", type=parse_override, action="append", default=[],
                             metavar="FIELD=JSON", help="override a preset field (repeatable); "
                             "hf-to-mcore writes params_dtype, e.g. --set 'params_dtype=\"bfloat16\"'")
    return top


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        config = preset(args.preset, **dict(args.overrides))
        init_distributed()  # torchrun's processes, else this one
        cpu.enable()
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        if args.command == "hf-to-mcore":
            stats = hf_to_mcore(args.hf, args.out, config)
            moved = torch.tensor([stats.bytes_read, stats.bytes_written], dtype=torch.float64)
            if world > 1:
                torch.distributed.all_reduce(moved)
            if rank == 0:
                print(f"hf -> mcore: read {moved[0] / 1e9:.2f} GB, wrote {moved[1] / 1e9:.2f} GB in {stats.seconds:.1f} s "
                      f"on {world} process(es) ({moved[0] / 1e9 / stats.seconds:.2f} GB/s read)", file=sys.stderr)
        else:
            if world > 1:
                raise ConversionError(f"mcore-to-hf runs in one process, not {world}. Fix: run it without torchrun.")
            mcore_to_hf(args.mcore, args.out, config, fp8=args.fp8)
    except (ConfigError, ConversionError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
