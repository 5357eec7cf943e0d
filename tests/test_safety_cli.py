"""The pieces behind the scripts' safety, on their own: the option parser, the lock, manifests, resume signatures,
and the benchmarks' shared option names. Fast (no model)."""

import json
import os
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest

from easy_context import cli
from easy_context import run_safety as S

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


# ---------------------------------------------------------------------------------------------------- the parser


def _parser():
    p = cli.Parser(prog="x.py")
    p.add_argument("--seq-length", type=cli.int_range(1), default=2048, help="tokens")
    p.add_argument("--depth", type=cli.float_range(0, 1), default=0.5)
    p.add_argument("--grad-accum", "--gradient-accumulate-every", type=cli.int_range(1), default=1)
    return p


def test_parser_accepts_underscores_and_declared_aliases():
    args = _parser().parse_args(["--seq_length", "64", "--gradient_accumulate_every=3", "--depth", "1"])
    assert (args.seq_length, args.grad_accum, args.depth) == (64, 3, 1.0)


def test_parser_errors_are_one_line_with_exit_code_2(capfd):
    for argv, message in [(["--seq-length", "0"], "argument --seq-length: expected an integer >= 1, got 0"),
                          (["--depth", "nan"], "argument --depth: expected a finite number 0..1, got 'nan'"),
                          (["--seq_len", "5"], "unrecognized arguments: --seq_len 5"),  # no abbreviations
                          (["--depth", "x"], "expected a number 0..1, got 'x'")]:
        with pytest.raises(SystemExit) as exit_info:
            _parser().parse_args(argv)
        assert exit_info.value.code == 2
        err = capfd.readouterr().err
        assert err.count("\n") == 1 and err.startswith("x.py: error: ") and message in err, err
        assert "(see x.py --help)" in err


def test_help_shows_ranges_and_defaults():
    text = " ".join(_parser().format_help().split())
    assert "--seq-length SEQ_LENGTH tokens [range >= 1, default: 2048]" in text
    assert "--depth DEPTH [range 0..1, default: 0.5]" in text


def test_error_handler_turns_errors_into_one_line(tmp_path):
    code = ("import sys; from easy_context import cli; cli.install_error_handler('y.py', dist_timeout=7); "
            "kind = sys.argv[1]\n"
            "if kind == 'user': raise cli.UserError('the problem: the fix')\n"
            "if kind == 'timeout': raise RuntimeError('[gloo] Timed out waiting 7000ms for recv operation')\n"
            "if kind == 'peer': raise RuntimeError('[gloo] Connection closed by peer [127.0.0.1]:1234')\n"
            "raise KeyError('a bug')\n")
    for kind, rc, text in [("user", 2, "y.py: error: the problem: the fix"),
                           ("timeout", 3, "did not answer within --dist-timeout 7 s"),
                           ("peer", 3, "lost the connection to another process"),
                           ("bug", 1, "KeyError: 'a bug'")]:
        proc = subprocess.run([PYTHON, "-c", code, kind], capture_output=True, text=True, cwd=ROOT)
        assert proc.returncode == rc and text in proc.stderr, (kind, proc.returncode, proc.stderr)
        assert ("Traceback" in proc.stderr) == (kind == "bug")


# ---------------------------------------------------------------------------------------------------- the lock


