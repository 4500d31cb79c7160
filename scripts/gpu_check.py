"""`make gpu-check` (python scripts/gpu_check.py): every CUDA test and the GPU benchmarks in one
go, then one summary table and one JSON line.

Parts, each in a process of its own, with a time limit, under one budget (default 450 s, so
the whole run stays within 8 minutes including start-up):
  cuda-tests       python -m pytest tests/gpu (scaled_mm vs emulate, TE weight-gradient split,
                   this script's own CPU path); without CUDA the CPU stand-ins run and the rest
                   skip, each with its reason.
  scaled-mm        `scaled_mm` vs `emulate` on the same quantised operands (x 1x128, W 128x128) at
                   DeepSeek-V3 shapes: relative difference (pass: < 1e-4, the tests' tolerance).
  gemm-tflops      FP8 blockwise GEMM (`blockwise_gemm(backend="scaled_mm")`: its scale re-layout
                   included, the quantisation not) vs BF16 torch.matmul,
                   TFLOP/s = 2 M N K / time (median of CUDA-event timings), at M x N x K =
                   4096 x 7168 x 2048 (an expert's down projection over 4096 tokens), 4096 x 2112 x
                   7168 (MLA's fused down projection: 1536 + 512 + 64), and the grouped experts
                   (8 local experts x 512 tokens each, up 4096 x 7168 and down 7168 x 2048, as a loop).
  te-fp8-model     the `te`-spec tiny-fp8 model, forward and backward with TE's Float8BlockScaling
                   (fp8_blockwise="te") against the same model and weights without FP8: losses,
                   finite gradients, the recipe Megatron builds from the config for TE.
  dualpipev-nccl   the compact loop with DualPipeV on NCCL over every GPU (P = GPU count) against
                   one process without pipelining, same seed and data: per-step LM loss
                   (pass: step-1 loss within 1e-4 relative).
Parts that need what is not there (CUDA, Hopper, TE, time) are SKIP with the reason.

Dependencies. torch comes with the machine. What else the package needs (megatron-core,
matplotlib, tqdm, safetensors, psutil, pytest) is installed, when missing, from the wheels
under `wheels/` (or --wheels) with `pip install --no-index` into the machine's Python (a
fresh machine: with --break-system-packages or --user where pip refuses otherwise);
`make gpu-wheels` downloads them on a machine with internet. Transformer Engine likewise, if
`wheels/` holds a transformer_engine wheel (TE's PyTorch extension is built against the local
torch and CUDA: `pip wheel --no-deps 'transformer_engine[pytorch]' -w wheels/` on a machine
like the GPU one); otherwise the TE parts skip, saying so.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PARTS = ("cuda-tests", "scaled-mm", "gemm-tflops", "te-fp8-model", "dualpipev-nccl")
BUDGET_S = 450
PART_LIMIT_S = {"cuda-tests": 240, "scaled-mm": 120, "gemm-tflops": 120, "te-fp8-model": 150, "dualpipev-nccl": 240}
REQUIRED = {"megatron.core": "megatron-core>=0.19.2,<0.20", "matplotlib": "matplotlib", "tqdm": "tqdm",
            "safetensors": "safetensors", "psutil": "psutil", "pytest": "pytest"}
SHAPES = ((4096, 7168, 2048), (4096, 2112, 7168))  # M x N x K
EXPERTS, EXPERT_TOKENS = 8, 512
EXPERT_GEMMS = ((4096, 7168), (7168, 2048))  # (N, K): up (gate + up, 2 x 2048) and down projections
SCALED_MM_TOL = 1e-4
DUALPIPEV_TOL = 1e-4


def tflops(M: int, N: int, K: int, seconds: float) -> float:
    return 2 * M * N * K / seconds / 1e12


# --- the orchestrator (standard library only: it runs before the dependencies are checked)


def _run(cmd: list[str], timeout: float, env=None) -> tuple[int, str]:
    try:
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=max(1, timeout), env=env)
        return done.returncode, done.stdout + done.stderr
    except OSError as e:  # no such interpreter, ...
        return 127, f"{cmd[0]}: {e}"
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        return 124, out + f"\n(timed out after {timeout:.0f} s)"


def probe(python: str) -> dict:
    """torch, CUDA and TE as `python` sees them."""
    code = ("import json, importlib.util, sys\n"
            "out = {'python': sys.version.split()[0]}\n"
            "try:\n import torch\nexcept Exception as e:\n print(json.dumps({**out, 'torch': None, 'error': repr(e)})); raise SystemExit\n"
            "cuda = torch.cuda.is_available()\n"
            "out.update(torch=torch.__version__, cuda=cuda, gpus=torch.cuda.device_count() if cuda else 0,\n"
            " names=[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],\n"
            " capability=list(torch.cuda.get_device_capability(0)) if cuda else None,\n"
            " te=importlib.util.find_spec('transformer_engine') is not None)\n"
            "print(json.dumps(out))\n")
    rc, out = _run([python, "-c", code], 120)
    try:
        return json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"torch": None, "error": out[-500:]}


def _missing_modules(python: str) -> list[str]:
    code = ("import importlib.util, json\n"
            "def present(m):\n"
            "    try:\n        return importlib.util.find_spec(m) is not None\n"
            "    except ImportError:\n        return False\n"
            "print(json.dumps([m for m in %r if not present(m)]))\n") % list(REQUIRED)
    rc, out = _run([python, "-c", code], 60)
    try:
        return json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return list(REQUIRED)


def pip_install_offline(python: str, wheels: Path, requirements: list[str]) -> tuple[bool, str]:
    """pip install from `wheels` only, into `python`'s environment (the GPU machine is a fresh one);
    if pip refuses an externally managed Python, again with --break-system-packages, then --user."""
    base = [python, "-m", "pip", "install", "--no-index", "--find-links", str(wheels), *requirements]
    out = ""
    for extra in ([], ["--break-system-packages"], ["--user"]):
        rc, out = _run(base + extra, 300)
        if rc == 0:
            return True, f"ok ({' '.join(extra)})" if extra else "ok"
    return False, (out.strip().splitlines() or ["?"])[-1][:300]


def ensure_dependencies(python: str, wheels: Path, log: list[str]) -> list[str]:
    """Install the missing requirements from `wheels` (no index); the ones still missing."""
    absent = _missing_modules(python)
    if absent and wheels.is_dir():
        ok, detail = pip_install_offline(python, wheels, [REQUIRED[m] for m in absent])
        log.append(f"pip install --no-index from {wheels}: {detail if ok else 'failed: ' + detail}")
        absent = _missing_modules(python)
    elif absent:
        log.append(f"missing {absent} and no {wheels}/ to install them from (make gpu-wheels on a machine with internet)")
    return absent


def ensure_te(python: str, wheels: Path, env_info: dict, log: list[str]) -> str | None:
    """None when Transformer Engine imports, else why the TE parts skip."""
    if env_info.get("te"):
        return None
    found = sorted(glob.glob(str(wheels / "transformer_engine*.whl")))
    if not found:
        return (f"Transformer Engine is not installed and {wheels}/ holds no transformer_engine wheel (its PyTorch "
                "extension is built against the local torch and CUDA: `pip wheel --no-deps 'transformer_engine[pytorch]' "
                f"-w {wheels}/` on a machine like this one)")
    ok, detail = pip_install_offline(python, wheels, found)
    log.append(f"pip install {len(found)} TE wheel(s) from {wheels}: {'ok' if ok else 'failed'}")
    if not ok:
        return "installing Transformer Engine from wheels failed: " + detail
    if not probe(python).get("te"):
        return "Transformer Engine installed from wheels but does not import"
    return None


def _pytest_summary(out: str) -> str:
    lines = [line for line in out.strip().splitlines() if line.strip()]
    tail = next((line.strip("= ") for line in reversed(lines) if " passed" in line or " failed" in line
                 or " skipped" in line or " error" in line), lines[-1] if lines else "no output")
    skips = sorted({line.split("] ", 1)[-1].split(": ", 1)[-1].strip() for line in lines if line.startswith("SKIPPED")})
    return tail + (f"; skip reasons: {' | '.join(skips)}" if skips else "")


def run_parts(args, env_info: dict, te_reason: str | None, missing: list[str], log: list[str]) -> list[dict]:
    deadline = time.monotonic() + args.budget
    cuda, hopper = bool(env_info.get("cuda")), (env_info.get("capability") or [0])[0] == 9
    results = []
    for part in args.parts:
        remaining = deadline - time.monotonic()
        skip = None
        if missing and part != "cuda-tests":
            skip = f"missing dependencies {missing}"
        elif missing:
            skip = f"pytest or the package's dependencies are missing: {missing}"
        elif part in ("scaled-mm", "gemm-tflops", "te-fp8-model", "dualpipev-nccl") and not cuda:
            skip = "no CUDA device"
        elif part in ("scaled-mm", "gemm-tflops") and not hopper:
            skip = f"scaled_mm's 1x128/128x128 kernels need sm90 (Hopper); this GPU is sm{''.join(map(str, env_info.get('capability') or []))}"
        elif part == "te-fp8-model" and te_reason:
            skip = te_reason
        elif remaining < 20:
            skip = f"out of time ({args.budget} s budget)"
        if skip:
            results.append({"part": part, "status": "SKIP", "seconds": 0.0, "summary": skip})
            continue
        limit = min(PART_LIMIT_S[part], remaining)
        start = time.monotonic()
        if part == "cuda-tests":
            cmd = [args.python, "-m", "pytest", "tests/gpu", "-q", "-rs", "-p", "no:cacheprovider",
                   "--ignore=tests/gpu/test_gpu_check.py"]
            rc, out = _run(cmd, limit)
            status = "PASS" if rc == 0 else ("FAIL" if rc != 124 else "TIMEOUT")
            result = {"status": status, "summary": _pytest_summary(out)}
            if rc not in (0,):
                result["output_tail"] = out[-3000:]
        else:
            rc, out = _run([args.python, str(Path(__file__).resolve()), "--part", part, "--gpus", str(env_info.get("gpus", 0))],
                           limit, env={**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"})
            result = _part_result(rc, out)
        results.append({"part": part, "seconds": round(time.monotonic() - start, 1), **result})
        if args.verbose or result["status"] not in ("PASS", "SKIP"):
            print(f"--- {part}: {result['status']}\n{result.get('output_tail', '')[-1500:]}", flush=True)
    return results


def _part_result(rc: int, out: str) -> dict:
    for line in reversed(out.strip().splitlines()):
        if line.startswith("{") and '"status"' in line:
            try:
                result = json.loads(line)
                if result["status"] not in ("PASS", "SKIP"):
                    result["output_tail"] = out[-3000:]
                return result
            except ValueError:
                break
    return {"status": "TIMEOUT" if rc == 124 else "FAIL", "summary": f"exit {rc}, no result line",
            "output_tail": out[-3000:]}


def format_table(env_info: dict, log: list[str], results: list[dict], elapsed: float) -> str:
    gpus = f"{env_info.get('gpus', 0)} x {env_info['names'][0]}" if env_info.get("names") else "no GPU"
    lines = [f"gpu-check: python {env_info.get('python')}, torch {env_info.get('torch')}, {gpus}, "
             f"Transformer Engine {'present' if env_info.get('te') else 'absent'}"]
    lines += [f"  {entry}" for entry in log]
    width = max(len(r["part"]) for r in results) if results else 10
    lines.append(f"{'part':<{width}}  {'status':<7} {'seconds':>7}  summary")
    for r in results:
        lines.append(f"{r['part']:<{width}}  {r['status']:<7} {r['seconds']:>7.1f}  {r['summary']}")
    failed = [r["part"] for r in results if r["status"] in ("FAIL", "TIMEOUT")]
    lines.append(f"total {elapsed:.0f} s: " + (f"FAILED: {', '.join(failed)}" if failed else "no failures"))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/gpu_check.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", type=lambda s: [p for p in s.split(",") if p], default=list(PARTS),
                        help=f"comma-separated, of {','.join(PARTS)} (default: all)")
    parser.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for all parts together")
    parser.add_argument("--wheels", type=Path, default=ROOT / "wheels", help="wheels to install missing dependencies from")
    parser.add_argument("--python", default=sys.executable, help="the interpreter the parts run in")
    parser.add_argument("--verbose", action="store_true", help="print every part's output tail")
    parser.add_argument("--part", help=argparse.SUPPRESS)  # internal: run one part in this process
    parser.add_argument("--gpus", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.part:
        return run_part(args.part, args.gpus)
    unknown = [p for p in args.parts if p not in PARTS]
    if unknown:
        parser.error(f"unknown part(s) {unknown}; choose from {PARTS}")
    start = time.monotonic()
    log: list[str] = []
    env_info = probe(args.python)
    if env_info.get("torch") is None:
        print(f"gpu-check: torch does not import in {args.python}: {env_info.get('error', '')}")
        return 1
    missing = ensure_dependencies(args.python, args.wheels, log)
    te_reason = ensure_te(args.python, args.wheels, env_info, log) if "te-fp8-model" in args.parts else None
    if te_reason:
        log.append(f"TE parts skip: {te_reason}")
        env_info = {**env_info, "te": False}
    results = run_parts(args, env_info, te_reason, missing, log)
    elapsed = time.monotonic() - start
    print(format_table(env_info, log, results, elapsed))
    print(json.dumps({"gpu_check": env_info, "log": log, "elapsed_s": round(elapsed, 1),
                      "parts": [{k: v for k, v in r.items() if k != "output_tail"} for r in results]}))
    return 1 if any(r["status"] in ("FAIL", "TIMEOUT") for r in results) else 0


# --- the parts (run as `--part NAME` in a process of their own; the last line is the result)


def run_part(part: str, gpus: int) -> int:
    functions = {"scaled-mm": part_scaled_mm, "gemm-tflops": part_gemm_tflops, "te-fp8-model": part_te_fp8_model,
                 "dualpipev-nccl": part_dualpipev_nccl}
    try:
        result = functions[part](gpus)
    except Exception as e:  # the part failed: say how, as its result
        import traceback

        traceback.print_exc()
        result = {"status": "FAIL", "summary": f"{type(e).__name__}: {str(e)[:300]}"}
    print(json.dumps(result), flush=True)
    return 0


def _time_cuda(fn, warmup: int = 3, repeats: int = 10) -> float:
    """Median seconds of `fn()` by CUDA events."""
    import torch

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def _operands(M: int, N: int, K: int, seed: int = 0):
    import torch

    from megatron_dsv3.fp8 import quantize_1x128, quantize_128x128

    generator = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(M, K, device="cuda", generator=generator)
    w = torch.randn(N, K, device="cuda", generator=generator) / K**0.5
    return x, w, quantize_1x128(x), quantize_128x128(w)


def part_scaled_mm(gpus: int) -> dict:
    from megatron_dsv3.fp8 import blockwise_gemm

    rows = []
    for M, N, K in SHAPES + ((EXPERT_TOKENS, *EXPERT_GEMMS[0]), (EXPERT_TOKENS, *EXPERT_GEMMS[1])):
        _, _, xq, wq = _operands(M, N, K)
        fast = blockwise_gemm(xq, wq, backend="scaled_mm").double()
        ref = blockwise_gemm(xq, wq, backend="emulate").double()
        rows.append({"shape": f"{M}x{N}x{K}", "rel_diff": float((fast - ref).norm() / ref.norm())})
    worst = max(r["rel_diff"] for r in rows)
    return {"status": "PASS" if worst < SCALED_MM_TOL else "FAIL", "rows": rows,
            "summary": f"max relative difference {worst:.2e} (tolerance {SCALED_MM_TOL:g}) over "
                       + ", ".join(r["shape"] for r in rows)}


def part_gemm_tflops(gpus: int) -> dict:
    import torch

    from megatron_dsv3.fp8 import blockwise_gemm

    rows = []
    for M, N, K in SHAPES:
        x, w, xq, wq = _operands(M, N, K)
        xb, wb = x.bfloat16(), w.bfloat16()
        t_fp8 = _time_cuda(lambda: blockwise_gemm(xq, wq, backend="scaled_mm", out_dtype=torch.bfloat16))
        t_bf16 = _time_cuda(lambda: xb @ wb.T)
        rows.append({"gemm": f"{M}x{N}x{K}", "fp8_tflops": tflops(M, N, K, t_fp8), "bf16_tflops": tflops(M, N, K, t_bf16)})
    for N, K in EXPERT_GEMMS:
        experts = [_operands(EXPERT_TOKENS, N, K, seed=e) for e in range(EXPERTS)]
        t_fp8 = _time_cuda(lambda: [blockwise_gemm(xq, wq, backend="scaled_mm", out_dtype=torch.bfloat16)
                                    for _, _, xq, wq in experts])
        bf16 = [(x.bfloat16(), w.bfloat16()) for x, w, _, _ in experts]
        t_bf16 = _time_cuda(lambda: [x @ w.T for x, w in bf16])
        M = EXPERTS * EXPERT_TOKENS
        rows.append({"gemm": f"{EXPERTS} experts x {EXPERT_TOKENS}x{N}x{K}", "fp8_tflops": tflops(M, N, K, t_fp8),
                     "bf16_tflops": tflops(M, N, K, t_bf16)})
    for r in rows:
        r["speedup"] = r["fp8_tflops"] / r["bf16_tflops"]
    return {"status": "PASS", "rows": rows,
            "summary": "; ".join(f"{r['gemm']}: FP8 {r['fp8_tflops']:.0f} vs BF16 {r['bf16_tflops']:.0f} TFLOP/s "
                                 f"({r['speedup']:.2f}x)" for r in rows)}


def part_te_fp8_model(gpus: int) -> dict:
    import torch
    from megatron.core import tensor_parallel

    from megatron_dsv3.config import preset
    from megatron_dsv3.distributed import init_distributed
    from megatron_dsv3.specs import gpt_model

    init_distributed()
    seq, batch = 128, 4
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 257, (batch, seq), generator=generator).cuda()
    positions = torch.arange(seq, device="cuda").expand(batch, seq)
    results = {}
    for label, fp8 in (("fp32", None), ("fp8-blockwise", "te")):
        torch.manual_seed(0)
        tensor_parallel.model_parallel_cuda_manual_seed(0)
        config = preset("tiny-fp8", seq_length=seq, transformer_impl="transformer_engine", fp8_blockwise=fp8,
                        use_cpu_initialization=False, moe_grouped_gemm=True)
        model = gpt_model(config).cuda()
        recipe = None
        if fp8:
            from megatron.core.fp8_utils import get_fp8_recipe

            recipe = type(get_fp8_recipe(config)).__name__
        start = time.perf_counter()
        loss = model(tokens, positions, None, labels=torch.roll(tokens, -1, 1)).float().mean()
        loss.backward()
        torch.cuda.synchronize()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        results[label] = {"loss": float(loss), "seconds": time.perf_counter() - start, "recipe": recipe,
                          "finite_grads": all(bool(torch.isfinite(g).all()) for g in grads), "grads": len(grads)}
    gap = abs(results["fp8-blockwise"]["loss"] - results["fp32"]["loss"]) / results["fp32"]["loss"]
    ok = (results["fp8-blockwise"]["finite_grads"] and gap < 0.02
          and results["fp8-blockwise"]["recipe"] == "Float8BlockScaling")
    return {"status": "PASS" if ok else "FAIL", "results": results, "relative_loss_gap": gap,
            "summary": f"TE recipe {results['fp8-blockwise']['recipe']}; loss FP8 {results['fp8-blockwise']['loss']:.4f} vs "
                       f"FP32 {results['fp32']['loss']:.4f} ({100 * gap:.2f}%, pass < 2%); gradients finite: "
                       f"{results['fp8-blockwise']['finite_grads']} ({results['fp8-blockwise']['grads']} tensors)"}


def part_dualpipev_nccl(gpus: int) -> dict:
    run_root = ROOT / "runs" / "gpu-check"
    layers = max(3, 2 * gpus)  # DualPipeV: 2P stages of at least one layer
    common = ["--preset", "tiny", "--set", f"num_layers={layers}", "--steps", "3", "--micro-batch-size", "2",
              "--num-microbatches", str(max(4, 2 * gpus)), "--warmup-steps", "1", "--no-progress", "--overwrite", "--seed", "1234"]
    runs = {
        "single": [sys.executable, "-m", "megatron_dsv3.training", *common, "--run-dir", str(run_root / "single")],
        "dualpipev": [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={gpus}",
                      "-m", "megatron_dsv3.training", *common, "--pipeline-schedule", "dualpipev", "--pp", str(gpus),
                      "--run-dir", str(run_root / "dualpipev")],
    }
    losses = {}
    for label, cmd in runs.items():
        rc, out = _run(cmd, 200)
        if rc != 0:
            print(out[-3000:])
            return {"status": "FAIL", "summary": f"{label} run exited {rc}"}
        metrics = (run_root / label / "metrics.jsonl").read_text().splitlines()
        losses[label] = [json.loads(line)["lm_loss"] for line in metrics]
    diff = abs(losses["dualpipev"][0] - losses["single"][0]) / losses["single"][0]
    import torch

    backend = "NCCL" if torch.cuda.is_available() else "gloo (no CUDA)"
    return {"status": "PASS" if diff < DUALPIPEV_TOL else "FAIL", "losses": losses, "step1_relative_diff": diff,
            "summary": f"DualPipeV P={gpus} on {backend}: LM loss per step {[round(v, 5) for v in losses['dualpipev']]} vs one "
                       f"process {[round(v, 5) for v in losses['single']]}; step 1 differs by {diff:.1e} (pass < {DUALPIPEV_TOL:g})"}


if __name__ == "__main__":
    sys.exit(main())
