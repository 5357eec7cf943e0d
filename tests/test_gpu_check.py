"""scripts/gpu_check.sh: refuses a CUDA run without a GPU (exit 2, one line), and its checks pass on CPU."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def _run(*args, tmp_path):
    env = {"PATH": "/usr/bin:/bin", "PYTHON": sys.executable}
    return subprocess.run(["bash", str(SCRIPT), *args, "--output-dir", str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_cuda_run_without_a_gpu_exits_2_with_one_line(tmp_path):
    proc = _run(tmp_path=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "gpu_check.sh: no CUDA device (torch.cuda.is_available() is False); run on a GPU machine or pass --device cpu"]
    assert not (tmp_path / "gpu_check.json").exists()


def test_cpu_smoke_run_passes_and_writes_its_report(tmp_path):
    proc = _run("--device", "cpu", "--sections", "kernels", "methods", "bench", "--lengths", "512", "--ranks", "4",
                "--heads", "4", "--kv-heads", "2", "--head-dim", "64", "--repeats", "1", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    sections = {r["section"] for r in report["results"]}
    assert sections == {"kernels", "methods", "bench"}
    assert all(r["ok"] for r in report["results"])
    methods = {r["name"].split()[0] for r in report["results"] if r["section"] == "methods"}
    assert methods == {"ring_attn", "zigzag_ring_attn", "stripe_attn", "dist_flash_attn", "ulysses_attn", "usp_attn"}
    assert report["bench"][0]["tokens"] == 512 and report["bench"][0]["ring_attn_tflops"] > 0
    assert "| 512 | torch_cpu |" in (tmp_path / "gpu_check.md").read_text()