def test_lock_refuses_a_live_holder_and_takes_over_a_dead_one(tmp_path):
    holder = subprocess.Popen([PYTHON, "-c", "import sys, time; from easy_context import run_safety as S; "
                               f"S.RunLock({str(tmp_path)!r}).acquire(); print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(cli.UserError, match=f"in use by another run \\(pid {holder.pid} on host"):
            S.RunLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()
    lock = S.RunLock(tmp_path)
    note = lock.acquire()  # the killed holder's flock is gone; its record is still there
    assert f"took over the lock of a run that is no longer running (pid {holder.pid}" in note
    assert json.loads((tmp_path / "run.lock").read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / "run.lock").exists()


def test_claim_moves_a_previous_run_aside_only_with_overwrite(tmp_path):
    (tmp_path / "checkpoint-3").mkdir()
    (tmp_path / "log.jsonl").write_text("{}\n")
    (tmp_path / "notes.txt").write_text("mine")  # not a run's file: never moved
    with pytest.raises(cli.UserError, match="holds a previous run \\(checkpoint-3, log.jsonl\\)"):
        S.claim_output_dir(tmp_path, resume=None, overwrite=False)
    assert not (tmp_path / "run.lock").exists()
    with pytest.raises(cli.UserError, match="--overwrite would move away the checkpoints"):
        S.claim_output_dir(tmp_path, resume=str(tmp_path), overwrite=True)
    lock, notes = S.claim_output_dir(tmp_path, resume=None, overwrite=True)
    lock.release()
    (aside,) = (tmp_path / "previous").iterdir()
    assert sorted(os.listdir(aside)) == ["checkpoint-3", "log.jsonl"] and (tmp_path / "notes.txt").exists()
    assert str(aside) in notes[0]


# ---------------------------------------------------------------------------------------------------- checkpoints


def _checkpoint(folder, step=2):
    folder.mkdir(parents=True)
    (folder / "model.bin").write_bytes(bytes(range(256)) * 4)
    (folder / "trainer_state.json").write_text(json.dumps({"step": step}))
    S.write_manifest(folder)
    return folder


def test_manifest_catches_truncation_corruption_and_missing_files(tmp_path):
    ckpt = _checkpoint(tmp_path / "checkpoint-2")
    assert S.check_checkpoint(ckpt) == (None, True)
    data = bytearray((ckpt / "model.bin").read_bytes())
    data[10] ^= 1
    (ckpt / "model.bin").write_bytes(bytes(data))
    assert S.check_checkpoint(ckpt)[0] == "model.bin does not match its checksum (corrupted)"
    (ckpt / "model.bin").write_bytes(bytes(data[:100]))
    assert "model.bin has 100 bytes, the manifest says 1024" in S.check_checkpoint(ckpt)[0]
    (ckpt / "model.bin").unlink()
    assert S.check_checkpoint(ckpt)[0] == "model.bin is missing"


def test_find_checkpoint_falls_back_past_damaged_ones(tmp_path):
    _checkpoint(tmp_path / "checkpoint-1", 1)
    _checkpoint(tmp_path / "checkpoint-2", 2)
    (tmp_path / "checkpoint-2" / "manifest.json").write_text("")
    (tmp_path / "latest").write_text("checkpoint-9")
    folder, notes = S.find_checkpoint(tmp_path)
    assert folder.name == "checkpoint-1"
    assert any("names 'checkpoint-9', not a checkpoint here" in n for n in notes)
    assert any("checkpoint-2 is damaged (manifest.json is unreadable)" in n for n in notes)


def test_cut_log_keeps_the_steps_up_to_the_checkpoint(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps({"step": s}) + "\n" for s in (1, 2, 3, 4)) + '{"step": 5, "lo')
    assert S.cut_log(log, 2) == 3
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2]
    assert S.cut_log(log, 2) == 0


def test_signatures_of_old_checkpoints_are_still_compared():
    """A checkpoint written before signatures existed has its options and data position: the global batch is the
    data position over the step."""
    old = {"step": 2, "data_position": 8, "args": {"seq_length": 128, "seed": 0, "parallel_mode": "zigzag_ring_attn",
                                                    "dataset": "austen", "batch_size": 1, "grad_accum": 4}}
    args = Namespace(dataset="austen", text_field="text", no_pack=False, reset_position_ids=False, tokenizer=None,
                     seq_length=128, seed=0, model="tiny", num_layers=None, rope_theta=None, batch_size=1,
                     grad_accum=2, parallel_mode="ring_attn")
    now = S.run_signature(args, num_processes=1, dp_size=1, sp_size=1, layout="contiguous", num_samples=9,
                          data_fingerprint="x", deepspeed_stage=None)
    refusals, _ = S.compare_signatures(old, now, args)
    assert any("would change from 4 to 2" in r for r in refusals)
    assert any("lays sequences out contiguous, the checkpoint's zigzag_ring_attn zigzag" in r for r in refusals)


def test_write_text_atomic_uses_the_umask_not_0600(tmp_path):
    S.write_text_atomic(tmp_path / "latest", "checkpoint-1")
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "latest").stat().st_mode & 0o777 == 0o666 & ~umask


