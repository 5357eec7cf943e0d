"""eval_ppl.py and eval_needle.py keep results honest: keyed on content, validated options, bounded waits.

The scripts run as users run them (subprocesses; 2 gloo processes through ``accelerate launch`` for the stalled-rank
test) on tiny random 2-layer Llamas saved with the SmolLM2 tokenizer, so each run takes seconds. Two of them are saved
in folders with the same name (``a/tiny`` and ``b/tiny``) and one is a copy of ``a/tiny`` under another name.
"""

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distributed import free_port

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
ACCELERATE = str(Path(sys.executable).with_name("accelerate"))

pytestmark = pytest.mark.skipif(
    not (ROOT / "assets" / "smollm2-135m" / "tokenizer.json").exists() or not (ROOT / "assets" / "austen").is_dir(),
    reason="needs the SmolLM2 tokenizer and the Austen text fetched by scripts/setup.sh")


def _env(cache):
    return dict(os.environ, TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
                EASY_CONTEXT_CACHE=str(cache))


def run(script, *args, cache, processes=1, timeout=300):
    cmd = [PYTHON, script, *args]
    env = _env(cache)
    if processes > 1:
        env["ACCELERATE_USE_CPU"] = "true"
        cmd = [ACCELERATE, "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()), script,
               *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def ok(proc):
    assert proc.returncode == 0, f"failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def read_csv(path):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return {row[0]: {int(n): float(v) for n, v in zip(rows[0][1:], row[1:]) if v} for row in rows[1:]}


@pytest.fixture(scope="module")
def place(tmp_path_factory):
    """Tiny models (two same-named folders with different weights, one renamed copy) and two text folders."""
    import torch  # noqa: F401
    from transformers import AutoTokenizer

    from easy_context import training as T
    from easy_context.assets import austen_texts, smollm2_path

    root = tmp_path_factory.mktemp("eval")
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
    for folder, seed in (("a/tiny", 1), ("b/tiny", 2)):
        model = T.build_model("tiny", vocab_size=len(tokenizer), seq_length=4096, seed=seed)
        model.config.use_cache = True
        model.save_pretrained(root / folder)
        tokenizer.save_pretrained(root / folder)
    shutil.copytree(root / "a" / "tiny", root / "copy_of_a")
    texts = austen_texts()
    for name, novel in (("texts1", "persuasion"), ("texts2", "emma")):
        (root / name).mkdir()
        (root / name / "a.txt").write_text(texts[novel][:30_000])
    (root / "cache").mkdir()
    return root


# ---------------------------------------------------------------------------------------------------- defect 6


def test_defect6_same_named_models_get_their_own_rows(place):
    out = place / "same_name.csv"
    ok(run("eval_ppl.py", "-m", str(place / "a" / "tiny"), "-m", str(place / "b" / "tiny"), "--lengths", "64", "128",
           "--dataset", str(place / "texts1"), "--output-file", str(out), "--no-plot", cache=place / "cache"))
    table = read_csv(out)
    assert len(table) == 2 and all(label.startswith("tiny#") for label in table), table
    first, second = table.values()
    assert first[64] != second[64]  # two models, two results (they used to share one row)
    keys = {json.loads(line)["key"] for line in out.with_name("same_name.results.jsonl").read_text().splitlines()}
    assert {label.split("#")[1] for label in table} == {key[:6] for key in keys}


def test_defect6_resume_reuses_only_results_of_the_same_content(place):
    out, cache = place / "resume.csv", place / "cache"
    common = ["--lengths", "64", "128", "--output-file", str(out), "--no-plot", "--resume"]
    model_a, texts1, texts2 = str(place / "a" / "tiny"), str(place / "texts1"), str(place / "texts2")
    ok(run("eval_ppl.py", "-m", model_a, "--dataset", texts1, *common, cache=cache))
    first = out.read_text()
    assert list(read_csv(out)) == ["tiny"]

    again = ok(run("eval_ppl.py", "-m", model_a, "--dataset", texts1, *common, cache=cache))
    assert "every length is already in" in again.stdout and out.read_text() == first
    # The same weights under another folder name are the same model: nothing to compute.
    renamed = ok(run("eval_ppl.py", "-m", str(place / "copy_of_a"), "--dataset", texts1, *common, cache=cache))
    assert "every length is already in" in renamed.stdout and out.read_text() == first

    # Another dataset, another model with the same folder name, another RoPE base: new results in rows of their own.
    other_data = ok(run("eval_ppl.py", "-m", model_a, "--dataset", texts2, *common, cache=cache))
    assert "already" not in other_data.stdout
    other_model = ok(run("eval_ppl.py", "-m", str(place / "b" / "tiny"), "--dataset", texts1, *common, cache=cache))
    assert "already" not in other_model.stdout
    rope = ok(run("eval_ppl.py", "-m", model_a, "--dataset", texts1, "--rope-theta", "1000", *common, cache=cache))
    assert "already" not in rope.stdout
    table = read_csv(out)
    assert len(table) == 4 and all(label.startswith("tiny#") for label in table), table
    values = [row[64] for row in table.values()]
    assert len(set(values)) == 4, values


def test_defect6_needle_results_are_keyed_on_the_haystack_and_the_model(place):
    out, cache = place / "needle", place / "cache"
    common = ["--lengths", "256", "--depths", "0.5", "--output-dir", str(out)]
    model_a, model_b = str(place / "a" / "tiny"), str(place / "b" / "tiny")
    ok(run("eval_needle.py", "-m", model_a, "--haystack-dir", str(place / "texts1"), *common, cache=cache))
    again = ok(run("eval_needle.py", "-m", model_a, "--haystack-dir", str(place / "texts1"), *common, cache=cache))
    assert "tiny: 0 trials to run, 1 already in" in again.stdout
    other = ok(run("eval_needle.py", "-m", model_a, "--haystack-dir", str(place / "texts2"), *common, cache=cache))
    assert "tiny: 1 trials to run, 0 already in" in other.stdout  # it used to report the texts1 result
    both = ok(run("eval_needle.py", "-m", model_a, "-m", model_b, "--haystack-dir", str(place / "texts2"), *common,
                  cache=cache))
    lines = [line for line in both.stdout.splitlines() if "trials to run" in line]
    assert len(lines) == 2 and "0 trials to run" in lines[0] and "1 trials to run" in lines[1], lines
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary) == 2 and all(label.startswith("tiny#") for label in summary), summary


