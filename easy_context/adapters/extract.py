"""Extract a PEFT LoRA adapter from the weight difference between a fine-tune and its base.

For every linear layer (the LM head included) the difference ``ΔW = W_tuned - W_base`` is replaced by its best
rank-r approximation ``B @ A`` (truncated SVD). Embeddings become LoRA embedding factors or are saved whole; norms and
other small parameters are saved whole (PEFT ``modules_to_save``). The long-context config values of the fine-tune
are stored beside the adapter in ``long_context.json``.

Memory stays at about one tensor: weights are read one tensor at a time from the safetensors shards (the base in
blocks of rows, subtracted in place from the tuned tensor), and the SVD works through the small Gram matrix of ΔW
(``min(m, n)`` squared, in float64) instead of a dense SVD that would copy ΔW several times. Finished factors are
spilled to a temporary file, so the adapter itself is never held in memory either.

The SVD, from the Gram matrix: for ΔW of shape (M, N) with M >= N (else work on ΔWᵀ), ``G = ΔWᵀΔW = V diag(s²) Vᵀ``;
the top r eigenpairs give the right singular vectors and values, and ``U_r = ΔW V_r / s_r``. Accumulating G in
float64 keeps singular values down to about 1e-6 of the largest exact for float32 input, far below what a LoRA keeps.
The rank, retained energy and residual of every module go into ``extraction_report.json``.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch

from . import longcontext as lc
from ._safetensors import Checkpoint, ShardWriter
from .plan import AdapterError, ModuleSpec, check_same_architecture, meta_model, module_specs, tied_map

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
REPORT = "extraction_report.json"
PEFT_PREFIX = "base_model.model."

#: Singular values below this fraction of a module's largest are treated as zero (float32 rounding of ΔW).
SV_FLOOR = 1e-6
#: Bytes per block of rows when streaming over ΔW.
BLOCK_BYTES = 2 * 2**20


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _load_trim():
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _load_trim()


def _trim() -> None:
    """Give freed heap memory back to the system (glibc keeps freed blocks below its mmap threshold)."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


# --------------------------------------------------------------------------------------------------------------
# Truncated SVD through the Gram matrix
# --------------------------------------------------------------------------------------------------------------


@dataclass
class LowRank:
    B: torch.Tensor  # (m, r), float64
    A: torch.Tensor  # (r, n), float64
    singular_values: torch.Tensor  # the r kept, float64
    total_energy: float  # ||ΔW||_F²
    energy: float  # kept fraction of ||ΔW||_F²
    rel_residual: float  # ||ΔW - B A||_F / ||ΔW||_F
    max_abs_residual: float  # max |ΔW - B A|


def _block(X: torch.Tensor, i: int, j: int, device) -> torch.Tensor:
    """Rows i:j of X as a contiguous float64 tensor on ``device``."""
    out = torch.empty((j - i, X.shape[1]), dtype=torch.float64, device=device)
    return out.copy_(X[i:j])


