"""fp8-error: FP8 GEMM error, per-tensor vs fine-grained tile scaling (report §3.3).

For each [M, K, N] it computes y = x W^T with two FP8 schemes against the FP32 GEMM:
  per-tensor  one FP32 scale for all of x and one for all of W (amax / 448), E4M3 codes,
              dequantised and multiplied in FP32;
  tile        x in 1x128 tiles, W in 128x128 blocks, `blockwise_gemm(backend="emulate")`
              (FP32 promotion every 128 inner elements).
Both use E4M3 and FP32 accumulation, so the difference is the scaling granularity only.
Two errors are reported: the relative Frobenius error of the whole output, and the
per-token error (each output row's relative error, averaged over tokens: every token of a
batch matters equally to the loss).

Two outlier models for the activations x [M tokens, K channels], x ~ N(0, 1) before:
  channels  1 in 512 channels (>= 1) scaled by log-uniform [1e2, 1e3] in every token:
            the systematic outlier features of LLM.int8() / SmoothQuant.
  massive   1 in 512 tokens x 1 in 512 channels (>= 1 each) scaled by 1e5: "massive
            activations" (Sun et al., 2024: a few activations ~100,000x the others).
Weights: N(0, 1/K), no outliers. The data are not tuned to any threshold.

Reading the results: E4M3 is floating point, so a per-tensor scale set by outliers costs
precision only for the values it pushes below E4M3's normal range (amax * 2**-6 / 448).
Channel outliers of 1e2-1e3x leave every other value in range: both schemes are at E4M3's
own precision (ratio ~1.4). Massive activations push every token without them into
subnormals: per-tensor scaling loses those tokens' precision while 1x128 tiles isolate the
few outlier tokens. The Frobenius error hides this, because ||y|| and its error are
dominated by the outlier rows, which both schemes round alike. A sweep of the massive
factor shows where per-tensor scaling breaks down.

The last line of output is one JSON object (see `run`); `acceptance_5x` says whether tile
scaling has at least 5x lower per-token error than per-tensor on every shape under the
massive-activation model.
"""

from __future__ import annotations

import argparse
import json
import math

import torch

from megatron_dsv3.fp8 import blockwise_gemm, quantize_1x128, quantize_128x128, quantize_tiles

DEFAULT_SHAPES = ((512, 1024, 512), (1024, 2048, 1024), (2048, 7168, 512))
OUTLIER_FRACTION = 1 / 512
CHANNEL_FACTOR_RANGE = (100.0, 1000.0)
MASSIVE_FACTOR = 1e5
SWEEP_FACTORS = (1.0, 1e3, 1e4, 3e4, 1e5, 1e6)
ACCEPTANCE_RATIO = 5.0


