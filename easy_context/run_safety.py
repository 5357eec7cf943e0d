"""What keeps a training run's output folder safe: the lock, ownership, checkpoint manifests and resume checks.

``train.py`` calls these through :mod:`easy_context.training`; each piece works on plain folders and is tested on its
own (tests/test_safety*.py) and through the script.

* **Lock.** :class:`RunLock` holds ``<output-dir>/run.lock`` (an ``flock`` plus the holder's host and pid) for the
  whole run. A second run on the folder is refused at once, naming the holder; a lock left by a dead process is
  taken over.
* **Ownership.** :func:`claim_output_dir` refuses to start a new run in a folder that holds a previous one, unless
  ``--overwrite`` moves it aside into ``<output-dir>/previous/<time>/`` (nothing is deleted).
* **Integrity.** :func:`write_manifest` records every file's size and SHA-256 inside the checkpoint before its atomic
  rename; :func:`find_checkpoint` verifies it and falls back to the newest intact checkpoint.
* **Resume checks.** :func:`run_signature` describes what fixes the data order and the meaning of a step;
  :func:`compare_signatures` refuses a resume that would change them.
"""

from __future__ import annotations

import atexit
import datetime
import hashlib
import json
import os
import re
import socket
import sys
import tempfile
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

from .cli import UserError
from .methods import get_method

__all__ = ["RunLock", "release_locks", "claim_output_dir", "previous_run_entries", "move_aside", "write_manifest",
           "check_checkpoint",
           "find_checkpoint", "checkpoint_step", "checkpoints_in", "cut_log", "write_text_atomic",
           "run_signature", "compare_signatures", "fingerprint_tensors", "LOCK_NAME", "PREVIOUS", "MANIFEST"]

LOCK_NAME = "run.lock"
PREVIOUS = "previous"
MANIFEST = "manifest.json"
STATE_FILE = "trainer_state.json"
LATEST = "latest"
LOG = "log.jsonl"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def current_umask() -> int:
    """The process's umask."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_atomic(path: Union[str, Path], text: str) -> None:
    """Write ``text`` to ``path`` through a flushed temporary file and a rename, with the usual permissions
    (``0666 & ~umask``, not the ``0600`` of a temporary file)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------------------------------------------
# The lock
# --------------------------------------------------------------------------------------------------------------


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


_HELD: List["RunLock"] = []


def release_locks() -> None:
    """Release every lock this process holds (also run at exit, and by the scripts' error handler)."""
    for lock in list(_HELD):
        lock.release()


atexit.register(release_locks)


class RunLock:
    """``<folder>/run.lock``: an exclusive ``flock`` held for the life of the process, and a JSON record of the
    holder (host, pid, start time, command) for the messages.

    The kernel drops an ``flock`` when its process dies, so a lock file whose lock is free was left by a dead run
    and is taken over. Where the filesystem has no ``flock``, a holder on this host is checked by its pid; a holder
    on another host is trusted to be alive (the message says how to remove its lock).
    """

    def __init__(self, folder: Union[str, Path]):
        self.path = Path(folder) / LOCK_NAME
        self._fd: Optional[int] = None

    def _read(self) -> dict:
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def _busy_message(self, info: dict) -> str:
        who = f"pid {info.get('pid', '?')} on host {info.get('host', '?')}"
        since = f", started {info['started']}" if info.get("started") else ""
        return (f"output folder {self.path.parent} is in use by another run ({who}{since}): wait for it to end or "
                f"stop it, or choose another --output-dir (if that run is gone, delete {self.path})")

    def acquire(self) -> Optional[str]:
        """Take the lock; returns a note when a dead run's lock was taken over. Raises :class:`UserError` if
        another live run holds it."""
        import fcntl

        note = None
        for _ in range(20):  # retried when the file is replaced between open and flock
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666 & ~current_umask())
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                flocked = True
            except BlockingIOError:
                os.close(fd)
                raise UserError(self._busy_message(self._read())) from None
            except OSError:  # no flock on this filesystem: judge by the recorded holder
                flocked = False
            try:
                same_file = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same_file = False
            if not same_file:  # the previous holder removed the file after we opened it: start over
                os.close(fd)
                continue
            info = self._read()
            if info.get("pid") and (info.get("pid"), info.get("host")) != (os.getpid(), socket.gethostname()):
                here = info.get("host") == socket.gethostname()
                if not flocked and (not here or _pid_alive(int(info["pid"]))):
                    os.close(fd)
                    raise UserError(self._busy_message(info))
                note = (f"took over the lock of a run that is no longer running (pid {info.get('pid')} on host "
                        f"{info.get('host')}, started {info.get('started', '?')})")
            record = {"host": socket.gethostname(), "pid": os.getpid(),
                      "started": datetime.datetime.now().isoformat(timespec="seconds"),
                      "command": " ".join(sys.argv)}
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
            os.fsync(fd)
            self._fd = fd
            _HELD.append(self)
            return note
        raise UserError(f"could not lock {self.path}: it keeps being replaced by another process")

    def release(self) -> None:
        """Remove the lock file and drop the lock (idempotent)."""
        if self._fd is None:
            return
        try:
            if self._read().get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)
        finally:
            os.close(self._fd)
            self._fd = None
            if self in _HELD:
                _HELD.remove(self)

    @property
    def held(self) -> bool:
        return self._fd is not None


