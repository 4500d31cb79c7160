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
dominated by the outlier rows, which both schemes round alike.

Three more comparisons (issue 16):
  outlier sweep   at shapes[0], the per-token error of tile vs per-tensor current scaling for
                  outlier magnitudes 1e1 .. 1e6 under three models: `channel` (1/512 of the
                  channels x factor in every token), `token` (1/512 of the tokens x factor in
                  every channel) and `massive` (above). Criterion: tile is never worse than
                  per-tensor by more than 1% (token_err_tile <= 1.01 x token_err_per_tensor);
                  the ratio at each magnitude is printed.
  gradients       real activation gradients: the `tiny-fp8` model (FP32) trains `grad_steps`
                  steps on the embedded corpus, and the output gradient dy [tokens, N] of every
                  decoder Linear (those FP8 would quantise) is captured in the last step's
                  backward. Each is quantised as E4M3 in 1x128 tiles (the report's choice for
                  every tensor; the tiles Dgrad reads) and as E5M2 with one per-tensor scale
                  (amax / 57344: the hybrid recipe's gradient format), plus E4M3 per-tensor for
                  context; the relative (Frobenius and per-token) error of the dequantised dy.
                  Reported: each tensor's ratio E5M2-per-tensor / E4M3-tile and their median.
  delayed scaling per-tensor *delayed* scaling as Transformer Engine's DelayedScaling does it
                  (scale = max of the amax history / 448, margin 0, the history holding the
                  previous steps' amax only; scale 1 before any history) against online 1x128 /
                  128x128 tile scaling and per-tensor current scaling, on a sequence of
                  `delayed_steps` activations whose scale drifts: channel-outlier activations
                  (fixed outlier channels, as in a trained model) times s_t with
                  log s_t = log s_(t-1) + N(DRIFT_MEAN, DRIFT_STD) per step, fresh data each step.
                  Histories of 16 steps (issue 16's figure) and 1024 (TE's default
                  `amax_history_len`). Values beyond the stale scale saturate at +-448.
                  Reported: mean and max over steps of the per-token GEMM error, the fraction of
                  saturated values, and step 1 (no history yet) apart.

The last line of output is one JSON object (see `run`); `acceptance_5x` says whether tile
scaling has at least 5x lower per-token error than per-tensor on every shape under the
massive-activation model, `outlier_sweep.tile_never_worse` the sweep's criterion.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

import torch

from megatron_dsv3.fp8 import blockwise_gemm, quantize_1x128, quantize_128x128, quantize_tiles
from megatron_dsv3.fp8.quant import E4M3_MAX

DEFAULT_SHAPES = ((512, 1024, 512), (1024, 2048, 1024), (2048, 7168, 512))
OUTLIER_FRACTION = 1 / 512
CHANNEL_FACTOR_RANGE = (100.0, 1000.0)
MASSIVE_FACTOR = 1e5
SWEEP_FACTORS = (1e1, 1e2, 1e3, 1e4, 1e5, 1e6)
SWEEP_MODELS = ("channel", "token", "massive")
SWEEP_TOLERANCE = 0.01  # tile may be worse than per-tensor by at most 1% (issue 16)
ACCEPTANCE_RATIO = 5.0
E5M2_MAX = 57344.0  # torch.float8_e5m2's largest finite value
GRAD_STEPS = 20  # training steps before the gradients are captured (in the last one)
CORPUS_CACHE = Path("runs/.corpus-cache")  # the compact loop's corpus cache for runs/<name>
DELAYED_STEPS = 100
DELAYED_HISTORIES = (16, 1024)  # issue 16's history; TE DelayedScaling's default amax_history_len
DRIFT_MEAN, DRIFT_STD = 0.01, 0.1  # per-step change of log(scale): +1% drift, 10% noise


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



# --- the outlier sweep


def token_outliers(M: int, K: int, factor: float, generator: torch.Generator) -> torch.Tensor:
    """x [M, K] ~ N(0, 1) with 1/512 of the tokens scaled by `factor` in every channel."""
    x_MK = torch.randn(M, K, generator=generator)
    x_MK[_pick(M, generator)] *= factor
    return x_MK


_SWEEP_MAKERS = {
    "channel": lambda m, k, g, f: channel_outliers(m, k, (f, f), g),
    "token": lambda m, k, g, f: token_outliers(m, k, f, g),
    "massive": lambda m, k, g, f: massive_activations(m, k, f, g),
}


def outlier_sweep(shape, factors, generator: torch.Generator, models=SWEEP_MODELS) -> dict:
    """Per-token error of tile vs per-tensor current scaling for each model and magnitude."""
    M, K, N = shape
    rows = [
        {"model": model, "outlier_factor": f,
         **measure(M, K, N, lambda m, k, g, f=f, make=_SWEEP_MAKERS[model]: make(m, k, g, f), generator)}
        for model in models for f in factors
    ]
    worst = max((row["token_err_tile"] / row["token_err_per_tensor"] for row in rows), default=None)
    return {
        "shape": list(shape),
        "rows": rows,
        "tolerance": SWEEP_TOLERANCE,
        "worst_tile_over_per_tensor": worst,
        "tile_never_worse": all(row["token_err_tile"] <= (1 + SWEEP_TOLERANCE) * row["token_err_per_tensor"] for row in rows),
    }


# --- gradients: E4M3 1x128 tiles vs per-tensor E5M2


def quantize_per_tensor(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x quantised to `dtype` (float8_e4m3fn or float8_e5m2) with one scale amax / max(dtype),
    dequantised back to FP32 (round to nearest even, as torch's cast)."""
    fmax = torch.finfo(dtype).max
    amax = x.abs().max()
    scale = amax / fmax if amax > 0 else torch.ones(())
    return (x / scale).clamp(-fmax, fmax).to(dtype).float() * scale


def relative_errors(approx: torch.Tensor, exact: torch.Tensor) -> tuple[float, float]:
    """(Frobenius relative error, mean per-row relative error over the rows that are not zero)."""
    rows = exact.norm(dim=1) > 0
    per_row = (approx - exact)[rows].norm(dim=1) / exact[rows].norm(dim=1)
    return float((approx - exact).norm() / exact.norm()), float(per_row.mean())


def gradient_errors(dy: torch.Tensor) -> dict:
    """The quantisation errors of one output gradient dy [tokens, N] in the three formats."""
    formats = {
        "e4m3_tile": quantize_1x128(dy, name="dy").dequantize(),
        "e5m2_tensor": quantize_per_tensor(dy, torch.float8_e5m2),
        "e4m3_tensor": quantize_per_tensor(dy, torch.float8_e4m3fn),
    }
    row = {"shape": list(dy.shape), "amax": float(dy.abs().max())}
    for label, approx in formats.items():
        row[f"rel_err_{label}"], row[f"token_err_{label}"] = relative_errors(approx, dy)
    row["ratio"] = row["rel_err_e5m2_tensor"] / row["rel_err_e4m3_tile"]
    row["token_ratio"] = row["token_err_e5m2_tensor"] / row["token_err_e4m3_tile"]
    return row


def capture_gradients(steps: int = GRAD_STEPS, seed: int = 0, micro_batch_size: int = 4,
                      corpus_cache: Path = CORPUS_CACHE) -> dict[str, torch.Tensor]:
    """dy [tokens, N] of every decoder Linear FP8 would quantise, from the backward of the last of
    `steps` training steps of `tiny-fp8` in FP32 (AdamW as the compact loop's, linear warm-up)."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    from megatron_dsv3 import cpu
    from megatron_dsv3.config import preset
    from megatron_dsv3.distributed import init_distributed, seed_everything
    from megatron_dsv3.fp8.linear import HIGH_PRECISION_LINEARS
    from megatron_dsv3.specs import gpt_model
    from megatron_dsv3.training.data import build_datasets
    from megatron_dsv3.training.forward_step import forward_step

    config = preset("tiny-fp8", fp8_blockwise=None)
    init_distributed()
    cpu.enable(config)
    seed_everything(seed)
    model = gpt_model(config)
    train_set, _ = build_datasets(corpus_cache, config.seq_length, steps * micro_batch_size, micro_batch_size, seed, 4_000_000)
    batches = iter(torch.utils.data.DataLoader(train_set, batch_size=micro_batch_size))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)

    captured: dict[str, list[torch.Tensor]] = {}
    capturing = False

    def hook(name):
        def on_forward(module, inputs, output):
            if capturing:
                out = output[0] if isinstance(output, tuple) else output
                out.register_hook(lambda g: captured.setdefault(name, []).append(g.detach().reshape(-1, g.shape[-1]).float()))
        return on_forward

    handles = [
        module.register_forward_hook(hook(name)) for name, module in model.named_modules()
        if isinstance(module, (ColumnParallelLinear, RowParallelLinear)) and name.rsplit(".", 1)[-1] not in HIGH_PRECISION_LINEARS
    ]
    try:
        for step in range(1, steps + 1):
            capturing = step == steps
            for group in optimizer.param_groups:
                group["lr"] = 3e-3 * min(1.0, step / max(1, steps // 2))
            output, loss = forward_step(batches, model)
            loss_sum, num_tokens, _ = loss(output)
            (loss_sum / num_tokens).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    finally:
        for handle in handles:
            handle.remove()
    return {name: torch.cat(grads) for name, grads in captured.items()}


def gradient_comparison(steps: int = GRAD_STEPS, seed: int = 0) -> dict:
    """The gradients part of the JSON: every captured tensor's errors and the ratios' summary."""
    gradients = capture_gradients(steps, seed)
    tensors = [{"name": name, **gradient_errors(dy)} for name, dy in sorted(gradients.items()) if dy.numel() and dy.abs().max() > 0]
    ratios = [t["ratio"] for t in tensors]
    return {
        "source": f"tiny-fp8 (FP32), output gradients of the decoder Linears in the backward of training step {steps}",
        "steps": steps,
        "tensors": tensors,
        "ratio_median": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "token_ratio_median": statistics.median(t["token_ratio"] for t in tensors),
    }


# --- delayed (amax-history) per-tensor scaling vs online tile scaling


def delayed_scaling_errors(activations, w_NK: torch.Tensor, histories=DELAYED_HISTORIES) -> tuple[dict, dict]:
    """Per step of `activations` (x [M, K] tensors, in order): the per-token GEMM error of x W^T
    for tile, per-tensor current and per-tensor delayed scaling with each amax history length,
    and the fraction of x that the delayed scales saturate. (per_step, saturated) dicts of lists."""
    w_tensor = quantize_tiles(w_NK, tuple(w_NK.shape), name="w").dequantize()
    w_blocks = quantize_128x128(w_NK, name="w")
    amax_history: list[float] = []
    per_step = {"tile": [], "per_tensor_current": [], **{f"delayed_{h}": [] for h in histories}}
    saturated = {f"delayed_{h}": [] for h in histories}
    for x_MK in activations:
        ref_MN = x_MK @ w_NK.T
        outputs = {
            "tile": blockwise_gemm(quantize_1x128(x_MK, name="x"), w_blocks, backend="emulate"),
            "per_tensor_current": quantize_tiles(x_MK, tuple(x_MK.shape), name="x").dequantize() @ w_tensor.T,
        }
        for h in histories:
            window = amax_history[-h:]
            scale = max(window) / E4M3_MAX if window else 1.0  # TE: scale 1 until an amax is recorded
            codes = (x_MK / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
            outputs[f"delayed_{h}"] = (codes.float() * scale) @ w_tensor.T
            saturated[f"delayed_{h}"].append(float((x_MK.abs() / scale > E4M3_MAX).float().mean()))
        amax_history.append(float(x_MK.abs().max()))
        for label, y_MN in outputs.items():
            per_step[label].append(relative_errors(y_MN, ref_MN)[1])
    return per_step, saturated


def drifting_activations(shape, steps: int, generator: torch.Generator, drift=(DRIFT_MEAN, DRIFT_STD)):
    """The module note's sequence: channel-outlier activations (fixed outlier channels) times s_t,
    log s_t a random walk with drift; yields (x [M, K], s_t)."""
    M, K, _ = shape
    channels = _pick(K, generator)  # the model's outlier channels, fixed over the steps
    channel_factor = torch.empty(len(channels)).uniform_(*map(math.log, CHANNEL_FACTOR_RANGE), generator=generator).exp()
    log_scale = 0.0
    for _ in range(steps):
        log_scale += drift[0] + drift[1] * float(torch.randn((), generator=generator))
        x_MK = torch.randn(M, K, generator=generator)
        x_MK[:, channels] *= channel_factor
        yield x_MK * math.exp(log_scale), math.exp(log_scale)


def delayed_scaling(shape, steps: int = DELAYED_STEPS, histories=DELAYED_HISTORIES, generator: torch.Generator | None = None,
                    drift=(DRIFT_MEAN, DRIFT_STD)) -> dict:
    """The module note's delayed-scaling comparison on the drifting sequence: per scheme, the
    per-token GEMM error's mean and max over steps 2.. and step 1 apart, and the saturation."""
    generator = generator or torch.Generator().manual_seed(0)
    M, K, N = shape
    w_NK = torch.randn(N, K, generator=generator) / K**0.5
    scales: list[float] = []

    def activations():
        for x_MK, scale in drifting_activations(shape, steps, generator, drift):
            scales.append(scale)
            yield x_MK

    per_step, saturated = delayed_scaling_errors(activations(), w_NK, histories)

    def summary(errs: list[float]) -> dict:
        later = errs[1:] or errs
        return {"token_err_step1": errs[0], "token_err_mean": statistics.fmean(later), "token_err_max": max(later)}

    schemes = {label: summary(errs) for label, errs in per_step.items()}
    for label, fractions in saturated.items():
        later = fractions[1:] or fractions
        schemes[label].update(saturated_step1=fractions[0], saturated_mean=statistics.fmean(later), saturated_max=max(later),
                              steps_saturated=sum(f > 0 for f in later))
    for label in schemes:
        schemes[label]["mean_over_tile"] = schemes[label]["token_err_mean"] / schemes["tile"]["token_err_mean"]
    return {
        "shape": list(shape),
        "steps": steps,
        "drift": {"log_scale_step_mean": drift[0], "log_scale_step_std": drift[1], "final_scale": scales[-1],
                  "outliers": f"channels x log-uniform {CHANNEL_FACTOR_RANGE}, fixed"},
        "schemes": schemes,
        "note": "means and maxima over steps 2.., step 1 (no amax history: scale 1) apart",
    }


def run(shapes=DEFAULT_SHAPES, sweep_factors=SWEEP_FACTORS, seed: int = 0, *, grad_steps: int | None = GRAD_STEPS,
        delayed_steps: int | None = DELAYED_STEPS) -> dict:
    """The benchmark's JSON object.

    keys: benchmark, outlier_models, channels and massive (one dict per shape: M, K, N,
    rel_err_per_tensor, rel_err_tile, ratio, token_err_per_tensor, token_err_tile,
    token_ratio), min_token_ratio (massive), acceptance_ratio, acceptance_5x; outlier_sweep
    (`outlier_sweep`), gradients (`gradient_comparison`; None with grad_steps=None),
    delayed_scaling (`delayed_scaling` at shapes[0]; None with delayed_steps=None).
    """
    generator = torch.Generator().manual_seed(seed)
    channels = [
        measure(M, K, N, lambda m, k, g: channel_outliers(m, k, CHANNEL_FACTOR_RANGE, g), generator)
        for M, K, N in shapes
    ]
    massive = [
        measure(M, K, N, lambda m, k, g: massive_activations(m, k, MASSIVE_FACTOR, g), generator) for M, K, N in shapes
    ]
    min_token_ratio = min(row["token_ratio"] for row in massive)
    return {
        "benchmark": "fp8-error",
        "outlier_models": {
            "channels": f"1/512 of channels scaled by log-uniform {CHANNEL_FACTOR_RANGE} in every token",
            "massive": f"1/512 of tokens x 1/512 of channels scaled by {MASSIVE_FACTOR:g}",
            "sweep": "channel: 1/512 of channels x factor in every token; token: 1/512 of tokens x factor in every "
                     "channel; massive: 1/512 of tokens x 1/512 of channels x factor",
        },
        "channels": channels,
        "massive": massive,
        "min_token_ratio": min_token_ratio,
        "acceptance_ratio": ACCEPTANCE_RATIO,
        "acceptance_5x": min_token_ratio >= ACCEPTANCE_RATIO,
        "outlier_sweep": outlier_sweep(shapes[0], sweep_factors, generator),
        "gradients": gradient_comparison(grad_steps, seed) if grad_steps else None,
        "delayed_scaling": delayed_scaling(shapes[0], delayed_steps, generator=generator) if delayed_steps else None,
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
    verdict = "holds" if result["acceptance_5x"] else "does NOT hold"
    lines.append(
        f"tile scaling >= {ACCEPTANCE_RATIO:g}x lower per-token error with massive activations on every shape: "
        f"{verdict} (min ratio {result['min_token_ratio']:.2f})"
    )

    sweep = result["outlier_sweep"]
    lines.append(f"outlier sweep at {'x'.join(map(str, sweep['shape']))} (ratio = per-tensor / tile per-token error):")
    lines += [line(row["model"], row, f"{row['outlier_factor']:g}") for row in sweep["rows"]]
    if sweep["rows"]:
        verdict = "holds" if sweep["tile_never_worse"] else "does NOT hold"
        lines.append(f"tile never worse than per-tensor by more than {100 * sweep['tolerance']:g}% at any magnitude: {verdict} "
                     f"(worst tile / per-tensor = {sweep['worst_tile_over_per_tensor']:.4f})")

    grads = result.get("gradients")
    if grads:
        lines.append(f"gradients ({grads['source']}): relative error of the quantised dy")
        lines.append(f"{'tensor':>48} {'tokens x N':>11} | {'E4M3 1x128':>10} {'E5M2 tensor':>11} {'E4M3 tensor':>11} "
                     f"{'E5M2/E4M3':>9} | per-token E5M2/E4M3")
        for t in grads["tensors"]:
            lines.append(f"{t['name'][-48:]:>48} {'x'.join(map(str, t['shape'])):>11} | {t['rel_err_e4m3_tile']:>10.3e} "
                         f"{t['rel_err_e5m2_tensor']:>11.3e} {t['rel_err_e4m3_tensor']:>11.3e} {t['ratio']:>9.2f} | "
                         f"{t['token_ratio']:.2f}")
        lines.append(f"E5M2 per-tensor / E4M3 1x128 error ratio over {len(grads['tensors'])} gradients: median "
                     f"{grads['ratio_median']:.2f} (min {grads['ratio_min']:.2f}, max {grads['ratio_max']:.2f}); "
                     f"per-token median {grads['token_ratio_median']:.2f}")

    delayed = result.get("delayed_scaling")
    if delayed:
        d = delayed["drift"]
        lines.append(f"delayed vs online scaling, {delayed['steps']} steps at {'x'.join(map(str, delayed['shape']))}, "
                     f"log-scale step N({d['log_scale_step_mean']:g}, {d['log_scale_step_std']:g}) "
                     f"(final scale {d['final_scale']:.3g}); per-token GEMM error, steps 2..:")
        lines.append(f"{'scheme':>20} | {'mean':>9} {'max':>9} {'vs tile':>7} | {'saturated mean':>14} {'max':>9} "
                     f"{'steps':>5} | {'step 1 err':>10} {'saturated':>9}")
        for label, sch in delayed["schemes"].items():
            sat = (f"{sch['saturated_mean']:>14.2e} {sch['saturated_max']:>9.2e} {sch['steps_saturated']:>5}"
                   if "saturated_mean" in sch else f"{'-':>14} {'-':>9} {'-':>5}")
            vs_tile = sch["mean_over_tile"]
            step1_sat = f"{sch['saturated_step1']:>9.2e}" if "saturated_step1" in sch else f"{'-':>9}"
            lines.append(f"{label:>20} | {sch['token_err_mean']:>9.3e} {sch['token_err_max']:>9.3e} {vs_tile:>7.2f} | "
                         f"{sat} | {sch['token_err_step1']:>10.3e} {step1_sat}")
    return "\n".join(lines)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "fp8-error", help="FP8 error: per-tensor vs tile scaling with outliers, gradient formats, delayed scaling")
    parser.add_argument(
        "--shape", type=int, nargs=3, action="append", metavar=("M", "K", "N"),
        help="a GEMM shape (repeatable); default: " + ", ".join("x".join(map(str, s)) for s in DEFAULT_SHAPES),
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--grad-steps", type=int, default=GRAD_STEPS,
                        help="training steps of tiny-fp8 before the gradients are captured (0: skip the gradient part)")
    parser.add_argument("--delayed-steps", type=int, default=DELAYED_STEPS,
                        help="steps of the drifting activation sequence (0: skip the delayed-scaling part)")
    parser.set_defaults(main=main)


def main(args: argparse.Namespace) -> int:
    result = run(shapes=tuple(map(tuple, args.shape)) if args.shape else DEFAULT_SHAPES, seed=args.seed,
                 grad_steps=args.grad_steps or None, delayed_steps=args.delayed_steps or None)
    print(format_table(result))
    print(json.dumps(result))
    return 0
