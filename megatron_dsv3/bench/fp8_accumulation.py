"""`python -m megatron_dsv3.bench fp8-accumulation`: a 14-bit accumulator, with and without FP32
promotion every N_C = 128 inner elements (report §3.3, "Increasing accumulation precision").

The report: the FP8 GEMM of H800 tensor cores keeps about 14 bits of the accumulator; "for
two random matrices with K = 4096 ... a maximum relative error of nearly 2%" without
promotion. Its fix, which `fp8/gemm.py` implements: every N_C = 128 inner elements the partial
sum is copied to an FP32 register (where the scales are applied) and added there.

The emulation (float64, exact apart from the rounding modelled):
  inputs       A [M, K], B [N, K] ~ N(0, 1), cast to E4M3 (per-tensor scale 1: every value is
               in range); their products are exact (4-bit x 4-bit significands).
  accumulator  a float with ACC_BITS = 14 significant bits (1 implicit + 13 stored: the "e8m13"
               accumulator measured on Hopper's FP8 MMA) and FP32's exponent range; after each
               product is added, the sum is rounded to 14 bits. Two rounding modes:
                 truncate  toward zero (what NVIDIA tensor cores do when they align and add;
                           the hardware model, reported first),
                 nearest   to nearest, ties to even (an unbiased accumulator, for contrast; ties
                           are frequent, as products of E4M3 values have at most 8 bits).
               The hardware adds a few products per step before the accumulator rounds, so one
               rounding per product is the pessimistic end of this model.
  promotion    without: one 14-bit accumulator over all K. With: a fresh 14-bit accumulator
               per 128-slice, its sum added to an FP32 accumulator (FP32 rounding).
  reference    the float64 GEMM of the same E4M3 inputs (so only the accumulation differs).

Errors, per output element y against the float64 value r:
  err/rms   |y - r| / rms(r): the error in units of the output's scale. Its max and mean are
            the figures printed next to the report's (a maximum relative error must not divide
            by outputs that cancel to almost zero);
  err/|r|   |y - r| / |r| element by element: its median and max (the max comes from outputs
            near zero, unbounded by the accumulator);
  norm      ||y - r||_F / ||r||_F.
Nothing here is tuned to the report's figure; the JSON says where the measurement disagrees.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from megatron_dsv3.config import FP8_TILE as N_C

ACC_BITS = 14  # report §3.3: "about 14 bits"
DEFAULT_KS = (1024, 4096, 7168, 16384)
DEFAULT_M = DEFAULT_N = 128
ROUNDINGS = ("truncate", "nearest")
PAPER_K = 4096
PAPER_MAX_REL_ERR = 0.02  # report §3.3: "a maximum relative error of nearly 2%" at K = 4096, no promotion
AGREEMENT_FACTOR = 2.0  # "nearly 2%" is an order of magnitude: a measurement within 2x of it agrees

_MANTISSA_BITS = 52  # float64's stored significand


def round_significand(x: torch.Tensor, bits: int, mode: str) -> torch.Tensor:
    """float64 `x` rounded to `bits` significant bits (the implicit one included), toward zero
    (`truncate`) or to nearest with ties to even (`nearest`, IEEE's default). Exact: it clears the low
    bits of the IEEE-754 pattern, whose lower 63 bits are the magnitude (sign-magnitude), so a
    carry of `nearest` into the exponent is the next binade. Zero stays zero."""
    if x.dtype != torch.float64:
        raise ValueError(f"round_significand works on float64, got {x.dtype}")
    if not 1 <= bits <= _MANTISSA_BITS + 1:
        raise ValueError(f"bits={bits}: needs 1..{_MANTISSA_BITS + 1}")
    if mode not in ROUNDINGS:
        raise ValueError(f"mode={mode!r} is not one of {ROUNDINGS}")
    drop = _MANTISSA_BITS - (bits - 1)
    if drop == 0:
        return x.clone()
    pattern = x.view(torch.int64)
    if mode == "nearest":  # add just under half an ulp, plus one if the kept last bit is odd: ties to even
        pattern = pattern + ((1 << (drop - 1)) - 1) + ((pattern >> drop) & 1)
    return (pattern & ~((1 << drop) - 1)).view(torch.float64)


def accumulate(a_MK: torch.Tensor, b_NK: torch.Tensor, *, bits: int = ACC_BITS, mode: str = "truncate",
               promote_every: int | None = N_C) -> torch.Tensor:
    """a @ b.T [M, N] summed one product at a time in a `bits`-bit accumulator; with
    `promote_every`, each slice's partial sum is added to an FP32 accumulator (module note).
    float64 in, float64 out (the FP32 result, exactly)."""
    (M, K), N = a_MK.shape, b_NK.shape[0]
    a_KM, b_KN = a_MK.double().T.contiguous(), b_NK.double().T.contiguous()
    slice_len = promote_every or K
    fp32_MN = torch.zeros(M, N, dtype=torch.float32)
    for k0 in range(0, K, slice_len):
        acc_MN = torch.zeros(M, N, dtype=torch.float64)
        for k in range(k0, min(k0 + slice_len, K)):
            acc_MN = round_significand(acc_MN + torch.outer(a_KM[k], b_KN[k]), bits, mode)
        if promote_every is None:
            return acc_MN
        fp32_MN = fp32_MN + acc_MN.float()  # exact conversion (14 bits), FP32-rounded addition
    return fp32_MN.double()


def errors(y: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """The module note's errors of `y` against the float64 reference `ref`."""
    err = (y - ref).abs()
    scale = ref.pow(2).mean().sqrt()
    elementwise = err / ref.abs()
    return {
        "max_err_rms": float(err.max() / scale),
        "mean_err_rms": float(err.mean() / scale),
        "median_rel_err": float(elementwise.median()),
        "max_rel_err": float(elementwise.max()),
        "norm_rel_err": float(err.norm() / ref.norm()),
    }


def e4m3_inputs(M: int, N: int, K: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A [M, K] and B [N, K] ~ N(0, 1) rounded to E4M3 values, as float64."""
    a = torch.randn(M, K, generator=generator).to(torch.float8_e4m3fn).double()
    b = torch.randn(N, K, generator=generator).to(torch.float8_e4m3fn).double()
    return a, b


def run(ks=DEFAULT_KS, M: int = DEFAULT_M, N: int = DEFAULT_N, seed: int = 0, bits: int = ACC_BITS) -> dict:
    """The benchmark's JSON object: one row per (K, rounding, promotion) with the errors."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for K in ks:
        a, b = e4m3_inputs(M, N, K, generator)
        ref = a @ b.T  # float64: the products are exact, the sum's rounding ~1e-16
        for mode in ROUNDINGS:
            for promote in (None, N_C):
                start = time.perf_counter()
                y = accumulate(a, b, bits=bits, mode=mode, promote_every=promote)
                rows.append({"K": K, "rounding": mode, "promotion": promote, **errors(y, ref),
                             "seconds": round(time.perf_counter() - start, 2)})
    paper_row = next((r for r in rows if r["K"] == PAPER_K and r["rounding"] == "truncate" and r["promotion"] is None), None)
    return {
        "benchmark": "fp8-accumulation",
        "M": M, "N": N, "accumulator_bits": bits, "n_c": N_C, "seed": seed,
        "rows": rows,
        "paper": {"K": PAPER_K, "max_rel_err": PAPER_MAX_REL_ERR, "promotion": None},
        "measured_at_paper_k": paper_row and paper_row["max_err_rms"],
        "agrees_with_paper": paper_row is not None
        and PAPER_MAX_REL_ERR / AGREEMENT_FACTOR <= paper_row["max_err_rms"] <= PAPER_MAX_REL_ERR * AGREEMENT_FACTOR,
        "promotion_lowers_every_max": all(
            _row(rows, K, mode, N_C)["max_err_rms"] < _row(rows, K, mode, None)["max_err_rms"] for K in ks for mode in ROUNDINGS
        ),
    }


def _row(rows, K, mode, promotion):
    return next(r for r in rows if r["K"] == K and r["rounding"] == mode and r["promotion"] == promotion)


def format_table(result: dict) -> str:
    lines = [
        f"FP8 GEMM accumulation: {result['accumulator_bits']}-bit accumulator vs float64, E4M3 inputs "
        f"A[{result['M']}, K] B[{result['N']}, K]; promotion to FP32 every N_C = {result['n_c']}",
        f"{'K':>6} {'rounding':>9} {'promotion':>10} | {'max err/rms':>11} {'mean err/rms':>12} | "
        f"{'median err/|r|':>14} {'max err/|r|':>11} | {'norm':>9}",
    ]
    for r in result["rows"]:
        promo = f"every {r['promotion']}" if r["promotion"] else "none"
        lines.append(
            f"{r['K']:>6} {r['rounding']:>9} {promo:>10} | {r['max_err_rms']:>11.3e} {r['mean_err_rms']:>12.3e} | "
            f"{r['median_rel_err']:>14.3e} {r['max_rel_err']:>11.3e} | {r['norm_rel_err']:>9.3e}"
        )
    measured = result["measured_at_paper_k"]
    if measured is not None:
        paper = result["paper"]["max_rel_err"]
        agrees = paper / AGREEMENT_FACTOR <= measured <= paper * AGREEMENT_FACTOR
        verdict = f"agrees (within {AGREEMENT_FACTOR:g}x)" if agrees else f"DISAGREES (not within {AGREEMENT_FACTOR:g}x)"
        lines.append(
            f"report §3.3: max relative error ~{100 * paper:g}% at K = {PAPER_K} without promotion; measured "
            f"(truncating accumulator, max err/rms) {100 * measured:.2f}%: {verdict}"
        )
    lines.append("FP32 promotion every N_C lowers the max error at every K and rounding: "
                 + ("yes" if result["promotion_lowers_every_max"] else "NO"))
    return "\n".join(lines)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "fp8-accumulation", help="a 14-bit FP8 accumulator with and without FP32 promotion every 128, against float64"
    )
    parser.add_argument("--k", type=int, nargs="+", default=list(DEFAULT_KS), help="inner dimensions")
    parser.add_argument("--m", type=int, default=DEFAULT_M, help="rows of A (outputs: M x N)")
    parser.add_argument("--n", type=int, default=DEFAULT_N, help="rows of B")
    parser.add_argument("--bits", type=int, default=ACC_BITS, help="significant bits of the accumulator")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(main=main)


def main(args: argparse.Namespace) -> int:
    result = run(ks=tuple(args.k), M=args.m, N=args.n, seed=args.seed, bits=args.bits)
    print(format_table(result))
    print(json.dumps(result))
    return 0
