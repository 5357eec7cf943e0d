"""Helpers behind ``train.py``: RoPE-base formulas, the data pipeline, sequence-parallel setup, the chunked-loss
model wrapper, atomic checkpoints and memory measurement.

``train.py`` reads top to bottom; everything here is the machinery it calls, each piece testable on its own.

Command line (the RoPE-base helper used by ``train_scripts/``)::

    python -m easy_context.training rope-base --formula scaling-law --original-base 1e4 \\
        --original-length 4096 --target-length 524288 [--head-dim 128]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

from . import run_safety as S
from .cli import UserError
from .loss import IGNORE_INDEX, chunked_cross_entropy_sum
from .methods import Method, get_method

__all__ = [
    "ntk_rope_base", "scaling_law_rope_base", "rope_base", "ROPE_FORMULAS", "get_rope_theta", "set_rope_theta",
    "load_documents", "tokenize_documents", "pack_documents", "global_batch_indices",
    "check_parallel_options", "setup_sequence_parallel", "model_path", "build_model", "enable_checkpointing",
    "CHECKPOINTING", "build_optimizer", "ChunkedLossModel",
    "save_checkpoint", "load_checkpoint", "latest_checkpoint", "save_final_model", "group_timeout",
    "on_main", "Run", "start_run", "run_signature", "release_locks", "check_resume", "load_resume",
    "padding_fraction", "warn_padding",
    "reset_peak_memory", "peak_memory_bytes", "PeakMemory",
]

# --------------------------------------------------------------------------------------------------------------
# RoPE base for a longer context
# --------------------------------------------------------------------------------------------------------------
#
# RoPE rotates channel pair i (of d/2) by position * base^(-2i/d). Raising the base slows every rotation, so the
# slowest channels stay inside the angles they saw in pre-training for longer inputs.


def ntk_rope_base(base: float, original_length: int, target_length: int, head_dim: int) -> float:
    """NTK-aware base (bloc97, 2023): ``base · s^(d/(d-2))`` with ``s = target_length / original_length``.

    Chosen so the slowest channel pair (i = d/2 - 1) is interpolated by exactly ``s`` (it turns by the same angle at
    ``target_length`` as before at ``original_length``) while the fastest pair is left untouched.
    """
    if head_dim <= 2:
        raise ValueError(f"head_dim must be > 2, got {head_dim}")
    scale = target_length / original_length
    return base * scale ** (head_dim / (head_dim - 2))


def scaling_law_rope_base(base: float, original_length: int, target_length: int) -> float:
    """Base from the scaling laws of RoPE extrapolation (Liu et al., 2023, arXiv:2310.05209).

    ``base' = base · (T/T₀)^(ln base / ln(T₀/2π))``, which equals ``base^(ln(T/2π) / ln(T₀/2π))``.

    Derivation: pre-training at length T₀ fully trains the channel pairs whose period ``2π·base^(2i/d)`` is at most
    T₀; the last of them (the *critical dimension*) sits at ``2i/d = log_base(T₀/2π)``. With a new base the period of
    that same channel becomes ``2π·base'^(log_base(T₀/2π))``; setting it equal to the target length T and solving
    for ``base'`` gives the formula. It is the smallest base whose trained channels cover T; EasyContext's empirical
    schedule uses larger bases (see train_scripts/).
    """
    if original_length <= 2 * math.pi:
        raise ValueError(f"original_length must exceed 2π, got {original_length}")
    return base ** (math.log(target_length / (2 * math.pi)) / math.log(original_length / (2 * math.pi)))


ROPE_FORMULAS = ("ntk", "scaling-law")


def rope_base(formula: str, base: float, original_length: int, target_length: int,
              head_dim: Optional[int] = None) -> float:
    """The RoPE base for ``target_length`` by ``formula`` (one of :data:`ROPE_FORMULAS`)."""
    if formula == "ntk":
        if head_dim is None:
            raise ValueError("the ntk formula needs --head-dim (hidden_size / num_attention_heads)")
        return ntk_rope_base(base, original_length, target_length, head_dim)
    if formula == "scaling-law":
        return scaling_law_rope_base(base, original_length, target_length)
    raise ValueError(f"unknown RoPE formula {formula!r}: choose one of {', '.join(ROPE_FORMULAS)}")


def get_rope_theta(config) -> Optional[float]:
    """RoPE base of a config: ``rope_parameters['rope_theta']`` (transformers 5) or ``rope_theta`` (4.x)."""
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and "rope_theta" in params:
        return float(params["rope_theta"])
    value = getattr(config, "rope_theta", None)
    return None if value is None else float(value)


def set_rope_theta(config, theta: float) -> None:
    """Set the RoPE base where this transformers version reads it (both places when both exist)."""
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict):
        params["rope_theta"] = float(theta)
    if hasattr(config, "rope_theta") or not isinstance(params, dict):
        config.rope_theta = float(theta)


# --------------------------------------------------------------------------------------------------------------
# Data: documents -> tokens -> fixed-length samples
# --------------------------------------------------------------------------------------------------------------

LOCAL_SUFFIXES = (".txt", ".jsonl", ".json", ".arrow", ".parquet")
Documents = Union[List[str], List[List[int]]]


def _is_local(spec: str) -> bool:
    return spec.startswith((".", "/", "~")) or spec.endswith(LOCAL_SUFFIXES) or os.path.exists(spec)


def _from_dataset(ds, text_field: str) -> Documents:
    if "input_ids" in ds.column_names:  # already tokenized (as EasyContext's SlimPajama upsamples are)
        return [list(x) for x in ds["input_ids"]]
    if text_field not in ds.column_names:
        raise ValueError(f"the dataset has no {text_field!r} column (columns: {ds.column_names}): pass --text-field")
    return list(ds[text_field])


def load_documents(spec: str, text_field: str = "text", split: str = "train") -> Documents:
    """Documents from ``spec``: strings, or token-id lists when the source has an ``input_ids`` column.

    ``spec`` is ``"austen"`` (the six novels fetched by ``scripts/setup.sh``, one document each); a local ``.txt``
    file (one document) or folder of ``.txt`` files (one document each); a ``.jsonl``/``.json`` file (one document per
    record, field ``text_field``); a ``.arrow``/``.parquet`` file or a folder written by ``Dataset.save_to_disk``; or
    else the name of a HuggingFace ``datasets`` dataset.
    """
    if spec == "austen":
        from .assets import austen_texts

        return list(austen_texts().values())
    if _is_local(spec):
        path = Path(spec).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"dataset path {spec} does not exist: pass an existing .txt/.jsonl/.arrow/"
                                    "/.parquet file or folder, a HuggingFace dataset name, or 'austen'")
        if path.is_dir() and (path / "dataset_info.json").exists():
            import datasets

            ds = datasets.load_from_disk(str(path))
            return _from_dataset(ds[split] if isinstance(ds, datasets.DatasetDict) else ds, text_field)
        if path.is_dir():
            files = sorted(path.glob("*.txt"))
            if not files:
                raise FileNotFoundError(f"dataset folder {spec} holds no .txt files and is not a saved dataset")
            return [f.read_text(encoding="utf-8") for f in files]
        if path.suffix == ".txt":
            return [path.read_text(encoding="utf-8")]
        if path.suffix in (".jsonl", ".json"):
            with open(path, encoding="utf-8") as f:
                records = [json.loads(line) for line in f if line.strip()]
            if any(text_field not in r for r in records):
                raise ValueError(f"every record of {spec} needs a {text_field!r} field (or pass --text-field)")
            return [r[text_field] for r in records]
        import datasets

        kind = "arrow" if path.suffix == ".arrow" else "parquet"
        return _from_dataset(datasets.load_dataset(kind, data_files=str(path), split="train"), text_field)
    import datasets

    try:
        ds = datasets.load_dataset(spec, split=split)
    except Exception as err:  # noqa: BLE001 - re-raised with the options that would have worked
        raise FileNotFoundError(f"cannot load dataset {spec!r}: it is neither a local path nor a loadable "
                                f"HuggingFace dataset ({type(err).__name__}: {err})") from err
    return _from_dataset(ds, text_field)


def tokenize_documents(docs: Documents, tokenizer) -> List[List[int]]:
    """Token ids of each document (no special tokens added); token-id documents pass through."""
    if docs and not isinstance(docs[0], str):
        return [list(d) for d in docs]
    return tokenizer(list(docs), add_special_tokens=False)["input_ids"]


def pack_documents(token_docs: Sequence[Sequence[int]], seq_length: int, eos_id: int, pad_id: int = 0, *,
                   pack: bool = True, reset_position_ids: bool = False) -> Dict[str, torch.Tensor]:
    """Cut documents into ``(N, seq_length)`` samples with next-token targets.

    Every document is followed by ``eos_id``. With ``pack`` the documents form one stream, cut every
    ``seq_length`` tokens; without it each document is cut on its own. ``target_ids[j]`` is the token after
    ``input_ids[j]``, so the last target of a sample is the first token of the next one. Targets never cross a
    document boundary (the end-of-document token predicts nothing) and the tail of a stream shorter than
    ``seq_length`` is padded with ``pad_id`` inputs and ``-100`` targets.

    ``position_ids`` count ``0..seq_length-1``, or, with ``reset_position_ids``, restart at each document start
    inside a sample (a sample that starts inside a document also starts at 0). Returns ``input_ids``,
    ``target_ids``, ``position_ids`` (int64) and ``doc_start`` (bool, True at the first token of a document).
    """
    if seq_length < 1:
        raise ValueError(f"seq_length must be positive, got {seq_length}")
    docs = [list(d) + [eos_id] for d in token_docs if len(d)]
    if not docs:
        raise ValueError("the dataset has no tokens: every document is empty")
    lengths = torch.tensor([len(d) for d in docs])
    if pack:  # one stream; documents start at the running offsets
        offsets = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)[:-1]])
        streams = [(torch.tensor([t for d in docs for t in d]), offsets)]
    else:
        streams = [(torch.tensor(d), lengths.new_zeros(1)) for d in docs]
    out: Dict[str, List[torch.Tensor]] = {"input_ids": [], "target_ids": [], "position_ids": [], "doc_start": []}
    for tokens, offsets in streams:
        starts = torch.zeros(len(tokens), dtype=torch.bool)
        starts[offsets] = True
        n = -(-len(tokens) // seq_length)
        total = n * seq_length
        pad = lambda x, value: torch.nn.functional.pad(x, (0, total - len(x)), value=value)  # noqa: E731
        inputs = pad(tokens, pad_id)
        targets = pad(tokens[1:].masked_fill(starts[1:], IGNORE_INDEX), IGNORE_INDEX)
        start_flags = pad(starts, False)
        idx = torch.arange(total)
        if reset_position_ids:
            last_start = torch.where(start_flags, idx, torch.zeros_like(idx)).cummax(0).values
            positions = idx - torch.maximum(last_start, idx // seq_length * seq_length)
        else:
            positions = idx % seq_length
        for key, value in zip(out, (inputs, targets, positions, start_flags)):
            out[key].append(value.view(n, seq_length))
    return {key: torch.cat(value) for key, value in out.items()}


def global_batch_indices(step: int, num_samples: int, global_batch: int, seed: int) -> torch.Tensor:
    """Sample indices of optimizer step ``step`` (0-based): ``global_batch`` consecutive entries of a stream of
    per-epoch permutations of ``range(num_samples)``, seeded by ``seed + epoch``.

    A pure function of the step, so the data position of a checkpoint is just its step number.
    """
    positions = step * global_batch + torch.arange(global_batch)
    epochs, within = positions // num_samples, positions % num_samples
    perms = {int(e): torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed + int(e)))
             for e in epochs.unique()}
    return torch.stack([perms[int(e)][int(i)] for e, i in zip(epochs, within)])


# --------------------------------------------------------------------------------------------------------------
# Parallel layout
# --------------------------------------------------------------------------------------------------------------


def check_parallel_options(method: Union[str, Method], world_size: int, sp_size: Optional[int], seq_length: int,
                           pad_to_multiple: bool = False, reset_position_ids: bool = False) -> int:
    """Validate the parallel options before anything heavy runs; returns the sequence-parallel size.

    ``sp_size`` defaults to the world size for sequence-parallel methods and is 1 otherwise.
    """
    m = get_method(method)
    if not m.is_sequence_parallel:
        if sp_size not in (None, 1):
            raise ValueError(f"--sp-size {sp_size} needs a sequence-parallel --parallel-mode; {m.name} shards no "
                             "sequence (use --sp-size 1 or e.g. --parallel-mode zigzag_ring_attn)")
        return 1
    sp_size = world_size if sp_size is None else sp_size
    if sp_size < 1 or world_size % sp_size:
        raise ValueError(f"--sp-size {sp_size} does not divide the world size {world_size} (the number of "
                         f"processes): choose a divisor of {world_size}, or launch a multiple of {sp_size} processes")
    if reset_position_ids:
        raise ValueError(f"--reset-position-ids needs attention masked across packed documents, which "
                         f"{m.name} cannot do (sequence-parallel attention is one causal span): use "
                         "--parallel-mode data_parallel, or drop --reset-position-ids")
    multiple = m.layout.multiple(sp_size)
    if seq_length % multiple and not pad_to_multiple:
        up = -(-seq_length // multiple) * multiple
        raise ValueError(f"--seq-length {seq_length} is not divisible by {multiple}, which {m.name} needs with "
                         f"--sp-size {sp_size}: use --seq-length {up} (or {up - multiple}), or pass "
                         "--pad-to-multiple to pad each sample with -100 targets")
    return sp_size


@contextlib.contextmanager
def group_timeout(seconds: Optional[float]):
    """Process groups created inside get ``seconds`` as their timeout instead of torch's default (30 minutes for
    gloo, 10 for NCCL).

    A group's timeout is fixed when it is created: gloo's point-to-point operations (the ring's ``batch_isend_irecv``)
    wait as long as the group's creation timeout, whatever is set later, so the sequence- and data-parallel groups
    must be born with ``--dist-timeout``.
    """
    if seconds is None:
        yield
        return
    import datetime

    import torch.distributed.distributed_c10d as c10d

    saved = c10d.default_pg_timeout, getattr(c10d, "default_pg_nccl_timeout", None)
    c10d.default_pg_timeout = datetime.timedelta(seconds=seconds)
    if saved[1] is not None:
        c10d.default_pg_nccl_timeout = c10d.default_pg_timeout
    try:
        yield
    finally:
        c10d.default_pg_timeout = saved[0]
        if saved[1] is not None:
            c10d.default_pg_nccl_timeout = saved[1]


def setup_sequence_parallel(method: Union[str, Method], sp_size: int, timeout: Optional[float] = None):
    """Split the processes into data-parallel replicas of ``sp_size`` consecutive ranks, make this process's replica
    the sequence-parallel group, and return ``(dp_rank, dp_size, sp_rank)``.

    Uses :func:`easy_context.mesh.setup_mesh` (a named (data × sequence) device mesh) when the package has it, else
    ``torch.distributed.new_group`` over consecutive ranks (the same layout). New groups wait at most ``timeout``
    seconds for the other processes (:func:`group_timeout`).
    """
    import torch.distributed as dist

    from . import mesh

    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    rank = dist.get_rank() if world > 1 else 0
    if get_method(method).is_sequence_parallel and world > 1:
        with group_timeout(timeout):
            if hasattr(mesh, "setup_mesh"):
                mesh.setup_mesh(sp_size)
            elif sp_size == world:
                mesh.set_sequence_parallel_group(None)
            else:
                for start in range(0, world, sp_size):  # every process creates every group, in the same order
                    group = dist.new_group(list(range(start, start + sp_size)))
                    if start <= rank < start + sp_size:
                        mesh.set_sequence_parallel_group(group)
    return rank // sp_size, world // sp_size, rank % sp_size


# --------------------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------------------

TINY_CONFIG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, tie_word_embeddings=False)


def model_path(spec: str) -> str:
    """Where ``from_pretrained`` finds ``spec``: the fetched SmolLM2 folder for ``"smollm2"``, else ``spec``."""
    if spec == "smollm2":
        from .assets import smollm2_path

        return str(smollm2_path())
    return spec


def build_model(spec: str, *, vocab_size: int, seq_length: int, rope_theta: Optional[float] = None,
                num_layers: Optional[int] = None, seed: int = 0, dtype=torch.float32):
    """A causal LM ready for long-context training.

    ``spec`` is ``"tiny"`` (a 2-layer Llama built from a config, for tests and demos), ``"smollm2"`` (the
    SmolLM2-135M fetched by ``scripts/setup.sh``), or a local folder / hub name for ``from_pretrained``.
    ``num_layers`` keeps only the first layers; ``rope_theta`` sets the RoPE base; ``max_position_embeddings`` is
    raised to ``seq_length`` when shorter. Both land in the config, so ``save_pretrained`` records them.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

    if spec == "tiny":
        config = LlamaConfig(vocab_size=vocab_size, max_position_embeddings=seq_length, **TINY_CONFIG)
    else:
        spec = model_path(spec)
        config = AutoConfig.from_pretrained(spec)
    if num_layers is not None:
        config.num_hidden_layers = num_layers
    if rope_theta is not None:
        set_rope_theta(config, rope_theta)
    config.max_position_embeddings = max(getattr(config, "max_position_embeddings", 0) or 0, seq_length)
    config.use_cache = False
    torch.manual_seed(seed)
    if spec == "tiny":  # the plain constructor: initialised identically with or without DeepSpeed's zero.Init
        from transformers import LlamaForCausalLM

        model = LlamaForCausalLM(config).to(dtype)
        model.set_attn_implementation("sdpa")
        return model
    return AutoModelForCausalLM.from_pretrained(spec, config=config, dtype=dtype, attn_implementation="sdpa")


CHECKPOINTING = ("full", "remat", "none")


def enable_checkpointing(model, mode: str = "full") -> None:
    """Activation checkpointing of every decoder layer (non-reentrant ``torch.utils.checkpoint``).

    ``"full"`` recomputes whole layers in backward, sequence-parallel attention (communication included) too;
    ``"remat"`` keeps each layer's attention output so the recomputation stops there (DistFlashAttn's
    rematerialization-aware checkpointing, :mod:`easy_context.checkpointing`); ``"none"`` keeps every activation.
    """
    if mode not in CHECKPOINTING:
        raise ValueError(f"unknown checkpointing mode {mode!r}: choose one of {', '.join(CHECKPOINTING)}")
    if mode == "none":
        return
    kwargs = {"use_reentrant": False}
    if mode == "remat":
        from .checkpointing import enable_remat_aware_checkpointing

        enable_remat_aware_checkpointing(model, kwargs)
    elif hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def build_optimizer(params, lr: float, weight_decay: float, accelerator):
    """AdamW for ``params``: DeepSpeed's ``DeepSpeedCPUAdam`` when DeepSpeed offloads the optimizer to CPU on a GPU
    machine (several times faster than ``torch.optim.AdamW`` stepping host tensors, and what DeepSpeed expects
    there), else ``torch.optim.AdamW``. On a CPU-only machine the DeepSpeed config must allow the torch optimizer
    with ``"zero_force_ds_cpu_optimizer": false`` (see accelerate_configs/zero3_offload_cpu.json).
    """
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    zero = plugin.deepspeed_config.get("zero_optimization", {}) if plugin is not None else {}
    if zero.get("offload_optimizer", {}).get("device") == "cpu" and torch.cuda.is_available():
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(params, lr=lr, weight_decay=weight_decay, adamw_mode=True)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


class ChunkedLossModel(torch.nn.Module):
    """``forward(input_ids, position_ids, target_ids) -> (loss sum, valid-target count)`` of a causal LM.

    Runs the decoder, then :func:`easy_context.chunked_cross_entropy_sum` over the output head ``chunk_size`` tokens
    at a time, so the ``tokens × vocab`` float32 logits never exist at once. One module owns the whole step, so
    DDP and DeepSpeed wrap it like any model; with ZeRO-3 pass ``zero3=True`` so the head weight (used outside the
    head's own forward) is gathered for this module.
    """

    def __init__(self, model, chunk_size: int = 4096, zero3: bool = False):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size
        if zero3:
            import deepspeed

            deepspeed.zero.register_external_parameter(self, model.get_output_embeddings().weight)

    def forward(self, input_ids, position_ids, target_ids):
        hidden = self.model.base_model(input_ids=input_ids, position_ids=position_ids, use_cache=False)[0]
        head = self.model.get_output_embeddings()
        return chunked_cross_entropy_sum(hidden, head.weight, target_ids, bias=head.bias, chunk_size=self.chunk_size)


# --------------------------------------------------------------------------------------------------------------
# Checkpoints: written to a temporary folder, flushed, then renamed into place
# --------------------------------------------------------------------------------------------------------------

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
        mode = 0o666 & ~S._umask()  # weights are written 0600 by the serializer; give them the usual mode
        for weights in output_dir.glob("model*.safetensors"):
            os.chmod(weights, mode)
    accelerator.wait_for_everyone()
    return output_dir


# --------------------------------------------------------------------------------------------------------------
# A run's safety: its output folder, its resume, its data (see easy_context/run_safety.py)
# --------------------------------------------------------------------------------------------------------------


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
        import torch.distributed as dist

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
    import uuid

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
    layout, the DeepSpeed stage and a fingerprint of the packed data."""
    layout = get_method(args.parallel_mode).layout
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return S.run_signature(args, num_processes=accelerator.num_processes, dp_size=dp_size, sp_size=sp_size,
                           layout=layout.name if layout is not None else "none", num_samples=len(data["input_ids"]),
                           data_fingerprint=S.fingerprint_tensors(*data.values()),
                           deepspeed_stage=plugin.zero_stage if plugin is not None else None)


PADDING_WARNING = 0.10


def padding_fraction(token_docs: Sequence[Sequence[int]], num_samples: int, sample_length: int) -> float:
    """The share of the ``num_samples × sample_length`` training tokens that are padding (documents are followed by
    one end-of-document token each, as :func:`pack_documents` does)."""
    real = sum(len(d) + 1 for d in token_docs if len(d))
    total = num_samples * sample_length
    return max(0.0, 1.0 - real / total) if total else 0.0


def warn_padding(token_docs, num_samples: int, seq_length: int, method=None, sp_size: int = 1,
                 pad_to_multiple: bool = False, prog: str = "train.py") -> float:
    """Print a warning on stderr (main process) when more than 10% of the training tokens are padding: the
    packing's tail and short documents, plus what ``--pad-to-multiple`` adds. Returns the share."""
    length = seq_length
    if pad_to_multiple and method is not None and get_method(method).layout is not None:
        multiple = get_method(method).layout.multiple(sp_size)
        length = -(-seq_length // multiple) * multiple
    share = padding_fraction(token_docs, num_samples, length)
    if share > PADDING_WARNING and os.environ.get("RANK", "0") == "0":
        real = sum(len(d) + 1 for d in token_docs if len(d))
        hint = (f"lower --seq-length (the data holds {real} tokens)" if num_samples == 1 else
                "pack documents (drop --no-pack), lower --seq-length, or add data")
        print(f"{prog}: warning: {share:.0%} of the training tokens are padding ({real} real tokens in {num_samples} "
              f"sample(s) of {length}): {hint}", file=sys.stderr, flush=True)
    return share


# --------------------------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------------------------


def _proc_status(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_peak_memory(device=None) -> None:
    """Start a new peak: CUDA's allocator statistics, or on Linux the process's peak resident set (VmHWM)."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_memory_bytes(device=None) -> int:
    """Peak memory since the last :func:`reset_peak_memory`: CUDA allocated bytes, else peak resident set size."""
    if device is not None and torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    peak = _proc_status("VmHWM")
    if peak is None:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return peak


class PeakMemory:
    """``with PeakMemory(device) as m: ...`` then ``m.peak`` (bytes) and ``m.extra`` (peak minus memory at entry)."""

    def __init__(self, device=None):
        self.device = device

    def __enter__(self):
        reset_peak_memory(self.device)
        if self.device is not None and torch.device(self.device).type == "cuda":
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            self.start = _proc_status("VmRSS") or 0
        return self

    def __exit__(self, *exc):
        self.peak = peak_memory_bytes(self.device)
        self.extra = self.peak - self.start
        return False


# --------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m easy_context.training")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("rope-base", help="print the RoPE base for a target context length")
    p.add_argument("--formula", choices=ROPE_FORMULAS, default="scaling-law")
    p.add_argument("--original-base", type=float, required=True, help="the model's pre-training RoPE base")
    p.add_argument("--original-length", type=int, required=True, help="the model's pre-training context length")
    p.add_argument("--target-length", type=int, required=True)
    p.add_argument("--head-dim", type=int, default=None, help="attention head dimension (ntk only)")
    args = parser.parse_args(argv)
    base = rope_base(args.formula, args.original_base, args.original_length, args.target_length, args.head_dim)
    print(f"{base:.6g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
