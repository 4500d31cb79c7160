"""`make gpu-check` (scripts/gpu_check.py): its CPU path runs, and skips every GPU part with the reason."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu_check.py"
spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
gpu_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_check)

GPU_PARTS = ("scaled-mm", "gemm-tflops", "te-fp8-model", "dualpipev-nccl")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path: this machine has CUDA (make gpu-check runs the rest)")
def test_without_cuda_every_gpu_part_skips_with_its_reason_and_the_check_passes(capsys, tmp_path):
    assert set(GPU_PARTS) | {"cuda-tests"} == set(gpu_check.PARTS)
    rc = gpu_check.main(["--parts", ",".join(GPU_PARTS), "--wheels", str(tmp_path)])
    lines = capsys.readouterr().out.strip().splitlines()
    assert rc == 0
    summary = json.loads(lines[-1])
    assert summary["gpu_check"]["cuda"] is False
    assert [(p["part"], p["status"], p["summary"]) for p in summary["parts"]] == [
        (part, "SKIP", "no CUDA device") for part in GPU_PARTS
    ]
    assert any(line.startswith("part") and "status" in line for line in lines)  # the table
    if not summary["gpu_check"]["te"]:  # TE's parts say why they cannot run
        assert any("no transformer_engine wheel" in entry for entry in summary["log"])


def test_unknown_parts_are_refused():
    with pytest.raises(SystemExit):
        gpu_check.main(["--parts", "scaled-mm,warp-drive"])


def test_tflops_is_two_m_n_k_per_second():
    assert gpu_check.tflops(4096, 7168, 2048, 1e-3) == pytest.approx(2 * 4096 * 7168 * 2048 / 1e-3 / 1e12)


def test_a_part_without_a_result_line_is_a_failure_and_keeps_its_output():
    assert gpu_check._part_result(0, 'noise\n{"status": "PASS", "summary": "ok"}\n') == {"status": "PASS", "summary": "ok"}
    failed = gpu_check._part_result(1, "Traceback ...\nRuntimeError: boom")
    assert failed["status"] == "FAIL" and "boom" in failed["output_tail"]
    assert gpu_check._part_result(124, "")["status"] == "TIMEOUT"