# ---------------------------------------------------------------------------------------------------- defect 7


@pytest.mark.parametrize("script, args, fragment", [
    ("eval_ppl.py", ["--samples", "0"], "argument --samples/--num-samples: expected an integer >= 1, got 0"),
    ("eval_ppl.py", ["--lengths", "1"], "argument --lengths: expected an integer >= 2, got 1"),
    ("eval_ppl.py", ["--min-tokens", "4096", "--max-tokens", "1024"], "--min-tokens 4096 is above --max-tokens 1024"),
    ("eval_ppl.py", ["-m", "/nonexistent/model"], "cannot load the model '/nonexistent/model'"),
    ("eval_ppl.py", ["-m", "{a}", "--dataset", "{texts1}", "--lengths", "100000"], "fewer than 1 samples x 100001"),
    ("eval_needle.py", ["--rnd-number-digits", "0"], "argument --rnd-number-digits: expected an integer 1..30, got 0"),
    ("eval_needle.py", ["--depths", "1.5"], "argument --depths: expected a number 0..1, got 1.5"),
    ("eval_needle.py", ["--haystack-dir", "/nonexistent"], "no .txt files in /nonexistent"),
    ("eval_needle.py", ["-m", "{a}@zigzag_ring_attn", "--scoring", "generate"], "needs a KV cache"),
    ("eval_needle.py", ["--needle", "A needle without its number."], "has no {answer} placeholder"),
])
def test_defect7_eval_user_errors_are_one_line(place, tmp_path, script, args, fragment):
    args = [a.format(a=place / "a" / "tiny", texts1=place / "texts1") for a in args]
    out = ["--output-file", str(tmp_path / "ppl.csv")] if script == "eval_ppl.py" else ["--output-dir", str(tmp_path)]
    proc = run(script, *args, *out, cache=place / "cache")
    lines = [line for line in proc.stderr.splitlines() if f"{script}: error:" in line]
    assert proc.returncode == 2 and len(lines) == 1, (proc.returncode, proc.stderr[-3000:])
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------------------------------- defect 8