# --------------------------------------------------------------------------------------------------------------
# Ownership of the output folder
# --------------------------------------------------------------------------------------------------------------

# Top-level names a training run writes into its output folder (checkpoints, pointers, log, final model).
_RUN_FILES = re.compile(r"^(checkpoint-\d+|\.checkpoint-\d+\.tmp|latest|log\.jsonl|config\.json|"
                        r"generation_config\.json|model(-\d+-of-\d+)?\.safetensors|model\.safetensors\.index\.json|"
                        r"pytorch_model.*\.bin|tokenizer.*|special_tokens_map\.json|vocab\.json|merges\.txt|"
                        r"chat_template\.jinja|added_tokens\.json|easy-context)$")
_RUN_MARKERS = re.compile(r"^(checkpoint-\d+|\.checkpoint-\d+\.tmp|latest|log\.jsonl|model\.safetensors)$")


def previous_run_entries(folder: Union[str, Path]) -> List[Path]:
    """The files and folders a training run left in ``folder`` (empty when it holds no run)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    names = sorted(os.listdir(folder))
    if not any(_RUN_MARKERS.match(n) for n in names):
        return []
    names = [n for n in names if _RUN_MARKERS.match(n)] + [n for n in names if _RUN_FILES.match(n)
                                                           and not _RUN_MARKERS.match(n)]
    return [folder / n for n in names]


def move_aside(folder: Union[str, Path], entries: Sequence[Path]) -> Path:
    """Move ``entries`` (inside ``folder``) into a new ``folder/previous/<time>/`` and return it."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path(folder) / PREVIOUS
    target, n = base / stamp, 1
    while target.exists():
        n += 1
        target = base / f"{stamp}-{n}"
    target.mkdir(parents=True)
    for entry in entries:
        os.replace(entry, target / entry.name)
    return target