def _pick(count: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randperm(count, generator=generator)[: max(1, round(count * OUTLIER_FRACTION))]


def channel_outliers(M: int, K: int, factor_range: tuple[float, float], generator: torch.Generator) -> torch.Tensor:
    """x [M, K] ~ N(0, 1) with 1/512 of the channels scaled by log-uniform factors in every token."""
    x_MK = torch.randn(M, K, generator=generator)
    channels = _pick(K, generator)
    log_factor = torch.empty(len(channels)).uniform_(*map(math.log, factor_range), generator=generator)
    x_MK[:, channels] *= log_factor.exp()
    return x_MK


def massive_activations(M: int, K: int, factor: float, generator: torch.Generator) -> torch.Tensor:
    """x [M, K] ~ N(0, 1) with 1/512 of the tokens x 1/512 of the channels scaled by `factor`."""
    x_MK = torch.randn(M, K, generator=generator)
    tokens, channels = _pick(M, generator), _pick(K, generator)
    x_MK[tokens[:, None], channels[None, :]] *= factor
    return x_MK


def gemm_errors(x_MK: torch.Tensor, w_NK: torch.Tensor) -> dict[str, float]:
    """Frobenius and per-token relative errors of the per-tensor and tile FP8 GEMMs vs FP32."""
    ref_MN = x_MK @ w_NK.T
    x_tensor = quantize_tiles(x_MK, tuple(x_MK.shape), name="x")
    w_tensor = quantize_tiles(w_NK, tuple(w_NK.shape), name="w")
    outputs = {
        "per_tensor": x_tensor.dequantize() @ w_tensor.dequantize().T,
        "tile": blockwise_gemm(quantize_1x128(x_MK, name="x"), quantize_128x128(w_NK, name="w"), backend="emulate"),
    }
    row = {}
    for scheme, y_MN in outputs.items():
        row[f"rel_err_{scheme}"] = float((y_MN - ref_MN).norm() / ref_MN.norm())
        row[f"token_err_{scheme}"] = float(((y_MN - ref_MN).norm(dim=1) / ref_MN.norm(dim=1)).mean())
    row["ratio"] = row["rel_err_per_tensor"] / row["rel_err_tile"]
    row["token_ratio"] = row["token_err_per_tensor"] / row["token_err_tile"]
    return row


def measure(M: int, K: int, N: int, make_x, generator: torch.Generator) -> dict:
    x_MK = make_x(M, K, generator)
    w_NK = torch.randn(N, K, generator=generator) / K**0.5
    return {"M": M, "K": K, "N": N, **gemm_errors(x_MK, w_NK)}


def run(shapes=DEFAULT_SHAPES, sweep_factors=SWEEP_FACTORS, seed: int = 0) -> dict:
    """The benchmark's JSON object.

    keys: benchmark, outlier_models, channels and massive (one dict per shape: M, K, N,
    rel_err_per_tensor, rel_err_tile, ratio, token_err_per_tensor, token_err_tile,
    token_ratio), sweep (massive model at shapes[0], one dict per factor, plus
    outlier_factor), min_token_ratio (massive), acceptance_ratio, acceptance_5x.
    """
    generator = torch.Generator().manual_seed(seed)
    channels = [
        measure(M, K, N, lambda m, k, g: channel_outliers(m, k, CHANNEL_FACTOR_RANGE, g), generator)
        for M, K, N in shapes
    ]
    massive = [
        measure(M, K, N, lambda m, k, g: massive_activations(m, k, MASSIVE_FACTOR, g), generator) for M, K, N in shapes
    ]
    M, K, N = shapes[0]
    sweep = [
        {"outlier_factor": f, **measure(M, K, N, lambda m, k, g, f=f: massive_activations(m, k, f, g), generator)}
        for f in sweep_factors
    ]
    min_token_ratio = min(row["token_ratio"] for row in massive)
    return {
        "benchmark": "fp8-error",
        "outlier_models": {
            "channels": f"1/512 of channels scaled by log-uniform {CHANNEL_FACTOR_RANGE} in every token",
            "massive": f"1/512 of tokens x 1/512 of channels scaled by {MASSIVE_FACTOR:g}",
        },
        "channels": channels,
        "massive": massive,
        "sweep": sweep,
        "min_token_ratio": min_token_ratio,
        "acceptance_ratio": ACCEPTANCE_RATIO,
        "acceptance_5x": min_token_ratio >= ACCEPTANCE_RATIO,
    }


def format_table(result: dict) -> str:
    header = (f"{'model':>9} {'M':>5} {'K':>5} {'N':>5} {'factor':>9} | Frobenius: {'per-tensor':>10} {'tile':>9} "
              f"{'ratio':>6} | per-token: {'per-tensor':>10} {'tile':>9} {'ratio':>6}")
    lines = ["FP8 (E4M3) GEMM relative error vs FP32: per-tensor scaling vs 1x128/128x128 tiles", header]

    def line(model: str, row: dict, factor: str) -> str:
        return (
            f"{model:>9} {row['M']:>5} {row['K']:>5} {row['N']:>5} {factor:>9} | "
            f"{row['rel_err_per_tensor']:>21.3e} {row['rel_err_tile']:>9.3e} {row['ratio']:>6.2f} | "
            f"{row['token_err_per_tensor']:>21.3e} {row['token_err_tile']:>9.3e} {row['token_ratio']:>6.2f}"
        )

    lo, hi = CHANNEL_FACTOR_RANGE
    lines += [line("channels", row, f"{lo:g}-{hi:g}") for row in result["channels"]]
    lines += [line("massive", row, f"{MASSIVE_FACTOR:g}") for row in result["massive"]]
    lines.append("sweep of the massive-activation factor:")
    lines += [line("massive", row, f"{row['outlier_factor']:g}") for row in result["sweep"]]
    verdict = "holds" if result["acceptance_5x"] else "does NOT hold"
    lines.append(
        f"tile scaling >= {ACCEPTANCE_RATIO:g}x lower per-token error with massive activations on every shape: "
        f"{verdict} (min ratio {result['min_token_ratio']:.2f})"
    )
    return "\n".join(lines)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("fp8-error", help="FP8 GEMM error: per-tensor vs tile scaling, with outliers")
    parser.add_argument(
        "--shape", type=int, nargs=3, action="append", metavar=("M", "K", "N"),
        help="a GEMM shape (repeatable); default: " + ", ".join("x".join(map(str, s)) for s in DEFAULT_SHAPES),
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(main=main)


def main(args: argparse.Namespace) -> int:
    result = run(shapes=tuple(map(tuple, args.shape)) if args.shape else DEFAULT_SHAPES, seed=args.seed)
    print(format_table(result))
    print(json.dumps(result))
    return 0
