"""The capacity planner (easy_context.plan): published shapes, EasyContext's published runs, the CPU measurements of
benchmarks/memory_scaling.py, and its command line."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from easy_context import plan as P

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
MEASURED = ROOT / "benchmarks" / "results" / "memory_scaling.json"
# benchmarks/memory_scaling.py --ranks 1 --lengths 8192 (and 32768) --tiled-mlp --also-without
MEASURED_OPTIONS = ROOT / "benchmarks" / "results" / "memory_scaling_options.json"


@pytest.mark.parametrize("name, params", [
    ("llama-2-7b", 6.74e9), ("llama-2-13b", 13.0e9), ("llama-2-70b", 69.0e9), ("llama-3-8b", 8.03e9),
    ("llama-3-70b", 70.6e9), ("mistral-7b", 7.24e9), ("smollm2-135m", 134.5e6),
])
def test_presets_have_the_published_parameter_counts(name, params):
    assert P.PRESETS[name].num_parameters == pytest.approx(params, rel=0.005)


def test_a_config_json_gives_the_same_shape_as_its_preset():
    shape = P.load_shape(str(ROOT / "assets" / "smollm2-135m" / "config.json"))
    assert shape == P.PRESETS["smollm2-135m"]
    assert P.load_shape(str(ROOT / "assets" / "smollm2-135m")) == shape


# EasyContext's published runs (its README): ZeRO-3 with parameter and optimizer offload, full checkpointing,
# zigzag ring attention, A100-80GB. Its training script computes the whole logits (model(...).logits), hence "full".
PUBLISHED = [("llama-2-7b", 8, 700_000), ("llama-2-13b", 16, 1_000_000)]


def published_plan(model, gpus, **kw):
    options = dict(gpus=gpus, gpu_memory_gb=80, method="zigzag_ring_attn", zero=3, offload_optimizer=True,
                   offload_params=True, checkpointing="full", loss_chunk_size="full", dtype="bfloat16")
    options.update(kw)
    return P.Plan(P.PRESETS[model], **options)


@pytest.mark.parametrize("model, gpus, trained", PUBLISHED)
def test_published_runs_are_within_a_third_of_the_prediction(model, gpus, trained):
    predicted = P.max_seq_length(published_plan(model, gpus))
    assert 0.75 <= predicted / trained <= 1.33, (model, predicted)


def test_more_gpus_and_sequence_parallelism_lengthen_the_context():
    one = P.max_seq_length(published_plan("llama-2-7b", 8))
    assert P.max_seq_length(published_plan("llama-2-7b", 16)) > 1.8 * one
    assert P.max_seq_length(published_plan("llama-2-7b", 8, offload_params=False, offload_optimizer=False)) < one
    assert P.max_seq_length(published_plan("llama-2-7b", 8, method="data_parallel", sp_size=1)) < one / 4


def _measured_rows():
    rows = json.loads(MEASURED.read_text())
    assert {r["ranks"] for r in rows} >= {1, 2, 4} and len({r["seq_len"] for r in rows}) >= 3
    options = json.loads(MEASURED_OPTIONS.read_text())
    assert {r["tiled_mlp"] for r in options} == {None, 576}
    return rows + options


def _row_id(row):
    return f"P{row['ranks']}-{row['seq_len']}-{row['loss_chunk_size']}" + \
        (f"-tiled{row['tiled_mlp']}" if row.get("tiled_mlp") else "") + \
        ("-offload" if row.get("offload_checkpoints") else "")


@pytest.mark.parametrize("row", _measured_rows(), ids=_row_id)
def test_cpu_mode_predicts_the_measured_peak_within_15_percent(row):
    plan = P.Plan(P.PRESETS["smollm2-135m"], gpus=row["ranks"], method=row["method"], cpu=True,
                  checkpointing=row["checkpointing"], loss_chunk_size=row["loss_chunk_size"],
                  tiled_mlp=row.get("tiled_mlp"), offload_checkpoints=bool(row.get("offload_checkpoints")))
    got = P.breakdown(plan, row["seq_len"])
    assert got["fixed"] == pytest.approx(row["fixed_bytes"], rel=0.02)
    assert got["total"] == pytest.approx(row["peak_bytes"], rel=0.15)


def run_plan(*args):
    return subprocess.run([PYTHON, "-m", "easy_context.plan", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_cli_prints_a_breakdown_and_json():
    proc = run_plan("--model", "llama-2-7b", "--gpus", "8", "--zero", "3", "--offload-optimizer", "--offload-params",
                    "--seq-length", "65536")
    assert proc.returncode == 0, proc.stderr
    assert "checkpointed" in proc.stdout and "longest trainable sequence" in proc.stdout
    proc = run_plan("--model", "llama-3-8b", "--gpus", "16", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["max_seq_length"] > 0 and out["breakdown_bytes"]["total"] <= 80e9
    assert set(out["breakdown_bytes"]) >= {"weights", "gradients", "optimizer", "checkpointed", "layer_recompute",
                                           "attention_buffers", "loss"}


def test_cli_help_shows_ranges_and_defaults():
    proc = run_plan("--help")
    assert proc.returncode == 0 and "default:" in proc.stdout and "--offload-params" in proc.stdout


@pytest.mark.parametrize("args, words", [
    (["--model", "no-such-model"], "preset"),
    (["--model", "llama-2-7b", "--gpus", "0"], "--gpus"),
    (["--model", "llama-2-7b", "--gpus", "8", "--sp-size", "3"], "does not divide"),
    (["--model", "llama-2-7b", "--loss-chunk-size", "lots"], "--loss-chunk-size"),
    (["--model", "llama-2-7b", "--zero", "2", "--offload-params"], "--zero 3"),
    (["--model", "llama-3-8b", "--method", "ulysses_attn", "--gpus", "64"], "heads"),
])
def test_cli_bad_input_is_one_line_and_exit_2(args, words):
    proc = run_plan(*args)
    assert proc.returncode == 2 and proc.stderr.count("error:") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert words in proc.stderr


def test_tiled_mlp_and_checkpoint_offload_lower_the_peak_by_their_terms():
    """Each option removes its term from the per-GPU peak and lengthens the longest sequence. data_parallel on
    Llama-3-8B at 128K tokens per GPU: the MLP phase sets one layer's recompute term with and without the options,
    and the layer term sets the peak (above the loss), so the peak falls by exactly the term."""
    import dataclasses

    s, e, f, layers = 131072, 4096, 14336, 32
    plan = published_plan("llama-3-8b", 8, method="data_parallel", sp_size=1, loss_chunk_size=1024)
    plain = P.breakdown(plan, s)
    tiled_plan = dataclasses.replace(plan, tiled_mlp="auto")
    tiled = P.breakdown(tiled_plan, s)
    assert tiled_plan.tiled_mlp == tiled["mlp_tile"] == e  # default tile: the hidden size
    term = (s - e) * 2 * P.C_F * f  # the MLP's intermediate over every token but one tile, bf16
    assert plain["mlp_intermediate"] - tiled["mlp_intermediate"] == pytest.approx(term)
    assert tiled["layer_recompute"] > tiled["loss"]
    assert plain["total"] - tiled["total"] == pytest.approx(term)
    assert P.max_seq_length(tiled_plan) > 1.4 * P.max_seq_length(plan)

    offload_plan = dataclasses.replace(plan, offload_checkpoints=True)
    offload = P.breakdown(offload_plan, s)
    inputs = s * layers * e * 2  # every layer's input, bf16
    assert offload["host_offload"] == inputs and plain["checkpointed"] - offload["checkpointed"] == inputs
    # the recomputed layer's input comes back to the GPU for its backward
    assert plain["total"] - offload["total"] == pytest.approx(inputs - s * e * 2)
    assert P.max_seq_length(offload_plan) > 1.5 * P.max_seq_length(plan)

    cpu = published_plan("smollm2-135m", 1, cpu=True)  # a CPU run: the inputs already are in host memory
    assert P.breakdown(dataclasses.replace(cpu, offload_checkpoints=True), 8192)["total"] == \
        P.breakdown(cpu, 8192)["total"]


def test_cli_memory_options():
    proc = run_plan("--model", "llama-2-7b", "--tiled-mlp", "--offload-checkpoints", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["plan"]["tiled_mlp"] == 4096 and out["plan"]["offload_checkpoints"] is True
    assert out["breakdown_bytes"]["host_offload"] > 0
    plain = json.loads(run_plan("--model", "llama-2-7b", "--json").stdout)
    assert out["max_seq_length"] > plain["max_seq_length"]
    for args, words in ((["--tiled-mlp", "0"], "--tiled-mlp"), (["--checkpointing", "none", "--offload-checkpoints"],
                                                               "--checkpointing full or remat")):
        proc = run_plan("--model", "llama-2-7b", *args)
        assert proc.returncode == 2 and proc.stderr.count("error:") == 1 and words in proc.stderr, proc.stderr