def _blocks(rows: int, cols: int):
    step = max(1, BLOCK_BYTES // (8 * max(cols, 1)))
    for i in range(0, rows, step):
        yield i, min(rows, i + step)


def truncated_svd(delta: torch.Tensor, max_rank: int, energy: Optional[float] = None,
                  device: str = "cpu") -> Optional[LowRank]:
    """``ΔW ≈ B @ A`` with ``B = U_r sqrt(S_r)`` and ``A = sqrt(S_r) V_rᵀ`` (the scale split evenly).

    The rank is ``max_rank``, lowered to the numerical rank (singular values above ``SV_FLOOR`` of the largest) and,
    when ``energy`` is given, to the smallest rank keeping that fraction of ``||ΔW||_F²``. Returns None for ΔW = 0.
    Extra memory is two r-column factors, the Gram matrix and one block of rows, whatever the size of ΔW.
    """
    m, n = delta.shape
    transposed = n > m
    X = delta.t() if transposed else delta  # (M, N), M >= N; a view, blocks are copied as they are used
    M, N = X.shape
    G = torch.zeros(N, N, dtype=torch.float64, device=device)
    for i, j in _blocks(M, N):
        blk = _block(X, i, j, device)
        G.addmm_(blk.t(), blk)
    total = float(G.diagonal().sum())
    if total == 0.0:
        return None
    evals, evecs = torch.linalg.eigh(G)
    del G
    evals, evecs = evals.flip(0), evecs.flip(1)
    s = evals.clamp_min(0).sqrt()
    rank = int((s > SV_FLOOR * s[0]).sum())
    rank = max(1, min(rank, max_rank))
    if energy is not None:
        cumulative = (s ** 2).cumsum(0) / total
        needed = int((cumulative < energy - 1e-12).sum()) + 1
        rank = max(1, min(rank, needed))
    s_r, V = s[:rank].clone(), evecs[:, :rank].contiguous()
    del evecs
    U = torch.empty(M, rank, dtype=torch.float64, device=device)
    for i, j in _blocks(M, N):
        U[i:j] = _block(X, i, j, device) @ V
    U /= s_r
    _trim()
    # The residual, exactly, block by block: ΔW - U diag(s) Vᵀ.
    sq, worst = 0.0, 0.0
    Vs = (V * s_r).t()  # (r, N)
    for i, j in _blocks(M, N):
        r = _block(X, i, j, device)
        r.addmm_(U[i:j], Vs, alpha=-1.0)
        lo, hi = torch.aminmax(r)
        worst = max(worst, -float(lo), float(hi))
        r = r.view(-1)
        sq += float(torch.dot(r, r))
    root = s_r.sqrt()
    left, right = (U * root), (V * root).t()  # X ≈ left @ right
    if transposed:  # delta = Xᵀ ≈ rightᵀ @ leftᵀ
        left, right = right.t(), left.t()
    return LowRank(B=left.cpu(), A=right.contiguous().cpu(), singular_values=s_r.cpu(), total_energy=total,
                   energy=float((s_r ** 2).sum()) / total, rel_residual=(sq / total) ** 0.5,
                   max_abs_residual=worst)


# --------------------------------------------------------------------------------------------------------------
# Output: factors spilled to disk as they are made, assembled into one safetensors file at the end
# --------------------------------------------------------------------------------------------------------------


class _Spill:
    def __init__(self, folder: Path):
        fd, name = tempfile.mkstemp(prefix=".adapter-", suffix=".spill", dir=folder)
        self.path = Path(name)
        self.f = os.fdopen(fd, "w+b")
        self.entries: Dict[str, tuple] = {}  # name -> (dtype, shape, offset, nbytes)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        t = tensor.detach().contiguous().cpu()
        offset = self.f.seek(0, 2)
        raw = t.view(-1).view(torch.uint8).numpy()
        self.f.write(memoryview(raw))
        self.entries[name] = (t.dtype, tuple(t.shape), offset, raw.nbytes)

    def drop(self, name: str) -> None:
        self.entries.pop(name, None)

    def finish(self, path: Path, metadata: Dict[str, str]) -> int:
        names = sorted(self.entries)
        entries = [(n, self.entries[n][0], self.entries[n][1]) for n in names]
        self.f.flush()
        with ShardWriter(path, entries, metadata) as w:
            for n in names:
                dtype, shape, offset, nbytes = self.entries[n]
                t = torch.empty(shape, dtype=dtype)
                if nbytes:
                    self.f.seek(offset)
                    self.f.readinto(t.view(-1).view(torch.uint8).numpy())
                w.write(n, t)
        self.close()
        return path.stat().st_size

    def close(self) -> None:
        if not self.f.closed:
            self.f.close()
        self.path.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------------------------
# Extraction
# --------------------------------------------------------------------------------------------------------------


def _dtype(value) -> torch.dtype:
    if isinstance(value, torch.dtype):
        return value
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if value not in names:
        raise AdapterError(f"unsupported dtype {value!r}: use float32 or bfloat16")
    return names[value]


def _selected(name: str, include: Sequence[str], exclude: Sequence[str]) -> bool:
    if include and not any(re.search(p, name) for p in include):
        return False
    return not any(re.search(p, name) for p in exclude)


class _Sources:
    """Where the base and tuned values of each parameter are stored, with the checks that name a bad tensor."""

    def __init__(self, base: Checkpoint, tuned: Checkpoint, base_ties: Dict[str, str], tuned_ties: Dict[str, str]):
        self.base, self.tuned, self.base_ties, self.tuned_ties = base, tuned, base_ties, tuned_ties

    def tied_in_both(self, name: str) -> bool:
        """True when the parameter is tied to the same tensor in both models (its change is carried there)."""
        tb, tt = self.base_ties.get(name), self.tuned_ties.get(name)
        if tt is not None and tb is None and name in self.base:
            raise AdapterError(f"{name}: the tuned model ties it to {tt} (tie_word_embeddings) but the base stores it "
                               f"separately; save the tuned model untied, or extract from a tied base")
        if tt is not None and tb is not None and tt != tb:
            raise AdapterError(f"{name}: tied to {tb} in the base but to {tt} in the tuned model")
        return tt is not None and tb is not None

    def names(self, name: str):
        b = name if name in self.base else self.base_ties.get(name)
        if b is None or b not in self.base:
            raise AdapterError(f"{name}: missing from the base checkpoint {self.base.folder}")
        if name not in self.tuned:
            raise AdapterError(f"{name}: missing from the tuned checkpoint {self.tuned.folder}")
        return b, name

    def check_shape(self, name: str, expected) -> None:
        b, t = self.names(name)
        bs, ts = self.base.info(b).shape, self.tuned.info(t).shape
        if bs != ts:
            raise AdapterError(f"{name}: shape {tuple(ts)} in the tuned model but {tuple(bs)} in the base")
        if expected is not None and tuple(ts) != tuple(expected):
            raise AdapterError(f"{name}: shape {tuple(ts)} in the checkpoint but {tuple(expected)} in the model "
                               f"its config describes")

    def delta(self, name: str):
        """``(tuned - base in float32, ||base||_F, changed)``; the base is read in blocks of rows and subtracted
        in place, so the only full-size tensor is the result."""
        b, t = self.names(name)
        out = self.tuned.read(t, torch.float32)
        rows = out.shape[0] if out.dim() else 1
        flat = out.view(rows, -1) if out.dim() else out.view(1, 1)
        sq, changed = 0.0, False
        step = max(1, BLOCK_BYTES // (8 * max(flat.shape[1], 1)))
        for i in range(0, rows, step):
            blk = self.base.read_rows(b, i, i + step, torch.float32).view(-1, flat.shape[1])
            sq += float(torch.linalg.vector_norm(blk, dtype=torch.float64)) ** 2
            changed = changed or not torch.equal(flat[i:i + blk.shape[0]], blk)
            flat[i:i + blk.shape[0]] -= blk
        return out, sq ** 0.5, changed

    def changed(self, name: str) -> bool:
        b, t = self.names(name)
        return not torch.equal(self.base.read(b), self.tuned.read(t))


def extract_lora(base, tuned, out, rank: int, *, energy: Optional[float] = None, include: Sequence[str] = (),
                 exclude: Sequence[str] = (), embeddings: str = "lora", undecomposable: str = "error",
                 dtype="float32", device: str = "cpu", overwrite: bool = False, progress: bool = True,
                 log: Optional[Callable[[str], None]] = _stderr) -> dict:
    """Extract a LoRA adapter of maximum rank ``rank`` from ``tuned - base`` into the folder ``out``.

    Arguments mirror the command line (``python -m easy_context.adapters extract --help``). Writes
    ``adapter_config.json``, ``adapter_model.safetensors`` (a PEFT LoRA adapter), ``long_context.json`` (the
    long-context config values of both models) and ``extraction_report.json``; returns the report.
    """
    log = log or (lambda msg: None)
    t_start = time.perf_counter()
    base, tuned, out = Path(base), Path(tuned), Path(out)
    if rank < 1:
        raise AdapterError(f"--rank must be at least 1 (got {rank})")
    if energy is not None and not 0.0 < energy <= 1.0:
        raise AdapterError(f"--energy must be in (0, 1] (got {energy})")
    if embeddings not in ("lora", "whole"):
        raise AdapterError(f"embeddings must be 'lora' or 'whole' (got {embeddings!r})")
    if undecomposable not in ("error", "skip", "whole"):
        raise AdapterError(f"undecomposable must be 'error', 'skip' or 'whole' (got {undecomposable!r})")
    for pattern in list(include) + list(exclude):
        try:
            re.compile(pattern)
        except re.error as e:
            raise AdapterError(f"bad module pattern {pattern!r}: {e}") from None
    out_dtype = _dtype(dtype)

    from transformers import AutoConfig

    base_raw, tuned_raw = lc.read_config_json(base), lc.read_config_json(tuned)
    check_same_architecture(base_raw, tuned_raw, f"the base ({base})", f"the tuned model ({tuned})")
    base_cfg, tuned_cfg = AutoConfig.from_pretrained(base), AutoConfig.from_pretrained(tuned)
    specs = module_specs(meta_model(tuned_cfg))
    base_ties, tuned_ties = tied_map(module_specs(meta_model(base_cfg))), tied_map(specs)

    if out.exists() and any(out.iterdir()) and not overwrite:
        raise AdapterError(f"{out} exists and is not empty: choose a new folder or pass --overwrite")

    ckpt_b, ckpt_t = Checkpoint(base), Checkpoint(tuned)
    src = _Sources(ckpt_b, ckpt_t, base_ties, tuned_ties)
    known = {s.full(p) for s in specs for p in s.params}
    ignored = sorted(n for n in ckpt_t.names() if n not in known)

    # Check every name and shape before any work, so a bad input fails in a second, not after an hour.
    for spec in specs:
        for p, shape in spec.params.items():
            full = spec.full(p)
            if not src.tied_in_both(full):
                src.check_shape(full, shape)

    if out.exists():
        for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG, REPORT, lc.SIDECAR):
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    spill = _Spill(out)
    modules: List[dict] = []
    lora_ranks: Dict[str, int] = {}
    to_save: List[str] = []
    biases: Dict[str, torch.Tensor] = {}
    bias_changed = False
    tied_change = False
    bar = None
    if progress:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(specs), desc="extract", unit="module", file=sys.stderr)
        except ImportError:
            bar = None
    try:
        for spec in specs:
            if bar is not None:
                bar.update(1)
            shapes = {p: list(s) for p, s in spec.params.items()}
            entry = {"module": spec.name, "kind": spec.kind, "shapes": shapes}
            modules.append(entry)
            own = [p for p in spec.params if not src.tied_in_both(spec.full(p))]
            if not own:
                entry["action"] = "tied"
                entry["tied_to"] = {p: spec.tied[p] for p in spec.params if p in spec.tied}
                continue
            if not _selected(spec.name, include, exclude):
                entry["action"] = "excluded"
                continue
            carries_tie = any(spec.full(p) in set(tuned_ties.values()) for p in own)

            if spec.kind in ("linear", "embedding") and "weight" in own:
                delta, base_norm, weight_changed = src.delta(spec.full("weight"))
                has_bias = "bias" in own
                this_bias_changed = has_bias and src.changed(spec.full("bias"))
                if not weight_changed and not this_bias_changed:
                    entry["action"] = "unchanged"
                    continue
                if spec.kind == "embedding" and embeddings == "whole" or not weight_changed:
                    del delta
                    _save_whole(spec, own, src, spill, out_dtype)
                    to_save.append(spec.name)
                    entry["action"] = "whole"
                    tied_change |= carries_tie
                    continue
                low = truncated_svd(delta, rank, energy, device)
                del delta
                _trim()
                delta_norm = low.total_energy ** 0.5
                key = PEFT_PREFIX + spec.name
                if spec.kind == "linear":
                    spill.add(f"{key}.lora_A.weight", low.A.to(out_dtype))
                    spill.add(f"{key}.lora_B.weight", low.B.to(out_dtype))
                else:  # PEFT's embedding delta is (lora_embedding_B @ lora_embedding_A)ᵀ
                    spill.add(f"{key}.lora_embedding_A", low.B.t().contiguous().to(out_dtype))
                    spill.add(f"{key}.lora_embedding_B", low.A.t().contiguous().to(out_dtype))
                if has_bias:
                    b, t = src.names(spec.full("bias"))
                    biases[f"{key}.base_layer.bias"] = ckpt_t.read(t).to(out_dtype)
                    bias_changed |= this_bias_changed
                lora_ranks[spec.name] = low.A.shape[0]
                tied_change |= carries_tie
                entry.update(action="lora", rank=low.A.shape[0], energy=low.energy, rel_residual=low.rel_residual,
                             max_abs_residual=low.max_abs_residual, delta_norm=delta_norm,
                             rel_delta=delta_norm / base_norm if base_norm else None,
                             top_singular_values=[float(x) for x in low.singular_values[:4]])
                if has_bias:
                    entry["bias_changed"] = this_bias_changed
                continue

            changed = [p for p in own if src.changed(spec.full(p))]
            if not changed:
                entry["action"] = "unchanged"
                continue
            if spec.kind == "other" or any(len(spec.params[p]) > 1 for p in own):
                tensor = spec.full(changed[0])
                if undecomposable == "error":
                    raise AdapterError(f"{tensor}: changed, but its module ({spec.cls}) is neither linear nor an "
                                       f"embedding and cannot be decomposed into LoRA factors; pass --undecomposable "
                                       f"skip to leave it out or --undecomposable whole to save it whole")
                if undecomposable == "skip":
                    entry["action"] = "skipped"
                    continue
            _save_whole(spec, own, src, spill, out_dtype)
            to_save.append(spec.name)
            tied_change |= carries_tie
            entry["action"] = "whole"
        if bar is not None:
            bar.close()
            bar = None

        if bias_changed:
            for name, value in biases.items():
                spill.add(name, value)
        del biases
        if not lora_ranks and not to_save:
            raise AdapterError("the tuned model equals the base in every selected module: nothing to extract")

        sidecar = lc.make_sidecar(base, tuned, base_raw, tuned_raw, lc.summary(base_cfg), lc.summary(tuned_cfg),
                                  base_ties, tuned_ties)
        config = _adapter_config(base, lora_ranks, to_save, bias_changed, tied_change)
        (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (out / lc.SIDECAR).write_text(json.dumps(sidecar, indent=2) + "\n")
        size = spill.finish(out / ADAPTER_WEIGHTS, {"format": "pt"})
    finally:
        if bar is not None:
            bar.close()
        spill.close()
        ckpt_b.close()
        ckpt_t.close()

    report = _report(modules, size, ckpt_t.nbytes, rank, energy, out_dtype, ignored, sidecar, config,
                     time.perf_counter() - t_start)
    (out / REPORT).write_text(json.dumps(report, indent=2) + "\n")
    for line in format_report(report):
        log(line)
    return report


def _save_whole(spec: ModuleSpec, own, src: _Sources, spill: _Spill, dtype: torch.dtype) -> None:
    for p in own:
        b, t = src.names(spec.full(p))
        value = src.tuned.read(t)
        spill.add(PEFT_PREFIX + spec.full(p), value.to(dtype) if value.is_floating_point() else value)


def _adapter_config(base: Path, ranks: Dict[str, int], to_save: List[str], bias: bool, tied: bool) -> dict:
    counts = Counter(ranks.values())
    r = max(counts, key=lambda k: (counts[k], k)) if counts else 1
    pattern = {re.escape(name): k for name, k in ranks.items() if k != r}
    kwargs = dict(
        r=r, lora_alpha=r, lora_dropout=0.0, target_modules=sorted(ranks) or None,
        rank_pattern=pattern, alpha_pattern=dict(pattern),  # alpha = rank everywhere: scaling 1
        modules_to_save=sorted(to_save) or None, bias="lora_only" if bias else "none",
        task_type="CAUSAL_LM", base_model_name_or_path=str(base), inference_mode=True,
    )
    if tied:
        kwargs["ensure_weight_tying"] = True
    try:
        from peft import LoraConfig

        config = LoraConfig(**kwargs).to_dict()
    except ImportError:
        config = dict(kwargs, peft_type="LORA", use_rslora=False, use_dora=False, fan_in_fan_out=False)
    for key, value in list(config.items()):
        if isinstance(value, set):
            config[key] = sorted(value)
    config["peft_type"] = "LORA"
    config["task_type"] = "CAUSAL_LM"
    return config


def _report(modules, size, tuned_bytes, rank, energy, dtype, ignored, sidecar, config, seconds) -> dict:
    lora = [m for m in modules if m["action"] == "lora"]
    worst = max(lora, key=lambda m: m["rel_residual"], default=None)
    lowest = min(lora, key=lambda m: m["energy"], default=None)
    total_energy = sum(m["delta_norm"] ** 2 for m in lora)
    kept = sum(m["delta_norm"] ** 2 * m["energy"] for m in lora)
    return {
        "max_rank": rank,
        "energy_threshold": energy,
        "dtype": str(dtype).replace("torch.", ""),
        "adapter_bytes": size,
        "tuned_checkpoint_bytes": tuned_bytes,
        "counts": dict(Counter(m["action"] for m in modules)),
        "ranks": dict(sorted(Counter(m["rank"] for m in lora).items())),
        "retained_energy_overall": kept / total_energy if total_energy else None,
        "largest_residual": None if worst is None else {
            "module": worst["module"], "rel_residual": worst["rel_residual"],
            "max_abs_residual": worst["max_abs_residual"], "rank": worst["rank"]},
        "lowest_energy": None if lowest is None else {"module": lowest["module"], "energy": lowest["energy"]},
        "max_abs_residual": max((m["max_abs_residual"] for m in lora), default=None),
        "saved_whole": [m["module"] for m in modules if m["action"] == "whole"],
        "skipped_undecomposable": [m["module"] for m in modules if m["action"] == "skipped"],
        "ignored_tensors": ignored,
        "long_context": {"base": sidecar["base"]["summary"], "tuned": sidecar["tuned"]["summary"]},
        "peft": {k: config.get(k) for k in ("r", "lora_alpha", "bias", "ensure_weight_tying")},
        "seconds": seconds,
        "modules": modules,
    }


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def format_report(report: dict) -> List[str]:
    """A few lines summarising an extraction report (printed by the command line)."""
    c = report["counts"]
    lines = [
        f"adapter: {_mb(report['adapter_bytes'])} ({report['dtype']}), "
        f"{100 * report['adapter_bytes'] / max(report['tuned_checkpoint_bytes'], 1):.1f}% of the tuned checkpoint",
        "modules: " + ", ".join(f"{v} {k}" for k, v in sorted(c.items())) +
        ("; ranks " + ", ".join(f"{k} ×{v}" for k, v in report["ranks"].items()) if report["ranks"] else ""),
    ]
    if report["retained_energy_overall"] is not None:
        lines.append(f"retained energy: {100 * report['retained_energy_overall']:.2f}% overall, lowest "
                     f"{100 * report['lowest_energy']['energy']:.2f}% ({report['lowest_energy']['module']})")
        w = report["largest_residual"]
        lines.append(f"largest residual: {w['rel_residual']:.3g} relative (max |ΔW - BA| = "
                     f"{w['max_abs_residual']:.3g}) in {w['module']} at rank {w['rank']}")
    if report["saved_whole"]:
        lines.append(f"saved whole: {', '.join(report['saved_whole'][:3])}"
                     + (f" and {len(report['saved_whole']) - 3} more" if len(report["saved_whole"]) > 3 else ""))
    if report["skipped_undecomposable"]:
        lines.append(f"skipped (undecomposable): {', '.join(report['skipped_undecomposable'])}")
    lcx = report["long_context"]
    lines.append(f"long context: base {lc.describe(lcx['base'])}; tuned {lc.describe(lcx['tuned'])}")
    return lines