def test_group_timeout_applies_to_groups_created_inside_only():
    import datetime

    import torch.distributed.distributed_c10d as c10d

    from easy_context.training import group_timeout

    before = c10d.default_pg_timeout
    with group_timeout(12):
        assert c10d.default_pg_timeout == datetime.timedelta(seconds=12)
    assert c10d.default_pg_timeout == before


# ---------------------------------------------------------------------------------------------------- benchmarks


@pytest.mark.parametrize("script, names", [
    ("attention_scaling.py", ["--lengths LENGTHS [LENGTHS ...], --seq-lens", "--output-file OUTPUT_FILE, --output"]),
    ("dca_passkey.py", ["--max-new-tokens MAX_NEW_TOKENS, --new-tokens", "--output-dir DIR, --out DIR"]),
    ("dca_perplexity.py", ["--dca-chunk-size CHUNK_SIZE, --chunk-size", "--output-dir DIR, --out DIR"]),
    ("loss_memory.py", ["--loss-chunk-size CHUNK, --chunk CHUNK"]),
])
def test_benchmarks_use_the_shared_names_and_keep_the_old_ones(script, names):
    proc = subprocess.run([PYTHON, f"benchmarks/{script}", "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    text = " ".join(proc.stdout.split())
    assert proc.returncode == 0 and "default:" in text
    for name in names:
        assert name in text, (script, name)
    bad = subprocess.run([PYTHON, f"benchmarks/{script}", "--lengths", "0"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.count("error:") == 1 and "Traceback" not in bad.stderr, bad.stderr


def _now(**changes):
    values = dict(dataset="austen", text_field="text", no_pack=False, reset_position_ids=False, tokenizer=None,
                  seq_length=128, seed=0, model="tiny", num_layers=None, rope_theta=None, batch_size=1,
                  grad_accum=2, parallel_mode="zigzag_ring_attn")
    values.update(changes.pop("args", {}))
    args = Namespace(**values)
    sig = dict(num_processes=2, dp_size=1, sp_size=2, layout="zigzag", num_samples=9, data_fingerprint="d1",
               deepspeed_stage=None)
    sig.update(changes)
    return S.run_signature(args, **sig), args


def test_a_moved_dataset_with_the_same_tokens_resumes_and_deepspeed_keeps_its_process_count():
    saved, _ = _now()
    moved, args = _now(args={"dataset": "/elsewhere/austen.jsonl"})
    refusals, notes = S.compare_signatures({"run": saved, "args": {}}, moved, args)
    assert refusals == [] and any("--dataset is /elsewhere/austen.jsonl" in n for n in notes)
    edited, args = _now(args={"dataset": "/elsewhere/austen.jsonl"}, data_fingerprint="d2")
    refusals, _ = S.compare_signatures({"run": saved, "args": {}}, edited, args)
    assert refusals and "--dataset /elsewhere/austen.jsonl differs" in refusals[0]
    one_process, args = _now(num_processes=1, sp_size=1)
    refusals, notes = S.compare_signatures({"run": saved, "args": {}}, one_process, args)
    assert refusals == [] and "resuming on 1 process (the checkpoint was written by 2)" in notes[0]
    zero3, _ = _now(deepspeed_stage=3)
    zero3_one, args = _now(deepspeed_stage=3, num_processes=1, sp_size=1)
    refusals, _ = S.compare_signatures({"run": zero3, "args": {}}, zero3_one, args)
    assert refusals == ["the DeepSpeed checkpoint holds partitions of 2 processes: resume on 2 processes"]
    refusals, _ = S.compare_signatures({"run": saved, "args": {}}, zero3, args)
    assert refusals == ["the checkpoint was written without DeepSpeed: resume without it"]
