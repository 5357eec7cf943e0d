"""train.py end to end, through `accelerate launch` on real gloo processes.

A 2-process zigzag-ring run and a 2-process DeepSpeed ZeRO-3 (CPU offload) run must give the loss of a 1-process
data-parallel run of the same global batch at every step (float32, relative 1e-5); an interrupted and resumed run
must give exactly the uninterrupted run's losses; bad options must fail fast with a message naming the fix.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from distributed import free_port
from reference import FP32_TOL as TOL

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
ACCELERATE = str(Path(sys.executable).with_name("accelerate"))
STEPS = 3
# 4 steps of tiny-model training: 2 micro-batches of one 128-token sequence each per step, a raised RoPE base.
COMMON = ["--model", "tiny", "--seq-length", "128", "--steps", str(STEPS), "--grad-accum", "2",
          "--learning-rate", "1e-3", "--warmup-steps", "1", "--rope-theta", "50000", "--seed", "3"]

pytestmark = pytest.mark.skipif(
    not (ROOT / "assets" / "smollm2-135m" / "tokenizer.json").exists(),
    reason="needs the SmolLM2 tokenizer fetched by scripts/setup.sh")


def _env():
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env.pop("ACCELERATE_USE_CPU", None)  # it would turn the DeepSpeed config into plain DDP
    return env


def _run(cmd, timeout=400):
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    return proc


def _train(out, *extra, config=None, check=True):
    if config is None:
        cmd = [PYTHON, "train.py"]
    else:
        cmd = [ACCELERATE, "launch", "--config_file", f"accelerate_configs/{config}",
               "--main_process_port", str(free_port()), "train.py"]
    proc = _run(cmd + COMMON + ["--output-dir", str(out), *extra])
    if check:
        assert proc.returncode == 0, f"train.py failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def _losses(out):
    """Loss of each step from log.jsonl (a resume cuts the log back to its step, so each step appears once)."""
    entries = [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in entries] == list(range(1, len(entries) + 1)), entries
    return [e["loss"] for e in entries]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, dataset):
    out = tmp_path_factory.mktemp("reference")
    _train(out, "--dataset", dataset, "--parallel-mode", "data_parallel")
    return _losses(out)


@pytest.fixture(scope="module")
def zigzag_run(tmp_path_factory, dataset):
    out = tmp_path_factory.mktemp("zigzag")
    _train(out, "--dataset", dataset, "--parallel-mode", "zigzag_ring_attn", config="cpu_2proc.yaml")
    return out


def _assert_close(losses, reference):
    assert len(losses) == len(reference) == STEPS
    for step, (got, ref) in enumerate(zip(losses, reference), 1):
        assert abs(got - ref) <= TOL * abs(ref), f"step {step}: loss {got!r} vs single-process {ref!r}"


def test_zigzag_two_processes_match_single_process(zigzag_run, reference):
    _assert_close(_losses(zigzag_run), reference)
    assert len(set(reference)) == STEPS  # the model really trains: every step's loss differs


def test_dist_flash_attn_with_remat_checkpointing_matches_single_process(tmp_path, dataset, reference):
    _train(tmp_path, "--dataset", dataset, "--parallel-mode", "dist_flash_attn", "--checkpointing", "remat",
           config="cpu_2proc.yaml")
    _assert_close(_losses(tmp_path), reference)


def test_tiled_mlp_and_checkpoint_offload_keep_the_losses(tmp_path, dataset, reference):
    """--tiled-mlp (tiles of 48 of the 128 tokens) and --offload-checkpoints change where memory goes, not the
    losses: every step's loss is the plain run's within float32 1e-6."""
    _train(tmp_path, "--dataset", dataset, "--parallel-mode", "data_parallel", "--tiled-mlp", "48",
           "--offload-checkpoints")
    losses = _losses(tmp_path)
    assert len(losses) == len(reference) == STEPS
    for step, (got, ref) in enumerate(zip(losses, reference), 1):
        assert abs(got - ref) <= 1e-6 * abs(ref), f"step {step}: loss {got!r} vs plain {ref!r}"


def test_final_model_records_rope_theta_and_length(zigzag_run):
    config = json.loads((zigzag_run / "config.json").read_text())
    theta = config.get("rope_parameters", {}).get("rope_theta", config.get("rope_theta"))
    assert theta == 50000.0
    assert config["max_position_embeddings"] == 128 and config["use_cache"] is True
    assert (zigzag_run / "model.safetensors").exists() and (zigzag_run / "tokenizer.json").exists()


def test_deepspeed_zero3_cpu_offload_matches_single_process_across_a_resume(tmp_path, dataset, reference):
    """ZeRO-3 with optimizer and parameter offload, stopped after step 2 and resumed from its DeepSpeed checkpoint
    (partitioned optimizer states): every step's loss equals the single-process run's."""
    args = ["--dataset", dataset, "--parallel-mode", "zigzag_ring_attn", "--save-every", "2"]
    first = _train(tmp_path, *args, "--stop-at", "2", config="cpu_deepspeed_zero3.yaml")
    assert "DEEPSPEED" in first.stdout, first.stdout[-2000:]
    assert (tmp_path / "checkpoint-2" / "pytorch_model").is_dir()  # DeepSpeed's own partitioned checkpoint
    _train(tmp_path, *args, "--resume", str(tmp_path), config="cpu_deepspeed_zero3.yaml")
    _assert_close(_losses(tmp_path), reference)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config.get("rope_parameters", {}).get("rope_theta", config.get("rope_theta")) == 50000.0  # 5.x, 4.x


RESUME_ARGS = ["--parallel-mode", "zigzag_ring_attn", "--save-every", "1"]


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory, dataset):
    """The 2-process zigzag run stopped after step 2 (checkpoints 1 and 2), as if interrupted."""
    out = tmp_path_factory.mktemp("stopped")
    first = _train(out, "--dataset", dataset, *RESUME_ARGS, "--stop-at", "2", config="cpu_2proc.yaml")
    assert "checkpoint saved to" in first.stdout + first.stderr
    assert (out / "latest").read_text().strip() == "checkpoint-2"
    assert not (out / "config.json").exists()  # stopped runs save no final model
    return out


def test_resume_continues_bit_for_bit(tmp_path, dataset, stopped_run, zigzag_run):
    out = shutil.copytree(stopped_run, tmp_path / "run")
    _train(out, "--dataset", dataset, *RESUME_ARGS, "--resume", str(out), config="cpu_2proc.yaml")
    assert _losses(out) == _losses(zigzag_run)  # exactly equal, every step including those after the resume


def test_resume_on_one_process_with_the_same_global_batch(tmp_path, dataset, stopped_run, reference):
    """A new process count that keeps the global batch keeps the data position exactly: the 2-process checkpoint
    resumed by one process continues with the single-process losses."""
    out = shutil.copytree(stopped_run, tmp_path / "run")
    proc = _train(out, "--dataset", dataset, *RESUME_ARGS, "--resume")
    assert "resuming on 1 process (the checkpoint was written by 2)" in proc.stdout
    _assert_close(_losses(out), reference)


def test_resume_refuses_a_new_global_batch_under_the_launcher(tmp_path, dataset, stopped_run):
    """--sp-size 1 on 2 processes makes 2 data-parallel replicas: the global batch doubles, which is refused with
    one line printed once (by rank 0) before anything heavy runs."""
    out = shutil.copytree(stopped_run, tmp_path / "run")
    proc = _train(out, "--dataset", dataset, *RESUME_ARGS, "--sp-size", "1", "--resume", config="cpu_2proc.yaml",
                  check=False)
    lines = [line for line in proc.stderr.splitlines() if "train.py: error:" in line]
    assert proc.returncode != 0 and len(lines) == 1, proc.stderr[-4000:]
    assert "the global batch (--batch-size x data-parallel size x --grad-accum) would change from 2 to 4" in lines[0]
    assert 'File "' + str(ROOT / "train.py") not in proc.stderr


@pytest.mark.parametrize("extra, message", [
    (["--dataset", "/nonexistent/corpus.jsonl"], "dataset path /nonexistent/corpus.jsonl does not exist"),
    (["--seq-length", "129"], "--seq-length 129 is not divisible by 2, which zigzag_ring_attn needs"),
    (["--sp-size", "2"], "--sp-size 2 does not divide the world size 1"),
    (["--tiled-mlp", "0"], "--tiled-mlp: expected an integer >= 1"),
    (["--checkpointing", "none", "--offload-checkpoints"], "use --checkpointing full or remat"),
])
def test_bad_options_fail_fast_with_a_clear_message(tmp_path, dataset, extra, message):
    args = ["--dataset", dataset, *extra] if "--dataset" not in extra else extra
    proc = _train(tmp_path, *args, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert message in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr


def test_pad_to_multiple_trains_an_odd_length(tmp_path, dataset):
    _train(tmp_path, "--dataset", dataset, "--seq-length", "129", "--pad-to-multiple", "--steps", "1")
    assert len(_losses(tmp_path)) == 1


def test_train_py_stays_under_200_lines():
    lines = (ROOT / "train.py").read_text().splitlines()
    assert len(lines) < 200, f"train.py has {len(lines)} lines"
