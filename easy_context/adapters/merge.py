"""Merge a LoRA adapter into a model and carry the long-context config into the merged model.

The merge streams the target's safetensors shards one tensor at a time: every tensor the adapter touches becomes
``W + scaling * B @ A`` (``(B @ A)ᵀ`` for embedding factors), or is replaced by the adapter's copy (PEFT
``modules_to_save`` and ``bias="lora_only"`` biases), and is written in the target's dtype into the same shard
layout. Memory stays at about one tensor whatever the model's size.

The merged ``config.json`` is the target's, with the tuned model's long-context values from ``long_context.json``
(RoPE base, RoPE scaling, ``max_position_embeddings``) written in. When the target's RoPE settings differ from the
adapter's base (merging into another fine-tune of that base), an :class:`AdapterWarning` says what the target had
and what was written.

Tied embeddings are merged once: an adapter extracted from a model whose LM head shares the input embedding
changes that one matrix, and the merged model keeps the tie. (PEFT's own ``merge_and_unload`` with
``ensure_weight_tying`` adds such a change twice.)
"""

from __future__ import annotations

import json
import math
import re
import shutil
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

from . import longcontext as lc
from ._safetensors import INDEX_FILE, Checkpoint, ShardWriter
from .extract import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PEFT_PREFIX, _stderr
from .plan import AdapterError, AdapterWarning, check_same_architecture, meta_model, module_specs, tied_map

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".msgpack", ".h5", ".ckpt")
UNSUPPORTED = {"use_dora": "DoRA", "fan_in_fan_out": "fan_in_fan_out (Conv1D) layers",
               "layer_replication": "layer replication", "target_parameters": "target_parameters",
               "use_qalora": "QA-LoRA", "use_bdlora": "BD-LoRA", "alora_invocation_tokens": "aLoRA",
               "trainable_token_indices": "trainable tokens"}


@dataclass
class _Op:
    """What the adapter does to one tensor of the target."""

    tensor: str
    kind: str  # "lora" (W + s·B@A), "embedding" (W + s·(B@A)ᵀ), "replace" (by A), "add" (s·A: lora_B.bias)
    A: Optional[str] = None  # adapter tensor names
    B: Optional[str] = None
    scaling: float = 1.0
    module: str = ""


def _pattern_key(patterns, name: str) -> Optional[str]:
    """PEFT's rule for rank_pattern / alpha_pattern keys: the key matches the end of the module name."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return None


def read_adapter(folder: Path):
    """``(adapter_config dict, Checkpoint of its weights, long_context sidecar or None)``."""
    folder = Path(folder)
    if not (folder / ADAPTER_CONFIG).is_file():
        raise FileNotFoundError(f"{folder}: no {ADAPTER_CONFIG} (expected a PEFT adapter folder)")
    config = json.loads((folder / ADAPTER_CONFIG).read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{folder}: a {config.get('peft_type')} adapter; only LoRA adapters can be merged here")
    for key, what in UNSUPPORTED.items():
        if config.get(key):
            raise AdapterError(f"{folder}: the adapter uses {what} ({key}={config[key]!r}), which this merge does not "
                               f"support; merge it with PEFT's merge_and_unload instead")
    if not (folder / ADAPTER_WEIGHTS).is_file():
        raise FileNotFoundError(f"{folder}: no {ADAPTER_WEIGHTS}")
    weights = Checkpoint(folder, files=[ADAPTER_WEIGHTS])
    sidecar = None
    if (folder / lc.SIDECAR).is_file():
        sidecar = json.loads((folder / lc.SIDECAR).read_text())
    return config, weights, sidecar


def _plan_ops(config: dict, weights: Checkpoint) -> Dict[str, _Op]:
    """Group the adapter's tensors by the target tensor they change."""
    ops: Dict[str, _Op] = {}
    lora: Dict[str, Dict[str, str]] = {}
    for key in weights.names():
        if not key.startswith(PEFT_PREFIX):
            raise AdapterError(f"{key}: unexpected adapter tensor name (PEFT names start with {PEFT_PREFIX!r})")
        name = key[len(PEFT_PREFIX):]
        m = re.match(r"^(.*)\.(lora_A\.weight|lora_B\.weight|lora_B\.bias|lora_embedding_A|lora_embedding_B|"
                     r"base_layer\.bias)$", name)
        if m:
            lora.setdefault(m.group(1), {})[m.group(2)] = key
        elif ".lora_" in name or name.endswith(("lora_magnitude_vector", ".base_layer.weight")):
            raise AdapterError(f"{key}: an adapter tensor this merge does not know")
        else:  # modules_to_save: the tuned tensor itself
            ops[name] = _Op(name, "replace", A=key)
    r_default, alpha_default = config.get("r", 8), config.get("lora_alpha", 8)
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    for module, parts in lora.items():
        if "base_layer.bias" in parts:
            ops[f"{module}.bias"] = _Op(f"{module}.bias", "replace", A=parts["base_layer.bias"])
        if "lora_B.bias" in parts:  # lora_bias=True: the bias change, scaled like the weights' change
            if "base_layer.bias" in parts:
                raise AdapterError(f"{parts['lora_B.bias']}: the adapter holds both a bias and a bias change")
        if "lora_A.weight" in parts or "lora_B.weight" in parts:
            kind, a, b = "lora", parts.get("lora_A.weight"), parts.get("lora_B.weight")
        elif "lora_embedding_A" in parts or "lora_embedding_B" in parts:
            kind, a, b = "embedding", parts.get("lora_embedding_A"), parts.get("lora_embedding_B")
        else:
            continue
        if a is None or b is None:
            raise AdapterError(f"{PEFT_PREFIX}{module}: the adapter holds only one of its two LoRA factors")
        rk = _pattern_key(rank_pattern, module)
        ak = _pattern_key(alpha_pattern, module)
        r = rank_pattern[rk] if rk is not None else r_default
        alpha = alpha_pattern[ak] if ak is not None else alpha_default
        actual = weights.info(a).shape[0]
        if actual != r:
            raise AdapterError(f"{a}: rank {actual} but adapter_config.json says r={r} for {module}")
        scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        ops[f"{module}.weight"] = _Op(f"{module}.weight", kind, A=a, B=b, scaling=scaling, module=module)
        if "lora_B.bias" in parts:
            ops[f"{module}.bias"] = _Op(f"{module}.bias", "add", A=parts["lora_B.bias"], scaling=scaling)
    return ops