def _inside(path: Path, folder: Path) -> bool:
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def claim_output_dir(folder: Union[str, Path], *, resume: Optional[str], overwrite: bool) -> Tuple[RunLock, List[str]]:
    """Lock ``folder`` for this run and make sure the run may write there; returns the lock and notes to print.

    Starting without ``--resume`` (or resuming a checkpoint from another folder) where a previous run left its
    checkpoints, log or model is refused unless ``overwrite``, which moves them into ``previous/<time>/``.
    Call it on the main process only. Raises :class:`UserError` naming the fix.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create --output-dir {folder}: {err.strerror}; choose a writable folder") from None
    lock = RunLock(folder)
    note = lock.acquire()
    notes = [note] if note else []
    try:
        continuing = resume is not None and _inside(Path(resume), folder)
        if continuing and overwrite:
            raise UserError(f"--overwrite would move away the checkpoints that --resume {resume} continues from: "
                            "drop --overwrite to continue the run, or --resume to start afresh")
        previous = previous_run_entries(folder)
        if previous and not continuing:
            shown = ", ".join(p.name for p in previous[:4]) + (", ..." if len(previous) > 4 else "")
            if not overwrite:
                raise UserError(f"--output-dir {folder} holds a previous run ({shown}): pass --resume to continue "
                                f"it, --overwrite to move it into {folder / PREVIOUS}/ and start afresh, or choose "
                                "another --output-dir")
            target = move_aside(folder, previous)
            notes.append(f"--overwrite: moved the previous run ({shown}) to {target}")
    except BaseException:
        lock.release()
        raise
    return lock, notes


# --------------------------------------------------------------------------------------------------------------
# Checkpoint manifests
# --------------------------------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 23), b""):
            h.update(block)
    return h.hexdigest()


def _files(folder: Path) -> List[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(folder: Union[str, Path]) -> Path:
    """Record every file of ``folder`` (size and SHA-256) in ``folder/manifest.json``; write it last."""
    folder = Path(folder)
    files = {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)} for p in _files(folder)}
    write_text_atomic(folder / MANIFEST, json.dumps({"format": 1, "files": files}, indent=1))
    return folder / MANIFEST


def check_checkpoint(folder: Union[str, Path]) -> Tuple[Optional[str], bool]:
    """``(problem, verified)``: ``problem`` names the first broken or missing file (``None`` when intact);
    ``verified`` says a manifest was checked (checkpoints written before manifests existed have none)."""
    folder = Path(folder)
    if not folder.is_dir():
        return f"{folder.name} does not exist", False
    manifest = folder / MANIFEST
    verified = manifest.exists()
    if verified:
        try:
            files = json.loads(manifest.read_text())["files"]
            assert isinstance(files, dict) and files
        except (OSError, ValueError, KeyError, TypeError, AssertionError):
            return f"{MANIFEST} is unreadable", True
        for name, entry in files.items():
            path = folder / name
            if not path.is_file():
                return f"{name} is missing", True
            size = path.stat().st_size
            if size != entry.get("size"):
                return f"{name} has {size} bytes, the manifest says {entry.get('size')} (truncated?)", True
            if _sha256(path) != entry.get("sha256"):
                return f"{name} does not match its checksum (corrupted)", True
    try:
        state = json.loads((folder / STATE_FILE).read_text())
        int(state["step"])
    except FileNotFoundError:
        return f"{STATE_FILE} is missing", verified
    except (OSError, ValueError, KeyError, TypeError):
        return f"{STATE_FILE} is unreadable", verified
    return None, verified


def checkpoint_step(path: Path) -> Optional[int]:
    m = _CHECKPOINT.match(path.name)
    return int(m.group(1)) if m else None


def checkpoints_in(folder: Union[str, Path]) -> List[Path]:
    """``checkpoint-<step>`` folders directly in ``folder``, newest (highest step) first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and checkpoint_step(p) is not None]
    return sorted(found, key=checkpoint_step, reverse=True)


