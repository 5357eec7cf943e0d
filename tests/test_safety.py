"""train.py keeps users' work safe: output folders, locks, resume checks, damaged checkpoints, stalled ranks, the CLI.

Every test runs the real script (``python train.py`` for one process, ``accelerate launch`` with 2 gloo processes
where processes matter) on the tiny 2-layer model with 128-token sequences, and checks exit codes, the one-line
error on stderr and the files left behind. Issue 11's numbered defects map to the tests named ``test_defect<N>_*``.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distributed import free_port

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
ACCELERATE = str(Path(sys.executable).with_name("accelerate"))
TINY = ["--model", "tiny", "--seq-length", "128", "--checkpointing", "none", "--learning-rate", "1e-3", "--seed", "3"]

pytestmark = pytest.mark.skipif(
    not (ROOT / "assets" / "smollm2-135m" / "tokenizer.json").exists(),
    reason="needs the SmolLM2 tokenizer fetched by scripts/setup.sh")


def _env():
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env.pop("ACCELERATE_USE_CPU", None)
    return env


def _command(args, processes=1):
    if processes == 1:
        return [PYTHON, "train.py", *args]
    return [ACCELERATE, "launch", "--config_file", "accelerate_configs/cpu_2proc.yaml", "--main_process_port",
            str(free_port()), "train.py", *args]


def train(*args, processes=1, timeout=300):
    return subprocess.run(_command(list(args), processes), cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=timeout)


def ok(proc):
    assert proc.returncode == 0, f"train.py failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def error_lines(proc):
    return [line for line in proc.stderr.splitlines() if "train.py: error:" in line]


def assert_user_error(proc, fragment, processes=1):
    """Exit code 2 (the launcher's own code with 2 processes), one line on stderr naming ``fragment``, no
    traceback of the script."""
    lines = error_lines(proc)
    assert len(lines) == 1, f"expected one error line, got {lines}\n{proc.stderr[-4000:]}"
    assert fragment in lines[0], lines[0]
    if processes == 1:
        assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
        assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    else:
        assert proc.returncode != 0
        assert 'File "' + str(ROOT / "train.py") not in proc.stderr and "easy_context/" not in proc.stderr
    return lines[0]


def log_steps(out):
    return [json.loads(line)["step"] for line in (Path(out) / "log.jsonl").read_text().splitlines()]


def losses(out):
    return {json.loads(line)["step"]: json.loads(line)["loss"] for line in (Path(out) / "log.jsonl").read_text()
            .splitlines()}


@pytest.fixture(scope="module")
def stopped(tmp_path_factory, dataset):
    """A 1-process run stopped after step 2 of 3 (checkpoints 1 and 2), as if interrupted."""
    out = tmp_path_factory.mktemp("stopped")
    ok(train(*TINY, "--dataset", dataset, "--grad-accum", "2", "--steps", "3", "--save-every", "1", "--stop-at", "2",
             "--output-dir", str(out)))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    return out


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, dataset):
    out = tmp_path_factory.mktemp("uninterrupted")
    ok(train(*TINY, "--dataset", dataset, "--grad-accum", "2", "--steps", "3", "--output-dir", str(out)))
    return losses(out)


def copy_run(src, dst):
    shutil.copytree(src, dst, dirs_exist_ok=True)
    return dst


# ---------------------------------------------------------------------------------------------------- defect 1


def test_defect1_a_used_output_folder_is_refused_and_overwrite_moves_it_aside(tmp_path, dataset):
    """A new run in a folder holding a run used to delete its own newest checkpoint (pruning across runs). Now it is
    refused, --overwrite moves the old run into previous/<time>/, and the new run's checkpoints, latest and resume
    all work. EasyContext's spellings are used for the options of the new run."""
    out = tmp_path / "run"
    ok(train(*TINY, "--dataset", dataset, "--steps", "3", "--save-every", "1", "--output-dir", str(out)))
    before = sorted(os.listdir(out))
    assert {"checkpoint-2", "checkpoint-3", "latest", "log.jsonl", "model.safetensors"} <= set(before)

    refused = train(*TINY, "--dataset", dataset, "--steps", "2", "--save-every", "1", "--output-dir", str(out))
    line = assert_user_error(refused, "holds a previous run")
    assert "--resume" in line and "--overwrite" in line
    assert sorted(os.listdir(out)) == before  # nothing touched

    fresh = ok(train(*TINY, "--dataset", dataset, "--max-train-steps", "2", "--checkpointing-steps", "1",
                     "--parallel_mode", "zigzag_ring_attn", "--overwrite", "--output-dir", str(out)))
    assert "moved the previous run" in fresh.stdout
    (aside,) = (out / "previous").iterdir()
    assert {"checkpoint-2", "checkpoint-3", "latest", "log.jsonl", "model.safetensors"} <= set(os.listdir(aside))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert (out / (out / "latest").read_text().strip()).is_dir()
    assert log_steps(out) == [1, 2]

    ok(train(*TINY, "--dataset", dataset, "--steps", "3", "--save-every", "1", "--output-dir", str(out),
             "--resume-from-checkpoint"))
    assert log_steps(out) == [1, 2, 3]
    assert (out / "latest").read_text().strip() == "checkpoint-3"
    mode = (out / "latest").stat().st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask, oct(mode)  # was 0600
    assert not (out / "run.lock").exists()


def test_pruning_touches_only_this_runs_checkpoints(tmp_path):
    """save_checkpoint keeps the newest checkpoints of its own run and leaves any other checkpoint alone."""
    import torch
    from accelerate import Accelerator

    from easy_context import training as T

    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(4, 3)
    model, optimizer = accelerator.prepare(model, torch.optim.AdamW(model.parameters()))
    T.save_checkpoint(accelerator, tmp_path, 10, {"data_position": 10}, keep=2, run_id="other-run")
    for step in (1, 2, 3):
        T.save_checkpoint(accelerator, tmp_path, step, {"data_position": step}, keep=2, run_id="this-run")
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-10", "checkpoint-2", "checkpoint-3"]
    assert (tmp_path / "latest").read_text() == "checkpoint-3"
    manifest = json.loads((tmp_path / "checkpoint-3" / "manifest.json").read_text())["files"]
    assert {"trainer_state.json", "pytorch_model.bin", "optimizer.bin"} <= set(manifest)


# ---------------------------------------------------------------------------------------------------- defects 2, 5


def _descendants(pid):
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _rank_pids(launcher_pid):
    """``{rank: pid}`` of the train.py processes an ``accelerate launch`` started."""
    ranks = {}
    for pid in _descendants(launcher_pid):
        try:
            environ = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
            cmdline = open(f"/proc/{pid}/cmdline", "rb").read()
        except OSError:
            continue
        env = dict(item.split(b"=", 1) for item in environ if b"=" in item)
        if b"train.py" in cmdline and b"RANK" in env and b"LOCAL_RANK" in env:
            ranks[int(env[b"RANK"])] = pid
    return ranks


def test_defect2_and_5_a_run_owns_its_folder_and_a_stalled_rank_ends_it(tmp_path, dataset):
    """While a 2-process run trains, a second run on its folder is refused at once, naming the first run's host and
    pid. Then one of its ranks is stopped (SIGSTOP): the run ends within --dist-timeout + 60 s with a line naming
    the timeout, and its lock is released."""
    out, timeout = tmp_path / "run", 20
    launcher = subprocess.Popen(
        _command([*TINY, "--dataset", dataset, "--steps", "1000000", "--dist-timeout", str(timeout), "--output-dir",
                  str(out)], processes=2),
        cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    ranks = {}
    try:
        t0 = time.time()
        while not ((out / "log.jsonl").exists() and len((out / "log.jsonl").read_text().splitlines()) >= 2):
            assert launcher.poll() is None, launcher.communicate()
            assert time.time() - t0 < 240, "the run did not start training"
            time.sleep(0.5)
        ranks = _rank_pids(launcher.pid)
        assert sorted(ranks) == [0, 1], ranks
        holder = json.loads((out / "run.lock").read_text())
        assert holder["pid"] == ranks[0] and holder["host"] == socket.gethostname()

        started = time.time()
        second = train(*TINY, "--dataset", dataset, "--steps", "2", "--output-dir", str(out), "--overwrite")
        line = assert_user_error(second, f"pid {ranks[0]} on host {socket.gethostname()}")
        assert "in use by another run" in line
        print(f"second run refused in {time.time() - started:.1f} s")
        assert launcher.poll() is None  # the first run goes on

        os.kill(ranks[1], signal.SIGSTOP)
        stopped_at = time.time()
        _, stderr = launcher.communicate(timeout=timeout + 120)
        elapsed = time.time() - stopped_at
    finally:
        for pid in ranks.values():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()
    print(f"a stalled rank ended the 2-process run {elapsed:.1f} s after SIGSTOP (--dist-timeout {timeout})")
    assert elapsed <= timeout + 60, elapsed
    assert launcher.returncode != 0
    lines = [line for line in stderr.splitlines() if "train.py: error:" in line]
    assert len(lines) == 1 and f"did not answer within --dist-timeout {timeout} s" in lines[0], stderr[-4000:]
    assert not (out / "run.lock").exists()  # released by the rank that stopped the run


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path, dataset):
    out = tmp_path / "run"
    out.mkdir()
    dead = subprocess.Popen(["true"])
    dead.wait()
    (out / "run.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "started": "then"}))
    proc = ok(train(*TINY, "--dataset", dataset, "--steps", "1", "--output-dir", str(out)))
    assert f"took over the lock of a run that is no longer running (pid {dead.pid}" in proc.stdout
    assert not (out / "run.lock").exists()


# ---------------------------------------------------------------------------------------------------- defect 3


@pytest.mark.parametrize("extra, fragment", [
    (["--seq-length", "256"], "--seq-length 256 differs from the checkpoint's 128"),
    (["--grad-accum", "1"], "the global batch (--batch-size x data-parallel size x --grad-accum) would change "
                            "from 2 to 1"),
    (["--batch-size", "2"], "would change from 2 to 4"),
    (["--parallel-mode", "ring_attn"], "lays sequences out contiguous, the checkpoint's zigzag_ring_attn zigzag"),
    (["--seed", "4"], "--seed 4 differs from the checkpoint's 3"),
    (["--num-layers", "1"], "--num-layers 1 differs from the checkpoint's unset"),
])
def test_defect3_resume_refuses_options_that_change_the_data_or_the_step(tmp_path, dataset, stopped, extra,
                                                                          fragment):
    out = copy_run(stopped, tmp_path / "run")
    log = (out / "log.jsonl").read_text()
    args = {**dict(zip(TINY[::2], TINY[1::2])), "--grad-accum": "2"}
    for key, value in zip(extra[::2], extra[1::2]):
        args[key] = value
    flat = [x for item in args.items() for x in item]
    proc = train(*flat, "--dataset", dataset, "--steps", "3", "--save-every", "1", "--output-dir", str(out),
                 "--resume")
    line = assert_user_error(proc, fragment)
    assert line.startswith(f"train.py: error: cannot resume from {out / 'checkpoint-2'}")
    assert (out / "log.jsonl").read_text() == log and not (out / "checkpoint-3").exists()


def test_defect3_resume_refuses_a_dataset_whose_content_changed(tmp_path, dataset):
    data = tmp_path / "data.jsonl"
    shutil.copy(dataset, data)
    out = tmp_path / "run"
    ok(train(*TINY, "--dataset", str(data), "--steps", "2", "--stop-at", "1", "--output-dir", str(out)))
    data.write_text(data.read_text().replace("the", "a"))
    proc = train(*TINY, "--dataset", str(data), "--steps", "2", "--output-dir", str(out), "--resume")
    assert_user_error(proc, "the dataset's content differs from the checkpoint's")


# ---------------------------------------------------------------------------------------------------- defect 4


def test_defect4_a_truncated_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, dataset, stopped,
                                                                           uninterrupted):
    out = copy_run(stopped, tmp_path / "run")
    weights = out / "checkpoint-2" / "pytorch_model.bin"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    proc = ok(train(*TINY, "--dataset", dataset, "--grad-accum", "2", "--steps", "3", "--save-every", "1",
                    "--output-dir", str(out), "--resume", str(out)))
    text = proc.stdout + proc.stderr
    assert "checkpoint-2 is damaged (pytorch_model.bin has" in text and "(truncated?)" in text
    assert f"resumed from {out / 'checkpoint-1'} at step 1" in text
    assert log_steps(out) == [1, 2, 3]  # the log was cut back to step 1 before steps 2 and 3 were trained again
    assert losses(out) == uninterrupted  # bit for bit
    assert (out / "previous").is_dir()  # the damaged checkpoint-2 was moved aside, not deleted


def test_defect4_garbage_state_and_empty_latest_fall_back_with_a_message(tmp_path, dataset, stopped):
    out = copy_run(stopped, tmp_path / "run")
    (out / "checkpoint-2" / "trainer_state.json").write_text("{garbage")
    (out / "latest").write_text("")
    proc = ok(train(*TINY, "--dataset", dataset, "--grad-accum", "2", "--steps", "2", "--output-dir", str(out),
                    "--resume"))
    assert "latest names nothing, not a checkpoint here" in proc.stdout
    assert "checkpoint-2 is damaged (trainer_state.json has" in proc.stdout
    assert "resumed from" in proc.stdout and "checkpoint-1 at step 1" in proc.stdout


def test_defect4_no_intact_checkpoint_is_one_clear_line(tmp_path, dataset, stopped):
    out = copy_run(stopped, tmp_path / "run")
    for name in ("checkpoint-1", "checkpoint-2"):
        (out / name / "optimizer.bin").write_bytes(b"")
    proc = train(*TINY, "--dataset", dataset, "--grad-accum", "2", "--steps", "3", "--output-dir", str(out),
                 "--resume")
    assert_user_error(proc, "no intact checkpoint in")
    named = train(*TINY, "--dataset", dataset, "--grad-accum", "2", "--steps", "3", "--output-dir", str(out),
                  "--resume", str(out / "checkpoint-2"))
    assert_user_error(named, "checkpoint-2 is damaged: optimizer.bin has 0 bytes")


# ---------------------------------------------------------------------------------------------------- defect 7


@pytest.mark.parametrize("option, value", [("--seq-length", "0"), ("--batch-size", "0"), ("--grad-accum", "0"),
                                           ("--loss-chunk-size", "0"), ("--steps", "0"), ("--num-layers", "0")])
def test_defect7_nonsense_numbers_are_refused_by_the_parser(tmp_path, option, value):
    proc = train(option, value, "--output-dir", str(tmp_path / "run"))
    assert_user_error(proc, f"argument {option}")
    assert f"expected an integer >= 1, got {value}" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_defect7_resume_without_a_checkpoint_is_one_clear_line(tmp_path, dataset):
    proc = train(*TINY, "--dataset", dataset, "--steps", "1", "--output-dir", str(tmp_path), "--resume")
    assert_user_error(proc, "no checkpoint-<step> folder there")
    proc = train(*TINY, "--dataset", dataset, "--steps", "1", "--output-dir", str(tmp_path), "--resume",
                 str(tmp_path / "nowhere"))
    assert_user_error(proc, "no such folder")


def test_defect7_mostly_padding_warns(tmp_path, dataset):
    proc = ok(train(*TINY, "--dataset", dataset, "--seq-length", "4096", "--loss-chunk-size", "512", "--steps", "1",
                    "--output-dir", str(tmp_path)))
    (line,) = [line for line in proc.stderr.splitlines() if "train.py: warning:" in line]
    assert "of the training tokens are padding" in line and "lower --seq-length" in line
    share = int(line.split("warning: ")[1].split("%")[0])
    assert 30 < share < 60, line  # about 2.4K tokens in one 4096-token sample


def test_defect7_log_has_no_duplicate_steps_after_a_resume(tmp_path, dataset, stopped):
    """A crash after step 3 was logged but before it was checkpointed: resuming from step 2 trains step 3 again and
    the log keeps one line per step."""
    out = copy_run(stopped, tmp_path / "run")
    with open(out / "log.jsonl", "a") as f:
        f.write(json.dumps({"step": 3, "loss": 1.0}) + "\n" + '{"step": 4, "lo')  # and a line cut short
    proc = ok(train(*TINY, "--dataset", dataset, "--grad-accum", "2", "--steps", "3", "--output-dir", str(out),
                    "--resume"))
    assert "cut 2 line(s) after step 2" in proc.stdout
    assert log_steps(out) == [1, 2, 3]


# ---------------------------------------------------------------------------------------------------- defect 8


def test_defect8_help_shows_ranges_defaults_and_aliases():
    proc = subprocess.run([PYTHON, "train.py", "--help"], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=120)
    text = " ".join(proc.stdout.split())
    assert proc.returncode == 0
    for expected in ("--seq-length SEQ_LENGTH tokens per training sequence [range >= 1, default: 2048]",
                     "--grad-accum GRAD_ACCUM, --gradient-accumulate-every GRAD_ACCUM",
                     "--steps STEPS, --max-train-steps STEPS", "--resume [PATH], --resume-from-checkpoint [PATH]",
                     "--dist-timeout SECONDS", "[range > 0, default: 600.0]", "[default: zigzag_ring_attn]",
                     "Options also take underscores (--parallel_mode)"):
        assert expected in text, expected