def _delta(op: _Op, weights: Checkpoint) -> torch.Tensor:
    A, B = weights.read(op.A, torch.float32), weights.read(op.B, torch.float32)
    d = B @ A
    if op.kind == "embedding":
        d = d.t()
    return d.mul_(op.scaling)


def apply_adapter(model, adapter, out, *, overwrite: bool = False, progress: bool = True,
                  log: Optional[Callable[[str], None]] = _stderr) -> dict:
    """Merge the LoRA adapter in ``adapter`` into the model folder ``model`` and write the result to ``out``.

    The merged config carries the adapter's long-context values (``long_context.json``). Raises
    :class:`AdapterError` for mismatched architectures, shapes or tied weights (naming the tensor), and warns
    with :class:`AdapterWarning` when the target's RoPE settings differ from the adapter's base. Returns a dict
    with the values written and the tensors changed.
    """
    log = log or (lambda msg: None)
    model, adapter, out = Path(model), Path(adapter), Path(out)
    from transformers import AutoConfig

    target_raw = lc.read_config_json(model)
    config, weights, sidecar = read_adapter(adapter)
    if sidecar is not None:
        check_same_architecture(sidecar["base"]["architecture"], target_raw, f"the adapter's base "
                                f"({sidecar['base']['model']})", f"the model ({model})")
    target_cfg = AutoConfig.from_pretrained(model)
    specs = module_specs(meta_model(target_cfg))
    target_ties = tied_map(specs)
    ckpt = Checkpoint(model)
    ops = _plan_ops(config, weights)

    # Ties: a change to a tied tensor must be representable in the target.
    base_arch = sidecar["base"]["architecture"] if sidecar else {}
    tuned_arch = sidecar["tuned"]["architecture"] if sidecar else {}
    untie: Dict[str, str] = {}
    for alias, source in target_ties.items():
        if alias not in ops:
            continue
        if base_arch.get("tie_word_embeddings") and tuned_arch.get("tie_word_embeddings") is False:
            untie[alias] = source  # the fine-tune untied them: so does the merged model
        else:
            raise AdapterError(f"{alias}: the model at {model} ties it to {source} (tie_word_embeddings=true), but "
                               f"the adapter "
                               f"changes it separately (its base did not tie them); merge into an untied copy of "
                               f"the model")
    adapter_ties = sidecar.get("ties", {}).get("tuned", {}) if sidecar else {}
    for alias, source in adapter_ties.items():
        if source in ops and alias in ckpt and alias not in target_ties:
            raise AdapterError(f"{alias}: the adapter's model ties it to {source}, whose change the adapter carries "
                               f"once for both, but the model at {model} stores {alias} separately "
                               f"(tie_word_embeddings=false); merge into a model with tied embeddings")

    # Every changed tensor must exist in the target with the adapter's shape.
    for name, op in ops.items():
        stored = name if name in ckpt else (untie.get(name) or target_ties.get(name))
        if stored is None or stored not in ckpt:
            raise AdapterError(f"{name}: changed by the adapter but not in the model at {model}")
        shape = tuple(ckpt.info(stored).shape)
        if op.kind in ("replace", "add"):
            got = tuple(weights.info(op.A).shape)
        else:
            a, b = weights.info(op.A).shape, weights.info(op.B).shape
            got = (b[0], a[1]) if op.kind == "lora" else (a[1], b[0])
            if a[0] != b[1]:
                raise AdapterError(f"{op.A}: LoRA factors of ranks {a[0]} and {b[1]} do not fit together")
        if got != shape:
            raise AdapterError(f"{name}: the adapter's tensor is {got} but the model at {model} has {shape}")

    if out.resolve() in (model.resolve(), adapter.resolve()):
        raise AdapterError(f"--out must differ from --model and --adapter ({out})")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise AdapterError(f"{out} exists and is not empty: choose a new folder or pass --overwrite")
        for path in out.iterdir():  # only what a merge writes; anything else in the folder is left alone
            if path.is_file() and (path.name in ("config.json", INDEX_FILE) or path.name.endswith(WEIGHT_SUFFIXES)):
                path.unlink()
    out.mkdir(parents=True, exist_ok=True)

    # Stream every shard: read, change, write.
    applied: List[str] = []
    total = len(ckpt.names())
    bar = None
    if progress:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, desc="merge", unit="tensor", file=sys.stderr)
        except ImportError:
            bar = None
    weight_map: Dict[str, str] = {}
    total_size = 0
    try:
        for shard in ckpt.files:
            names = ckpt.names_in(shard)
            extra = [a for a, s in untie.items() if s in names and a not in ckpt]
            entries = [(n, ckpt.info(n).dtype, ckpt.info(n).shape) for n in names]
            entries += [(a, ckpt.info(untie[a]).dtype, ckpt.info(untie[a]).shape) for a in extra]
            with ShardWriter(out / shard, entries, {"format": "pt"}) as w:
                for name, dtype, _ in entries:
                    stored = name if name in ckpt else untie[name]
                    value = ckpt.read(stored)
                    op = ops.get(name)
                    if op is not None:
                        if op.kind == "replace":
                            value = weights.read(op.A).to(value.dtype)
                        elif op.kind == "add":
                            add = weights.read(op.A, torch.float32).mul_(op.scaling)
                            value = value.to(torch.float32).add_(add).to(value.dtype)
                        else:
                            value = value.to(torch.float32).add_(_delta(op, weights)).to(value.dtype)
                        applied.append(name)
                    w.write(name, value)
                    weight_map[name] = shard
                    if bar is not None:
                        bar.update(1)
            total_size += w.nbytes
    finally:
        if bar is not None:
            bar.close()
        ckpt.close()
        weights.close()
    missed = sorted(set(ops) - set(applied))
    if missed:
        raise AdapterError(f"{missed[0]}: changed by the adapter but never written (not stored in {model})")
    if (model / INDEX_FILE).is_file():
        index = json.loads((model / INDEX_FILE).read_text())
        index["metadata"] = dict(index.get("metadata") or {}, total_size=total_size)
        index["weight_map"] = dict(sorted(weight_map.items()))
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")

    # Everything else of the target (tokenizer, generation config, ...) is copied.
    for path in model.iterdir():
        if path.name in ("config.json", INDEX_FILE) or path.name.endswith(WEIGHT_SUFFIXES) or path.name.startswith("."):
            continue
        if path.is_file():
            shutil.copy2(path, out / path.name)

    # The config: the target's, with the tuned long-context values.
    merged_raw = dict(target_raw)
    target_summary = lc.summary(target_cfg)
    written: Dict[str, object] = {}
    if sidecar is not None:
        written = lc.write_long_context(merged_raw, sidecar["tuned"]["config"])
        base_summary, tuned_summary = sidecar["base"]["summary"], sidecar["tuned"]["summary"]
        if not lc.same(target_summary, base_summary):
            diff = lc.differences(target_summary, base_summary)
            what = "; ".join(f"{k}: {a} (the adapter's base: {b})" for k, (a, b) in diff.items())
            warnings.warn(f"{model} has other RoPE settings than the adapter's base ({what}); wrote the tuned "
                          f"model's {lc.describe(tuned_summary)} into {out / 'config.json'}", AdapterWarning,
                          stacklevel=2)
    else:
        warnings.warn(f"{adapter} has no {lc.SIDECAR}: the merged config keeps {model}'s RoPE settings "
                      f"({lc.describe(target_summary)})", AdapterWarning, stacklevel=2)
    if untie:
        merged_raw["tie_word_embeddings"] = False
        written["tie_word_embeddings"] = False
    (out / "config.json").write_text(json.dumps(merged_raw, indent=2, sort_keys=True) + "\n")

    merged_summary = lc.summary(AutoConfig.from_pretrained(out))
    if sidecar is not None and not lc.same(merged_summary, sidecar["tuned"]["summary"]):
        diff = lc.differences(merged_summary, sidecar["tuned"]["summary"])
        raise AdapterError(f"the merged config does not reproduce the tuned model's long-context settings: {diff}")
    log(f"merged {len(applied)} tensors of {total} into {out}")
    log(f"config: {lc.describe(merged_summary)}" + (f" (was {lc.describe(target_summary)})"
                                                      if not lc.same(merged_summary, target_summary) else ""))
    return {"out": str(out), "changed": applied, "written": written, "config": merged_summary,
            "target_config": target_summary, "untied": sorted(untie)}