def test_defect8_easycontext_spellings_are_accepted(place, tmp_path):
    cache = place / "cache"
    proc = ok(run("eval_needle.py", "--model", str(place / "a" / "tiny"), "--max_context_length", "256",
                  "--min_context_length", "128", "--context_interval", "128", "--depth_interval", "0.5",
                  "--num_samples", "1", "--rnd_number_digits", "5", "--haystack_dir", str(place / "texts1"),
                  "--rope_theta", "20000", "--num_distractor", "1", "--output-dir", str(tmp_path / "needle"),
                  cache=cache))
    assert "6 trials to run" in proc.stdout
    records = [json.loads(line) for line in (tmp_path / "needle" / "trials.jsonl").read_text().splitlines()]
    assert {(r["length"], r["depth"]) for r in records} == {(n, d) for n in (128, 256) for d in (0.0, 0.5, 1.0)}
    assert all(r["rope_theta"] == 20000.0 and len(r["answer"]) == 5 for r in records)
    ok(run("eval_ppl.py", "-m", str(place / "a" / "tiny"), "-d", str(place / "texts1"), "--num_samples", "2",
           "--min-tokens", "64", "--max-tokens", "128", "--tokens-step", "64", "--chunk-size", "32",
           "--output-file", str(tmp_path / "ppl.csv"), "--no-plot", "--skip-done", cache=cache))
    assert list(read_csv(tmp_path / "ppl.csv").values())[0].keys() == {64, 128}


def test_defect8_eval_help_shows_ranges_defaults_and_shared_names(place):
    for script in ("eval_ppl.py", "eval_needle.py"):
        proc = subprocess.run([PYTHON, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
        text = " ".join(proc.stdout.split())
        assert proc.returncode == 0
        for expected in ("--min-tokens MIN_TOKENS, --min-context-length MIN_TOKENS",
                         "--samples SAMPLES, --num-samples SAMPLES", "--rope-theta ROPE_THETA",
                         "--dist-timeout SECONDS", "[range > 0, default: 600.0]"):
            assert expected in text, (script, expected)
    assert "--output-file OUTPUT_FILE, --output OUTPUT_FILE" in " ".join(
        subprocess.run([PYTHON, "eval_ppl.py", "--help"], cwd=ROOT, capture_output=True, text=True).stdout.split())


# ---------------------------------------------------------------------------------------------------- defect 5


@pytest.mark.slow
def test_defect5_a_stalled_rank_ends_an_evaluation_within_the_timeout(place, tmp_path):
    """eval_ppl.py on 2 processes (zigzag over both) with --dist-timeout 10: rank 1 is stopped after the first
    length is written; the run ends within the timeout + 60 s with a line naming the option."""
    out, timeout = tmp_path / "ppl.csv", 10
    results = tmp_path / "ppl.results.jsonl"
    env = dict(_env(place / "cache"), ACCELERATE_USE_CPU="true")
    cmd = [ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
           "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()), "eval_ppl.py",
           "-m", f"{place / 'a' / 'tiny'}@zigzag_ring_attn", "--dataset", str(ROOT / "assets" / "austen"),
           "--samples", "8", "--lengths", *[str(64 * i) for i in range(1, 65)], "--output-file", str(out), "--no-plot",
           "--dist-timeout", str(timeout)]
    launcher = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
    victim = None
    try:
        t0 = time.time()
        while not (results.exists() and results.read_text().strip()):
            assert launcher.poll() is None, launcher.communicate()
            assert time.time() - t0 < 240
            time.sleep(0.2)
        victim = _rank_pids_of(launcher.pid, b"eval_ppl.py")[1]
        os.kill(victim, signal.SIGSTOP)
        stopped_at = time.time()
        _, stderr = launcher.communicate(timeout=timeout + 120)
        elapsed = time.time() - stopped_at
    finally:
        if victim is not None:
            try:
                os.kill(victim, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()
    print(f"a stalled rank ended the 2-process evaluation {elapsed:.1f} s after SIGSTOP (--dist-timeout {timeout})")
    assert elapsed <= timeout + 60, elapsed
    lines = [line for line in stderr.splitlines() if "eval_ppl.py: error:" in line]
    assert len(lines) == 1 and f"did not answer within --dist-timeout {timeout} s" in lines[0], stderr[-3000:]
    assert launcher.returncode != 0


def _rank_pids_of(launcher_pid, script: bytes):
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    ranks, todo = {}, [launcher_pid]
    while todo:
        for pid in children.get(todo.pop(), []):
            todo.append(pid)
            try:
                environ = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
                cmdline = open(f"/proc/{pid}/cmdline", "rb").read()
            except OSError:
                continue
            env = dict(item.split(b"=", 1) for item in environ if b"=" in item)
            if script in cmdline and b"RANK" in env and b"LOCAL_RANK" in env:
                ranks[int(env[b"RANK"])] = pid
    return ranks
