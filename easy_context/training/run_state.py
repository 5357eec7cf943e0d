"""A training run's saved state and safety: atomic checkpoints, the final model, the output folder's lock, resume.

The checkpoints here are saved run state (model, optimizer, scheduler, RNG, data position); activation
recomputation is :mod:`easy_context.checkpointing`. The guarantees themselves are in :mod:`easy_context.run_safety`.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import torch
import torch.distributed as dist

from .. import run_safety as S
from ..cli import UserError
from ..methods import get_method

__all__ = ["save_checkpoint", "load_checkpoint", "latest_checkpoint", "save_final_model", "on_main", "Run",
           "start_run", "check_resume", "load_resume", "release_locks", "run_signature", "STATE_FILE", "LATEST"]


STATE_FILE = "trainer_state.json"
LATEST = "latest"


def _fsync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    for path in [*sorted(p for p in folder.rglob("*") if p.is_dir()), folder]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _run_id_of(checkpoint: Path) -> Optional[str]:
    try:
        return json.loads((checkpoint / STATE_FILE).read_text()).get("run_id")
    except (OSError, ValueError, AttributeError):
        return "unreadable"  # never matches a run: a checkpoint that cannot be read is not pruned


def save_checkpoint(accelerator, output_dir: Union[str, Path], step: int, state: dict, keep: int = 2,
                    run_id: Optional[str] = None) -> Path:
    """Save model, optimizer, registered objects (the scheduler) and every process's RNG as ``checkpoint-<step>``.

    All processes write into ``.checkpoint-<step>.tmp`` (DeepSpeed writes its partitions from every rank); the main
    process then writes ``trainer_state.json`` (``state``: the step, the data position, the options, ``run_id``)
    and, last, ``manifest.json`` (every file's size and SHA-256), fsyncs the folder, renames it into place and
    points ``latest`` at it, so a crash at any moment leaves the previous checkpoint intact and a damaged one is
    detected on resume. Of this run's checkpoints (those saved with ``run_id``) only the ``keep`` newest are kept;
    other checkpoints in the folder are never touched.
    """
    output_dir = Path(output_dir)
    final, tmp = output_dir / f"checkpoint-{step}", output_dir / f".checkpoint-{step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=False)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps(dict(state, step=step, run_id=run_id), indent=1))
        S.write_manifest(tmp)
        _fsync_tree(tmp)
        if final.exists():  # never deleted: kept aside
            S.move_aside(output_dir, [final])
        os.replace(tmp, final)
        S.write_text_atomic(output_dir / LATEST, final.name)
        ours = [p for p in S.checkpoints_in(output_dir) if p != final and _run_id_of(p) == run_id]
        for old in ours[max(0, keep - 1):]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def latest_checkpoint(path: Union[str, Path]) -> Path:
    """The checkpoint folder ``path`` names: a ``checkpoint-<step>`` folder, or an output folder with ``latest``."""
    path = Path(path)
    if (path / STATE_FILE).exists():
        return path
    if (path / LATEST).exists():
        return path / (path / LATEST).read_text().strip()
    raise FileNotFoundError(f"no checkpoint at {path}: pass a checkpoint-<step> folder or an output folder holding "
                            f"'{LATEST}' (written by --save-every)")


def load_checkpoint(accelerator, path: Union[str, Path]) -> dict:
    """Restore what :func:`save_checkpoint` saved; returns its ``trainer_state.json``."""
    folder = latest_checkpoint(path)
    accelerator.load_state(str(folder))
    return json.loads((folder / STATE_FILE).read_text())


def save_final_model(accelerator, wrapped, tokenizer, output_dir: Union[str, Path]) -> Path:
    """``save_pretrained`` of the trained model (gathered from ZeRO-3 partitions when needed) and the tokenizer."""
    output_dir = Path(output_dir)
    state = accelerator.get_state_dict(wrapped)  # collective under ZeRO-3: every process calls it
    model = accelerator.unwrap_model(wrapped).model
    if accelerator.is_main_process:
        state = {k[len("model."):]: v for k, v in state.items()}
        model.config.use_cache = True  # training turned the KV cache off; generation wants it back
        model.save_pretrained(output_dir, state_dict=state, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(output_dir)
        mode = 0o666 & ~S.current_umask()  # weights are written 0600 by the serializer; give them the usual mode
        for weights in output_dir.glob("model*.safetensors"):
            os.chmod(weights, mode)
    accelerator.wait_for_everyone()
    return output_dir



def on_main(accelerator, fn):
    """Run ``fn()`` on the main process only; every process returns its (picklable) result, or raises the
    :class:`~easy_context.cli.UserError` it raised, so all processes take the same decision."""
    result, error = None, None
    if accelerator.is_main_process:
        try:
            result = fn()
        except UserError as err:
            error = str(err)
    if accelerator.num_processes > 1:
        box = [(result, error)]
        dist.broadcast_object_list(box, src=0)
        result, error = box[0]
    if error is not None:
        raise UserError(error)
    return result


@dataclass
class Run:
    """This run's output folder and identity (``run_id`` marks its checkpoints; a resume carries it on)."""

    output_dir: Path
    run_id: str
    notes: List[str] = field(default_factory=list)


def start_run(accelerator, output_dir: Union[str, Path], *, resume: Optional[str], overwrite: bool) -> Run:
    """Lock ``output_dir`` for this run (:func:`easy_context.run_safety.claim_output_dir`) on the main process,
    and agree on the outcome on every process: a folder in use, or holding a previous run without ``--overwrite``,
    is a :class:`~easy_context.cli.UserError` everywhere."""
    def claim():
        _, notes = S.claim_output_dir(output_dir, resume=resume, overwrite=overwrite)
        return uuid.uuid4().hex[:12], notes

    run_id, notes = on_main(accelerator, claim)
    for note in notes:
        accelerator.print(f"note: {note}", flush=True)
    return Run(Path(output_dir), run_id, notes)


def check_resume(accelerator, run: Run, path: str, signature: dict, args=None) -> Tuple[str, int]:
    """Pick the checkpoint ``--resume path`` means (verified, falling back past damaged ones) and refuse it when
    the new options would change the data order or the meaning of a step; returns ``(folder, step)``."""

    def check():
        folder, notes = S.find_checkpoint(path)
        state = json.loads((folder / STATE_FILE).read_text())
        refusals, changes = S.compare_signatures(state, signature, args)
        if refusals:
            raise UserError(f"cannot resume from {folder}: {'; '.join(refusals)}")
        return str(folder), int(state["step"]), state.get("run_id"), notes + changes

    folder, step, run_id, notes = on_main(accelerator, check)
    for note in notes:
        accelerator.print(f"note: {note}", flush=True)
    run.run_id = run_id or run.run_id
    return folder, step


def load_resume(accelerator, run: Run, folder: str, step: int) -> int:
    """Restore the checkpoint chosen by :func:`check_resume`, then, in this run's folder, cut ``log.jsonl`` back to
    its step and move checkpoints newer than it into ``previous/`` (they belong to the abandoned continuation)."""
    try:
        accelerator.load_state(folder)
    except Exception as err:  # noqa: BLE001 - reported as one line
        raise UserError(f"cannot load checkpoint {folder} ({type(err).__name__}: {str(err)[:200]}): resume from "
                        "an older checkpoint by passing it to --resume", everywhere=True) from None
    if accelerator.is_main_process:
        dropped = S.cut_log(run.output_dir / "log.jsonl", step)
        newer = [p for p in S.checkpoints_in(run.output_dir) if S.checkpoint_step(p) > step]
        if newer:
            aside = S.move_aside(run.output_dir, newer)
            accelerator.print(f"note: moved {', '.join(p.name for p in newer)} (after step {step}) to {aside}")
        if Path(folder).parent.resolve() == run.output_dir.resolve():
            S.write_text_atomic(run.output_dir / LATEST, Path(folder).name)
        if dropped:
            accelerator.print(f"note: cut {dropped} line(s) after step {step} from {run.output_dir / 'log.jsonl'}")
    accelerator.wait_for_everyone()
    return step


release_locks = S.release_locks


def run_signature(args, accelerator, dp_size: int, sp_size: int, data: Dict[str, torch.Tensor]) -> dict:
    """:func:`easy_context.run_safety.run_signature` of a ``train.py`` run: its options, processes, the method's
    layout, the DeepSpeed stage and a fingerprint of the packed data (a
    :class:`~easy_context.training.corpus.PackedSamples` brings its own, from the content and the packing options)."""
    layout = get_method(args.parallel_mode).layout
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return S.run_signature(args, num_processes=accelerator.num_processes, dp_size=dp_size, sp_size=sp_size,
                           layout=layout.name if layout is not None else "none", num_samples=len(data["input_ids"]),
                           data_fingerprint=getattr(data, "fingerprint", None) or S.fingerprint_tensors(*data.values()),
                           deepspeed_stage=plugin.zero_stage if plugin is not None else None)