def find_checkpoint(path: Union[str, Path]) -> Tuple[Path, List[str]]:
    """The checkpoint ``--resume PATH`` means, verified; returns it and notes to print.

    ``PATH`` is a ``checkpoint-<step>`` folder (used only if intact) or an output folder, whose newest intact
    checkpoint is used: a damaged one is skipped with a note naming the broken file. Raises :class:`UserError` when
    there is none.
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"--resume {path}: no such folder; pass an output folder (its newest intact checkpoint is "
                        "used) or one of its checkpoint-<step> folders, or start without --resume")
    if checkpoint_step(path) is not None or (path / STATE_FILE).exists() or (path / MANIFEST).exists():
        problem, verified = check_checkpoint(path)
        if problem:
            raise UserError(f"checkpoint {path} is damaged: {problem}. Pass its output folder {path.parent} to "
                            "resume from the newest intact checkpoint instead")
        return path, [] if verified else [f"{path} has no {MANIFEST} (an older checkpoint): not verified"]
    notes: List[str] = []
    latest = path / LATEST
    if latest.exists():
        name = latest.read_text().strip()
        if not name or checkpoint_step(Path(name)) is None or not (path / name).is_dir():
            named = repr(name) if name else "nothing"
            notes.append(f"{latest} names {named}, not a checkpoint here: looking for the newest one")
    candidates = checkpoints_in(path)
    if not candidates:
        raise UserError(f"--resume {path}: no checkpoint-<step> folder there (--save-every and --stop-at write "
                        "them): start without --resume, or pass the folder that holds the checkpoints")
    problems = []
    for candidate in candidates:
        problem, verified = check_checkpoint(candidate)
        if problem is None:
            if not verified:
                notes.append(f"{candidate} has no {MANIFEST} (an older checkpoint): not verified")
            return candidate, notes
        problems.append(f"{candidate.name}: {problem}")
        notes.append(f"{candidate.name} is damaged ({problem}): falling back to an older checkpoint")
    raise UserError(f"no intact checkpoint in {path} ({'; '.join(problems)}): start afresh with --overwrite, "
                    "which keeps them in previous/")


def cut_log(path: Union[str, Path], step: int) -> int:
    """Drop the lines of a ``log.jsonl`` whose ``step`` is after ``step`` (atomically); returns how many."""
    path = Path(path)
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            after = json.loads(line).get("step", 0) > step
        except (ValueError, AttributeError, TypeError):
            after = True  # a line cut short by a crash
        if after:
            dropped += 1
        else:
            kept.append(line + "\n")
    if dropped:
        write_text_atomic(path, "".join(kept))
    return dropped


# --------------------------------------------------------------------------------------------------------------
# What a resume must keep
# --------------------------------------------------------------------------------------------------------------


def fingerprint_tensors(*tensors) -> str:
    """SHA-256 (first 16 hex digits) of tensors' shapes, dtypes and contents."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


# Options that shape the packed data (signature key, option): judged by the data's fingerprint when the checkpoint
# has one (a dataset moved to another path is the same data), by the option itself otherwise.
_DATA_OPTIONS = (("dataset", "--dataset"), ("text_field", "--text-field"), ("no_pack", "--no-pack"),
                 ("reset_position_ids", "--reset-position-ids"), ("tokenizer", "--tokenizer"),
                 ("seq_length", "--seq-length"))
# Options that order the data without changing it.
_ORDER_OPTIONS = (("seed", "--seed"),)
# Options that change which weights the checkpoint's state belongs to.
_MODEL_OPTIONS = (("model", "--model"), ("num_layers", "--num-layers"), ("rope_theta", "--rope-theta"))
# Options that may change freely (reported, not refused).
_FREE = ("learning_rate", "warmup_steps", "weight_decay", "max_grad_norm", "steps", "save_every", "loss_chunk_size",
         "checkpointing", "wandb", "tensorboard", "pad_to_multiple", "keep_checkpoints", "dist_timeout",
         "batch_size", "grad_accum", "sp_size", "parallel_mode")


def run_signature(args, *, num_processes: int, dp_size: int, sp_size: int, layout: str, num_samples: int,
                  data_fingerprint: str, deepspeed_stage: Optional[int]) -> dict:
    """What a checkpoint must agree on with the run that resumes it (saved in ``trainer_state.json``)."""
    options = {key: getattr(args, key) for key, _ in _DATA_OPTIONS + _ORDER_OPTIONS + _MODEL_OPTIONS}
    return dict(options, global_batch=args.batch_size * dp_size * args.grad_accum, batch_size=args.batch_size,
                grad_accum=args.grad_accum, num_processes=num_processes, dp_size=dp_size, sp_size=sp_size,
                layout=layout, parallel_mode=args.parallel_mode, num_samples=num_samples,
                data_fingerprint=data_fingerprint, deepspeed=deepspeed_stage)


def _legacy_signature(state: dict) -> dict:
    """A signature rebuilt from a checkpoint saved before signatures existed (its options and data position)."""
    args = state.get("args", {})
    sig = {key: args.get(key) for key, _ in _DATA_OPTIONS + _ORDER_OPTIONS + _MODEL_OPTIONS}
    step = state.get("step") or 0
    if step and state.get("data_position") is not None:
        sig["global_batch"] = state["data_position"] // step
    sig.update(batch_size=args.get("batch_size"), grad_accum=args.get("grad_accum"),
               parallel_mode=args.get("parallel_mode"))
    try:
        layout = get_method(args.get("parallel_mode")).layout
        sig["layout"] = layout.name if layout is not None else "none"
    except Exception:  # noqa: BLE001 - unknown method: not compared
        pass
    return sig


