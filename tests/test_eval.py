"""Tests of eval_ppl.py, eval_needle.py and easy_context.evaluation.

The real-model tests run the scripts as users do (subprocesses; two processes through ``accelerate launch``) on
SmolLM2-135M and the Austen text, at lengths of 1-2K tokens so they stay within a few minutes on 2 CPU cores.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from distributed import free_port
from reference import MODEL_TOL
from easy_context import assets
from easy_context import evaluation as ev

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
ACCELERATE = str(Path(sys.executable).with_name("accelerate"))

needs_assets = pytest.mark.skipif(not assets.have_assets(), reason=f"assets missing: {assets.SETUP_HINT}")


def run_script(args, *, processes=1, timeout=900):
    """Run a script from the repository root; returns its stdout (fails the test with the output on error)."""
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    if processes == 1:
        cmd = [PYTHON, *args]
    else:
        env["ACCELERATE_USE_CPU"] = "true"
        cmd = [ACCELERATE, "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()), *args]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    return result.stdout


def check_png(path, min_width=300, min_height=200):
    import matplotlib.image

    assert path.is_file(), f"{path} was not written"
    image = matplotlib.image.imread(str(path))
    assert image.ndim == 3 and image.shape[2] in (3, 4), image.shape
    height, width = image.shape[:2]
    assert width >= min_width and height >= min_height, image.shape
    assert image[..., :3].std() > 0.05, "the image is blank"


# ---------------------------------------------------------------------------------------------------------------
# Pure helpers
# ---------------------------------------------------------------------------------------------------------------


def test_model_spec_syntax():
    spec = ev.parse_model_spec("/models/llama-7b")
    assert (spec.path, spec.method, spec.options, spec.label) == ("/models/llama-7b", None, {}, "llama-7b")
    assert not spec.sequence_parallel
    spec = ev.parse_model_spec("/m/x@zigzag_ring_attn")
    assert spec.method == "zigzag_ring_attn" and spec.sequence_parallel and spec.label == "x@zigzag_ring_attn"
    spec = ev.parse_model_spec("@dca:pretraining_length=8192,chunk_size=6144", default_path="/m/smol")
    assert spec.path == "/m/smol" and spec.method == "dca" and not spec.sequence_parallel
    assert spec.options == {"pretraining_length": 8192, "chunk_size": 6144}
    assert spec.label == "smol@dca:pretraining_length=8192,chunk_size=6144"
    assert ev.parse_model_spec("a@b/c@plain").path == "a@b/c"  # the method follows the last @
    assert ev.parse_model_spec("@plain", default_path="/m/smol") == ev.ModelSpec("/m/smol")
    with pytest.raises(ValueError, match="unknown method 'nope'.*zigzag_ring_attn"):
        ev.parse_model_spec("/m/x@nope")
    with pytest.raises(ValueError, match="not KEY=VALUE"):
        ev.parse_model_spec("/m/x@dca:8192")
    with pytest.raises(ValueError, match="no model path"):
        ev.parse_model_spec("@plain")


def test_token_lengths():
    assert ev.token_lengths(2048, 8192, 2048) == [2048, 4096, 6144, 8192]
    assert ev.token_lengths(1000, 2500, 1000) == [1000, 2000, 2500]
    assert ev.token_lengths(1, 1, 1, explicit=[4096, 1024, 4096]) == [1024, 4096]
    with pytest.raises(ValueError):
        ev.token_lengths(4096, 1024, 1024)


def test_ppl_csv_round_trip_and_merge(tmp_path):
    path = tmp_path / "ppl.csv"
    ev.write_ppl_csv(path, {"a": {1024: 30.5, 2048: 28.25}, "b@dca": {2048: 27.0}})
    assert path.read_text().splitlines() == ["model,1024,2048", "a,30.500000,28.250000", "b@dca,,27.000000"]
    assert ev.read_ppl_csv(path) == {"a": {1024: 30.5, 2048: 28.25}, "b@dca": {2048: 27.0}}
    ev.plot_perplexity(ev.read_ppl_csv(path), tmp_path / "ppl.png", pretraining_length=2048)
    check_png(tmp_path / "ppl.png")


def test_generation_refuses_sequence_parallel_methods(tmp_path):
    result = subprocess.run([PYTHON, "eval_needle.py", "-m", "/nowhere@zigzag_ring_attn", "--scoring", "generate",
                             "--output-dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "needs a KV cache" in result.stderr


# ---------------------------------------------------------------------------------------------------------------
# Haystack construction (real tokenizer and text)
# ---------------------------------------------------------------------------------------------------------------


@needs_assets
@pytest.mark.real_model
@pytest.mark.parametrize("chat", [True, False])
def test_haystack_prompts(chat):
    tokenizer = assets.load_tokenizer()
    config = ev.NeedleConfig(distractors=2, chat_template=chat)
    haystack = ev.Haystack(ev.read_text_folder(assets.austen_dir()), tokenizer, config)
    for length, depth in [(512, 0.0), (1024, 0.5), (1536, 1.0)]:
        trial = haystack.trial(length, depth)
        ids = trial.input_ids[0]
        assert length - 4 <= ids.numel() <= length
        assert tokenizer.decode(ids[trial.answer_positions]).strip() == trial.answer
        assert len(trial.answer) == 7 and trial.answer.isdigit() and len(trial.distractor_numbers) == 2
        assert trial.answer not in trial.distractor_numbers
        assert abs(trial.needle_depth - depth) < 0.1
        text = tokenizer.decode(ids)
        needle = config.needle.format(answer=trial.answer)
        at = text.index(needle)
        before = text[:at].rstrip()
        # On a sentence boundary: after the intro (depth 0) or after a sentence end or a paragraph break.
        assert before.endswith(config.intro) or before[-1] in ".!?\"'’”)]" or text[:at].endswith("\n\n")
        assert text.count("The special magic number for") == 2
        prompt = tokenizer.decode(ids[: trial.generation_length])
        assert prompt.rstrip().endswith("assistant" if chat else config.question)
        assert text.rstrip().endswith(f"{config.answer_prefix} {trial.answer}")
    # The same trial is rebuilt identically (resuming relies on it).
    again = ev.Haystack(haystack.text, tokenizer, config).trial(1024, 0.5)
    assert again.input_ids.equal(haystack.trial(1024, 0.5).input_ids)


# ---------------------------------------------------------------------------------------------------------------
# eval_ppl.py
# ---------------------------------------------------------------------------------------------------------------


@needs_assets
@pytest.mark.real_model
def test_ppl_one_process_vs_two_processes_zigzag(tmp_path):
    one, two = tmp_path / "one.csv", tmp_path / "two.csv"
    out = run_script(["eval_ppl.py", "--lengths", "1024", "2048", "-m", "@plain", "--output", str(one)])
    assert "wrote" in out
    run_script(["eval_ppl.py", "--lengths", "1024", "2048", "-m", "@zigzag_ring_attn", "--output", str(two),
                "--plot", str(tmp_path / "two.png")], processes=2)
    assert one.read_text().splitlines()[0] == "model,1024,2048"
    single, parallel = ev.read_ppl_csv(one), ev.read_ppl_csv(two)
    assert list(single) == ["smollm2-135m"] and list(parallel) == ["smollm2-135m@zigzag_ring_attn"]
    a, b = single["smollm2-135m"], parallel["smollm2-135m@zigzag_ring_attn"]
    assert sorted(a) == sorted(b) == [1024, 2048]
    for n in (1024, 2048):
        assert 10 < a[n] < 80, a
        assert abs(a[n] - b[n]) <= MODEL_TOL * a[n], (n, a[n], b[n])
    print(f"perplexity 1 process: {a}; 2 processes zigzag: {b}")
    check_png(tmp_path / "one.png")
    check_png(tmp_path / "two.png")


@needs_assets
@pytest.mark.real_model
def test_ppl_text_folder_samples_and_csv_merge(tmp_path):
    data = tmp_path / "texts"
    data.mkdir()
    text = assets.austen_texts()["persuasion"][:40_000]
    (data / "a.txt").write_text(text[:20_000])
    (data / "b.txt").write_text(text[20_000:])
    csv_path = tmp_path / "ppl.csv"
    common = ["eval_ppl.py", "--dataset", str(data), "--samples", "3", "--lengths", "128", "256", "--output",
              str(csv_path), "--no-plot"]
    run_script([*common, "-m", "@plain"])
    run_script([*common, "-m", "@zigzag_ring_attn"])  # rows of earlier runs are kept
    table = ev.read_ppl_csv(csv_path)
    assert list(table) == ["smollm2-135m", "smollm2-135m@zigzag_ring_attn"]
    for n in (128, 256):
        assert table["smollm2-135m"][n] == pytest.approx(table["smollm2-135m@zigzag_ring_attn"][n], rel=MODEL_TOL)
    assert not (tmp_path / "ppl.png").exists()


# ---------------------------------------------------------------------------------------------------------------
# eval_needle.py
# ---------------------------------------------------------------------------------------------------------------

NEEDLE_GRID = ["eval_needle.py", "--lengths", "1024", "2048", "--depths", "0.1", "0.5", "0.9"]


@pytest.fixture(scope="module")
def needle_run(tmp_path_factory):
    """The 2 lengths × 3 depths grid, scored by teacher forcing and by generation (shared by two tests)."""
    out_dir = tmp_path_factory.mktemp("needle")
    stdout = run_script([*NEEDLE_GRID, "--scoring", "forced", "generate", "--output-dir", str(out_dir)])
    return out_dir, stdout


@needs_assets
@pytest.mark.real_model
def test_needle_grid(needle_run):
    out_dir, stdout = needle_run
    records = ev.read_trials(out_dir / "trials.jsonl")
    assert len(records) == 6
    assert {(r["length"], r["depth"]) for r in records} == {(n, d) for n in (1024, 2048) for d in (0.1, 0.5, 0.9)}
    for r in records:
        assert r["context_tokens"] == r["length"] and r["model"] == "smollm2-135m" and r["method"] == "plain"
        assert r["forced_correct"] in (0, 1) and r["generate_correct"] in (0, 1)
        assert r["forced_correct"] == int(r["forced_prediction"] == r["answer"])
        assert abs(r["needle_depth"] - r["depth"]) < 0.1
    summary = json.loads((out_dir / "summary.json").read_text())
    forced = sum(r["forced_correct"] for r in records) / 6
    generated = sum(r["generate_correct"] for r in records) / 6
    assert summary["smollm2-135m"]["forced"] == pytest.approx(forced)
    assert summary["smollm2-135m"]["generate"] == pytest.approx(generated)
    assert f"smollm2-135m [forced] mean accuracy: {forced:.4f}" in stdout
    print(f"needle accuracy within the trained window: forced {forced:.2f}, generated {generated:.2f}")
    assert forced >= 0.5 and generated >= 0.5  # SmolLM2-135M finds a 7-digit needle in 1-2K tokens
    check_png(out_dir / "heatmap.png", min_width=600)


@needs_assets
@pytest.mark.real_model
def test_needle_resume_skips_done_trials(needle_run):
    out_dir, _ = needle_run
    trials = out_dir / "trials.jsonl"
    before = trials.read_text()
    stdout = run_script([*NEEDLE_GRID, "--scoring", "forced", "generate", "--output-dir", str(out_dir)])
    assert "0 trials to run, 6 already in" in stdout
    assert trials.read_text() == before
    # A grown grid runs only the new cell; trials scored with both modes count as done for forced-only runs.
    stdout = run_script(["eval_needle.py", "--lengths", "1024", "--depths", "0.1", "0.5", "0.9", "1.0",
                         "--output-dir", str(out_dir)])
    assert "1 trials to run, 3 already in" in stdout
    records = ev.read_trials(trials)
    assert len(records) == 7 and records[-1]["depth"] == 1.0 and "generate_correct" not in records[-1]
    assert trials.read_text().startswith(before)


@needs_assets
@pytest.mark.real_model
def test_needle_scoring_catches_a_wrong_answer(tmp_path):
    """The needle states one number and the expected answer is another: every trial must score 0."""
    run_script(["eval_needle.py", "--lengths", "1024", "--depths", "0.2", "0.8", "--needle",
                "The special magic number is: 3141592.", "--answer", "2718281", "--scoring", "forced", "generate",
                "--output-dir", str(tmp_path)])
    records = ev.read_trials(tmp_path / "trials.jsonl")
    assert len(records) == 2
    assert all(r["answer"] == "2718281" for r in records)
    assert all(r["forced_correct"] == 0 and r["generate_correct"] == 0 for r in records)
    assert json.loads((tmp_path / "summary.json").read_text())["smollm2-135m"] == {"forced": 0.0, "generate": 0.0}
    # The model does read the needle; it is the scoring that rejects the mismatch.
    assert any("3141592" in r["generation"] for r in records)
    check_png(tmp_path / "heatmap.png", min_width=600)
