"""benchmarks/memory_scaling.py measures what a real step allocates: skipping the arithmetic changes no allocation,
the allocator's events give the live bytes, and its command line follows the project's conventions."""

import contextlib
import subprocess
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from easy_context.training.model import enable_checkpointing
from tiny_models import tiny_model

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import memory_scaling as M  # noqa: E402


def _step_peaks(skip: bool) -> dict:
    model = tiny_model("llama", hidden_size=128, intermediate_size=512, vocab_size=1024).train()
    enable_checkpointing(model, "full")
    ids = torch.randint(0, 1024, (1, 1024), generator=torch.Generator().manual_seed(0))
    tracker = M.PhasePeaks()
    mode = M._skip_compute_mode() if skip else contextlib.nullcontext()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof, mode:
        tracker.enter("forward")
        loss = torch.nn.functional.cross_entropy(model(ids).logits[0], ids[0])
        tracker.leave("forward")
        tracker.enter("backward")
        loss.backward()
        tracker.leave("backward")
    found = tracker.analyse(prof)
    return {"peak": found["peak"], **found["rise"]}


def test_skipping_the_arithmetic_allocates_exactly_what_the_real_step_allocates():
    real, skipped = _step_peaks(False), _step_peaks(True)
    assert real["peak"] > 10 * 2 ** 20  # the logits alone are 4 MiB
    assert skipped == real


def test_help_and_bad_input():
    run = [sys.executable, str(ROOT / "benchmarks" / "memory_scaling.py")]
    proc = subprocess.run(run + ["--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "default:" in proc.stdout and "--loss-chunk-size" in proc.stdout
    assert "--tiled-mlp" in proc.stdout and "--offload-checkpoints" in proc.stdout
    for bad in (["--lengths", "0"], ["--loss-chunk-size", "many"], ["--tiled-mlp", "0"],
                ["--checkpointing", "none", "--offload-checkpoints"]):
        proc = subprocess.run(run + bad, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and proc.stderr.count("error:") == 1 and "Traceback" not in proc.stderr