def _show(value) -> str:
    return "unset" if value is None else ("on" if value is True else "off" if value is False else str(value))


def compare_signatures(saved_state: dict, now: dict, args=None) -> Tuple[List[str], List[str]]:
    """``(refusals, notes)`` for resuming ``saved_state`` (a ``trainer_state.json``) with signature ``now``.

    Refused: a change of the data (options or content), of the global batch, of the sequence layout, of the model,
    or of the process count under DeepSpeed (its partitions are per process). Notes: changes that keep the data
    position exact (another process count with the same global batch) and, given the new ``args``, options that
    may change freely.
    """
    saved = saved_state.get("run") or _legacy_signature(saved_state)
    refusals, notes = [], []

    def changed(options):
        return [(key, option) for key, option in options if key in saved and saved[key] != now[key]]

    def refuse(key, option, why):
        refusals.append(f"{option} {_show(now[key])} differs from the checkpoint's {_show(saved[key])} "
                        f"(it {why}): resume with {option} {_show(saved[key])}")

    data_options = changed(_DATA_OPTIONS)
    same_data = saved.get("data_fingerprint") is not None and saved["data_fingerprint"] == now["data_fingerprint"]
    for key, option in data_options:
        if same_data:
            notes.append(f"{option} is {_show(now[key])} (the checkpoint's run had {_show(saved[key])}); the "
                         "packed data is the same")
        else:
            refuse(key, option, "re-cuts the data")
    if not data_options and saved.get("data_fingerprint") is not None and not same_data:
        refusals.append("the dataset's content differs from the checkpoint's (same options, other tokens): resume "
                        "on the data the run started with")
    for key, option in changed(_ORDER_OPTIONS):
        refuse(key, option, "re-orders the data")
    for key, option in changed(_MODEL_OPTIONS):
        refuse(key, option, "changes the model")
    if saved.get("global_batch") is not None and saved["global_batch"] != now["global_batch"]:
        changed = [f"{opt} {saved.get(key)} -> {now[key]}" for key, opt in
                   (("batch_size", "--batch-size"), ("grad_accum", "--grad-accum"), ("dp_size", "data-parallel size"))
                   if saved.get(key) is not None and saved.get(key) != now[key]]
        refusals.append(f"the global batch (--batch-size x data-parallel size x --grad-accum) would change from "
                        f"{saved['global_batch']} to {now['global_batch']} ({', '.join(changed) or 'processes'}), "
                        f"which changes what a step is: keep it {saved['global_batch']}")
    if saved.get("layout") is not None and saved["layout"] != now["layout"]:
        refusals.append(f"--parallel-mode {now['parallel_mode']} lays sequences out {now['layout']}, the "
                        f"checkpoint's {saved.get('parallel_mode')} {saved['layout']}: resume with a "
                        f"{saved['layout']}-layout method")
    if "deepspeed" in saved and (saved["deepspeed"] is None) != (now["deepspeed"] is None):
        with_ = "with" if saved["deepspeed"] is not None else "without"
        refusals.append(f"the checkpoint was written {with_} DeepSpeed: resume {with_} it")
    elif saved.get("deepspeed") is not None and saved.get("num_processes") != now["num_processes"]:
        refusals.append(f"the DeepSpeed checkpoint holds partitions of {saved.get('num_processes')} processes: "
                        f"resume on {saved.get('num_processes')} processes")
    if not refusals and saved.get("num_processes") not in (None, now["num_processes"]):
        n = now["num_processes"]
        notes.append(f"resuming on {n} process{'es' if n != 1 else ''} (the checkpoint was written by "
                     f"{saved['num_processes']}): the global batch of {now['global_batch']} keeps the data order")
    old_args = saved_state.get("args", {})
    for key in _FREE if args is not None else ():
        if key in old_args and hasattr(args, key) and old_args[key] != getattr(args, key):
            notes.append(f"--{key.replace('_', '-')} is {_show(getattr(args, key))} "
                         f"(the checkpoint's run had {_show(old_args[key])})")
    return refusals, notes
