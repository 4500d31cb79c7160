"""convert: hf-to-mcore throughput against a plain copy of the same files (issue item 5).

Design note
-----------
Input. A synthetic DeepSeek-V3 checkpoint in the release's format, written here: DeepSeek's
FP8 (float8_e4m3fn weights with 128x128 FP32 `weight_scale_inv`; embeddings, norms, the gate
in BF16; the expert bias in FP32), in safetensors shards of `--shard-mb`, tensors in HF order,
an index and the config.json `mcore-to-hf` would write. The default model is `deepseek-v3`
with the release's tensor shapes (hidden 7168, experts 2048 wide, MLA 1536/512) but 2 layers
(one dense, one MoE with 8 experts), a 1024-token vocabulary and no MTP: 1.2 GB in, FP8
weights and scales 97.5% of the bytes (the release: 98.9%). FP8 codes are random bytes (no NaN codes), scales
random; the values do not change the work.

What is timed, in this order, each once per `--repeat`:
  copy     every shard copied to a scratch directory with `shutil.copyfile` (the kernel's
           copy), each fsynced, timed from the first open to the last fsync: the physical limit
           of reading these bytes and writing them durably on this machine;
  convert  `hf_to_mcore` in a fresh process (`python -m megatron_dsv3.bench.convert --worker`),
           timed inside it from the call to the output's rename (process start and imports
           excluded; every .distcp file fsynced); then the same under
           `torchrun --nproc-per-node P` (the longest rank's call; the ranks end together).
The input is read once before anything is timed, so copy and conversion both read it from the
page cache; every output (and the scratch copy) is deleted before the next step. Medians over
`--repeat` rounds; the ratios and the speed-up are medians of each round's (a round's steps
ran next to each other, under the same load from whatever else runs on the machine: the 1-minute
load average at the start of each round is reported).

Two ratios, both from those times (conversion over copy):
  ratio_bytes  (bytes read + bytes written) per second: the conversion reads the FP8 input and
               writes BF16 (or FP32) weights, 2x (4x) the bytes; the copy reads and writes the
               input once. This is the physical-limit comparison (target >= 0.5).
  ratio_input  input bytes per second alone (the conversion moves 3x the copy's bytes per
               input byte with BF16 output, so this is at most ~2/3 even for a free conversion).
Peak memory: each conversion process resets its RSS high-water mark (`/proc/self/clear_refs`
5) just before the call and reports VmHWM - VmRSS-before (anonymous memory and anything
mapped; the converter maps no shard), against the largest shard.

Projection for the 685B release: its input and output bytes are computed from the converter's
own table over the `deepseek-v3` preset's meta model (the release's 163 shards hold ~688 GB:
FP8 weights, their scales, BF16 embeddings/norms/gate, FP32 biases; the output in
`--out-dtype`), divided by the measured input rate (1 process, and P processes), and by the
copy's rate for the limit. Assumes the same per-byte costs (the same tensor shapes) and this
machine's disk and cores.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from megatron_dsv3.config import DeepSeekV3Config, ConfigError, parse_override, preset

DEFAULT_PRESET = "deepseek-v3"
# the release's tensor shapes, 2 layers (dense + MoE), 8 experts, a small vocabulary, no MTP
DEFAULT_SETS = {"num_layers": 2, "moe_layer_freq": [0, 1], "num_moe_experts": 8, "moe_router_topk": 2,
                "moe_router_num_groups": 4, "moe_router_group_topk": 2, "vocab_size": 1024, "mtp_num_layers": None}
RELEASE_SHARDS = 163
TARGET_RATIO = 0.5
MEMORY_LIMIT = 1.5  # peak RSS over baseline, in largest shards


def _log(message: str) -> None:
    print(f"[bench convert] {message}", file=sys.stderr, flush=True)


# --- the input ------------------------------------------------------------------------------


def hf_bytes(config: DeepSeekV3Config, out_dtype: torch.dtype) -> dict:
    """Bytes of `config`'s checkpoint in DeepSeek's FP8 release format, and of its conversion."""
    from megatron_dsv3.convert.hf import _tensor_specs, entries, fp8_scale_shape, meta_model

    specs = _tensor_specs(meta_model(config))
    fp8 = bf16 = fp32 = 0
    for entry in entries(config):
        shape = specs[entry.mcore][0]
        rows = entry.rows_of(shape[0])
        numel = (rows.stop - rows.start) * (shape[1] if len(shape) > 1 else 1)
        if entry.rule.fp8:
            fp8 += numel + 4 * torch.Size(fp8_scale_shape((rows.stop - rows.start, shape[1]))).numel()
        elif entry.rule.hf_dtype == torch.float32 and entry.hf.endswith("bias"):
            fp32 += 4 * numel
        else:
            bf16 += 2 * numel
    out = sum((4 if key.endswith("expert_bias") else out_dtype.itemsize) * torch.Size(shape).numel()
              for key, (shape, _) in specs.items())
    return {"input": fp8 + bf16 + fp32, "fp8_share": fp8 / (fp8 + bf16 + fp32), "output": out, "tensors": len(entries(config))}


def synthetic_checkpoint(directory: Path, config: DeepSeekV3Config, shard_bytes: int, seed: int = 0) -> dict:
    """An HF checkpoint of `config` in DeepSeek's FP8 format (the module note); returns its files
    and sizes."""
    from safetensors.torch import save_file

    from megatron_dsv3.convert.hf import INDEX_FILE, SCALE_SUFFIX, _tensor_specs, entries, fp8_scale_shape, hf_config, meta_model

    directory.mkdir(parents=True)
    specs = _tensor_specs(meta_model(config))
    generator = torch.Generator().manual_seed(seed)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for entry in entries(config):
        shape = specs[entry.mcore][0]
        rows = entry.rows_of(shape[0])
        shape = (rows.stop - rows.start, *shape[1:])
        if entry.rule.fp8:  # codes 0x00-0x7e and 0x80-0xfe: every finite E4M3 value, no NaN
            codes = torch.randint(0, 0x7F, shape, dtype=torch.uint8, generator=generator)
            codes |= torch.randint(0, 2, shape, dtype=torch.uint8, generator=generator) << 7
            tensors = {entry.hf: codes.view(torch.float8_e4m3fn),
                       entry.hf + SCALE_SUFFIX: torch.rand(fp8_scale_shape(shape), generator=generator) * 1e-3}
        else:
            dtype = torch.float32 if entry.hf.endswith("bias") else torch.bfloat16
            tensors = {entry.hf: torch.randn(shape, generator=generator).to(dtype)}
        if size and size + sum(t.nbytes for t in tensors.values()) > shard_bytes:
            shards.append({})
            size = 0
        shards[-1].update(tensors)
        size += sum(t.nbytes for t in tensors.values())
    weight_map, files = {}, []
    for number, tensors in enumerate(shards, start=1):
        file = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, directory / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
        files.append(directory / file)
    total = sum(f.stat().st_size for f in files)
    (directory / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (directory / "config.json").write_text(json.dumps(hf_config(config, fp8=True), indent=2))
    return {"files": files, "bytes": total, "largest_shard": max(f.stat().st_size for f in files)}


def read_once(files: list[Path]) -> None:
    """Read every file (into the page cache, as the copy and the conversion will find them)."""
    buffer = bytearray(16 << 20)
    for file in files:
        with open(file, "rb", buffering=0) as f:
            while f.readinto(buffer):
                pass


def copy_seconds(files: list[Path], scratch: Path) -> float:
    """Seconds to copy every file into `scratch` (shutil.copyfile, fsync each); `scratch` is removed."""
    scratch.mkdir()
    started = time.perf_counter()
    for file in files:
        target = scratch / file.name
        shutil.copyfile(file, target)
        with open(target, "rb+") as f:
            os.fsync(f.fileno())
    seconds = time.perf_counter() - started
    shutil.rmtree(scratch)
    return seconds


def directory_bytes(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.iterdir() if f.is_file())


# --- one conversion, in processes of its own ------------------------------------------------


def _child_env() -> dict:
    """This environment without a torch.distributed rendezvous (a conversion makes its own)."""
    drop = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK")
    return {k: v for k, v in os.environ.items() if k not in drop}


def convert(hf_dir: Path, out: Path, preset_name: str, overrides: dict, processes: int, stats_dir: Path) -> dict:
    """`hf_to_mcore` on `processes` processes; per-rank stats (seconds, bytes, peak RSS)."""
    stats_dir.mkdir(exist_ok=True)
    for old in stats_dir.glob("rank-*.json"):
        old.unlink()
    worker = ["-m", "megatron_dsv3.bench.convert", "--worker", str(hf_dir), str(out), preset_name, json.dumps(overrides), str(stats_dir)]
    if processes == 1:
        command = [sys.executable, *worker]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes), *worker]
    run = subprocess.run(command, env=_child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if run.returncode != 0:
        raise RuntimeError(f"conversion on {processes} process(es) failed:\n{run.stderr[-4000:]}")
    ranks = [json.loads((stats_dir / f"rank-{r}.json").read_text()) for r in range(processes)]
    return {"seconds": max(r["seconds"] for r in ranks), "output_bytes": directory_bytes(out),
            "bytes_read": sum(r["bytes_read"] for r in ranks), "bytes_written": sum(r["bytes_written"] for r in ranks),
            "peak_rss_over_baseline": max(r["peak_rss_over_baseline"] for r in ranks), "ranks": ranks}


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        return 1024 * int(next(line for line in f if line.startswith(field)).split()[1])


def worker(argv: list[str]) -> int:
    """One process of a timed conversion (under torchrun: one rank); writes its stats as JSON."""
    hf_dir, out, preset_name, overrides, stats_dir = argv
    from megatron_dsv3 import cpu
    from megatron_dsv3.convert import hf_to_mcore
    from megatron_dsv3.distributed import init_distributed

    init_distributed()
    cpu.enable()
    config = preset(preset_name, **json.loads(overrides))
    rank = torch.distributed.get_rank()
    torch.distributed.barrier()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    before = _status_bytes("VmRSS:")
    stats = hf_to_mcore(hf_dir, out, config, progress=False)
    peak = _status_bytes("VmHWM:") - before
    record = {"rank": rank, "seconds": stats.seconds, "bytes_read": stats.bytes_read,
              "bytes_written": stats.bytes_written, "tensors": stats.tensors, "peak_rss_over_baseline": peak,
              "rss_before": before, "maxrss_self": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    (Path(stats_dir) / f"rank-{rank}.json").write_text(json.dumps(record))
    return 0


# --- the benchmark ---------------------------------------------------------------------------


def run(preset_name: str = DEFAULT_PRESET, overrides: dict | None = None, out_dtype: str = "bfloat16",
        shard_mb: float = 512, processes: int = 2, repeat: int = 1, workdir: str | None = None,
        release_preset: str = "deepseek-v3") -> dict:
    """The benchmark's JSON object (keys: see `format_table` and the module note);
    `release_preset`: the model of the projection."""
    overrides = dict(DEFAULT_SETS if overrides is None and preset_name == DEFAULT_PRESET else overrides or {})
    overrides["params_dtype"] = out_dtype
    config = preset(preset_name, **overrides)  # a bad --set fails here, before any work
    if processes < 2:
        raise ValueError(f"processes={processes}: the parallel mode needs at least 2. Fix: pass --processes 2.")
    if repeat < 1:
        raise ValueError(f"repeat={repeat}: must be at least 1. Fix: pass --repeat 1.")
    from megatron_dsv3 import cpu
    from megatron_dsv3.distributed import init_distributed

    init_distributed()
    cpu.enable()
    root = Path(tempfile.mkdtemp(prefix="bench-convert-", dir=workdir))
    try:
        _log(f"writing a synthetic FP8 checkpoint in {root}")
        started = time.perf_counter()
        source = synthetic_checkpoint(root / "hf", config, int(shard_mb * 2**20))
        _log(f"{len(source['files'])} shards, {source['bytes'] / 1e9:.2f} GB in {time.perf_counter() - started:.1f} s")
        read_once(source["files"])
        copies, singles, parallels, loads = [], [], [], []
        for round_ in range(repeat):
            loads.append(os.getloadavg()[0])
            copies.append(copy_seconds(source["files"], root / "copy"))
            _log(f"round {round_ + 1}/{repeat}: copy {copies[-1]:.2f} s")
            singles.append(convert(root / "hf", root / "out-1", preset_name, overrides, 1, root / "stats"))
            shutil.rmtree(root / "out-1")
            _log(f"round {round_ + 1}/{repeat}: 1 process {singles[-1]['seconds']:.2f} s")
            parallels.append(convert(root / "hf", root / f"out-{processes}", preset_name, overrides, processes, root / "stats"))
            shutil.rmtree(root / f"out-{processes}")
            _log(f"round {round_ + 1}/{repeat}: {processes} processes {parallels[-1]['seconds']:.2f} s")
    finally:
        shutil.rmtree(root, ignore_errors=True)

    size_in, size_out = source["bytes"], singles[0]["output_bytes"]
    # each round's copy and conversions ran next to each other (the same load): ratios per round, then medians
    ratio_bytes = statistics.median(((size_in + size_out) / r["seconds"]) / (2 * size_in / c) for c, r in zip(copies, singles))
    ratio_input = statistics.median(c / r["seconds"] for c, r in zip(copies, singles))
    speedup = statistics.median(r1["seconds"] / r2["seconds"] for r1, r2 in zip(singles, parallels))
    copy_s = statistics.median(copies)
    one_s = statistics.median(r["seconds"] for r in singles)
    many_s = statistics.median(r["seconds"] for r in parallels)
    copy_rate_in = size_in / copy_s
    one_rate_in = size_in / one_s
    moved_copy = 2 * size_in / copy_s
    moved_one = (size_in + size_out) / one_s
    _log(f"computing the release's bytes from the {release_preset} preset (meta model)")
    release = hf_bytes(preset(release_preset, params_dtype=out_dtype), getattr(torch, out_dtype))
    return {
        "benchmark": "convert",
        "preset": preset_name, "overrides": overrides, "out_dtype": out_dtype,
        "input": {"bytes": size_in, "shards": len(source["files"]), "largest_shard": source["largest_shard"],
                  "tensors": hf_bytes(config, getattr(torch, out_dtype))["tensors"]},
        "output_bytes": size_out,
        "copy": {"seconds": copy_s, "all_seconds": copies, "input_gb_per_s": copy_rate_in / 1e9,
                 "moved_gb_per_s": moved_copy / 1e9},
        "convert_1": {"seconds": one_s, "all_seconds": [r["seconds"] for r in singles], "input_gb_per_s": one_rate_in / 1e9,
                      "moved_gb_per_s": moved_one / 1e9, "peak_rss_over_baseline": max(r["peak_rss_over_baseline"] for r in singles)},
        f"convert_{processes}": {"seconds": many_s, "all_seconds": [r["seconds"] for r in parallels],
                                 "input_gb_per_s": size_in / many_s / 1e9,
                                 "peak_rss_over_baseline": max(r["peak_rss_over_baseline"] for r in parallels)},
        "processes": processes,
        "load_average_1min": loads,  # at the start of each round: other work on this machine
        "ratio_bytes": ratio_bytes,
        "ratio_input": ratio_input,
        "target_ratio": TARGET_RATIO,
        "target_met": ratio_bytes >= TARGET_RATIO,
        "speedup": speedup,
        "peak_over_largest_shard": max(r["peak_rss_over_baseline"] for r in singles + parallels) / source["largest_shard"],
        "memory_limit_met": max(r["peak_rss_over_baseline"] for r in singles + parallels) <= MEMORY_LIMIT * source["largest_shard"],
        "release_projection": {
            "preset": release_preset, "input_bytes": release["input"], "output_bytes": release["output"], "shards": RELEASE_SHARDS,
            "fp8_share": release["fp8_share"], "hf_tensors": release["tensors"],
            "hours_1_process": release["input"] / one_rate_in / 3600,
            f"hours_{processes}_processes": release["input"] / (size_in / many_s) / 3600,
            "hours_copy_limit": (release["input"] + release["output"]) / moved_copy / 3600,
        },
    }


def format_table(result: dict) -> str:
    p = result["processes"]
    one, many, copy = result["convert_1"], result[f"convert_{p}"], result["copy"]
    projection = result["release_projection"]
    lines = [
        f"hf-to-mcore on {result['input']['shards']} synthetic FP8 shards ({result['input']['bytes'] / 1e9:.2f} GB in, "
        f"{result['output_bytes'] / 1e9:.2f} GB {result['out_dtype']} out, largest shard {result['input']['largest_shard'] / 1e6:.0f} MB)",
        f"{'':>22} {'seconds':>8} {'GB/s in':>8} {'GB/s moved':>11} {'peak RSS':>10}",
        f"{'copy (limit)':>22} {copy['seconds']:>8.2f} {copy['input_gb_per_s']:>8.2f} {copy['moved_gb_per_s']:>11.2f} {'':>10}",
        f"{'convert, 1 process':>22} {one['seconds']:>8.2f} {one['input_gb_per_s']:>8.2f} {one['moved_gb_per_s']:>11.2f} "
        f"{one['peak_rss_over_baseline'] / 1e6:>7.0f} MB",
        f"{f'convert, {p} processes':>22} {many['seconds']:>8.2f} {many['input_gb_per_s']:>8.2f} {'':>11} "
        f"{many['peak_rss_over_baseline'] / 1e6:>7.0f} MB",
        f"ratio to the copy: {result['ratio_bytes']:.2f} in bytes moved (target {result['target_ratio']}: "
        f"{'met' if result['target_met'] else 'NOT met'}), {result['ratio_input']:.2f} in input bytes; "
        f"speed-up at {p} processes {result['speedup']:.2f}x; peak RSS {result['peak_over_largest_shard']:.2f}x the largest shard "
        f"(limit {MEMORY_LIMIT}: {'met' if result['memory_limit_met'] else 'NOT met'})",
        f"rounds: {len(copy['all_seconds'])}, medians; 1-minute load average at their starts: "
        f"{', '.join(f'{load:.1f}' for load in result['load_average_1min'])} (this machine's other work)",
        f"685B release ({projection['input_bytes'] / 1e9:.0f} GB in, {projection['output_bytes'] / 1e12:.2f} TB out): "
        f"{projection['hours_1_process']:.2f} h on 1 process, {projection[f'hours_{p}_processes']:.2f} h on {p}, "
        f"copy limit {projection['hours_copy_limit']:.2f} h (this machine)",
    ]
    return "\n".join(lines)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("convert", help="hf-to-mcore throughput against a plain file copy, parallel speed-up, memory")
    parser.add_argument("--preset", default=DEFAULT_PRESET, help=f"model of the synthetic checkpoint (default {DEFAULT_PRESET})")
    parser.add_argument("--set", dest="overrides", type=parse_override, action="append", default=None, metavar="FIELD=JSON",
                        help=f"preset overrides (repeatable); {DEFAULT_PRESET}'s default: " + json.dumps(DEFAULT_SETS))
    parser.add_argument("--out-dtype", choices=("bfloat16", "float32"), default="bfloat16", help="the checkpoint's params_dtype")
    parser.add_argument("--shard-mb", type=float, default=512, help="safetensors shard size in MiB (default 512)")
    parser.add_argument("--processes", type=int, default=2, help="processes of the parallel conversion (default 2)")
    parser.add_argument("--repeat", type=int, default=1, help="rounds of copy / 1 process / P processes; medians")
    parser.add_argument("--workdir", default=None, help="where the synthetic checkpoint goes (default: the temp dir)")
    parser.add_argument("--release-preset", default="deepseek-v3", help="the model of the projection (default deepseek-v3)")
    parser.set_defaults(main=main)


def main(args: argparse.Namespace) -> int:
    try:
        result = run(args.preset, dict(args.overrides) if args.overrides is not None else None, args.out_dtype,
                     args.shard_mb, args.processes, args.repeat, args.workdir, args.release_preset)
    except (ConfigError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(format_table(result))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        sys.exit(worker(sys.argv[2:]))
    sys.exit(f"usage: python -m megatron_dsv3.bench convert (this module's --worker is the benchmark's own)")
