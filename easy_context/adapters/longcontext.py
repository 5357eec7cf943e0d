"""The long-context part of a model config: RoPE base, RoPE scaling and the maximum position.

A context extension lives in two places: the weights (carried by the adapter) and a handful of config values. A
merge that keeps the target's config loses the extension, so these values travel beside the adapter in
``long_context.json`` and are written into the merged model's ``config.json``.

Two spellings exist. transformers 4.x writes ``rope_theta`` and ``rope_scaling`` at the top level; transformers 5.x
writes ``rope_parameters = {"rope_type": ..., "rope_theta": ..., <scaling fields>}`` (``config.rope_theta`` may then be
None, and ``config.rope_scaling`` is an alias of ``rope_parameters``). Values are written in every spelling the
target file uses, and the result is checked by loading the config back with transformers.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any, Dict, Optional

from ..model_config import get_rope_theta

#: Config keys that make up the long-context setting, copied from the tuned model's config.json.
LONG_CONTEXT_KEYS = (
    "rope_theta",
    "rope_parameters",
    "rope_scaling",
    "max_position_embeddings",
    "original_max_position_embeddings",
)

#: Architecture keys recorded with the adapter's base, compared with a merge target's.
ARCH_KEYS = ("model_type", "architectures", "hidden_size", "num_hidden_layers", "vocab_size", "intermediate_size",
             "num_attention_heads", "num_key_value_heads", "head_dim", "tie_word_embeddings")

SIDECAR = "long_context.json"
FORMAT = "easy-context/long-context-adapter/1"


def read_config_json(folder) -> Dict[str, Any]:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no config.json (expected a HuggingFace model folder)")
    return json.loads(path.read_text())


def _is_nested(params: Any) -> bool:
    """transformers 5 keeps one RoPE dict per layer type for some families (e.g. full and sliding attention)."""
    return isinstance(params, dict) and bool(params) and all(isinstance(v, dict) for v in params.values())


def _raw_scaling(cfg: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """The scaling fields (rope type, factor, ...) without the base; None for plain RoPE."""
    for key in ("rope_parameters", "rope_scaling"):
        params = cfg.get(key)
        if isinstance(params, dict) and not _is_nested(params):
            out = {k: v for k, v in params.items() if k != "rope_theta"}
            if "type" in out and "rope_type" not in out:
                out["rope_type"] = out.pop("type")
            if out.get("rope_type", "default") == "default" and set(out) <= {"rope_type"}:
                return None
            return out
    return None


def long_context_values(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """The long-context keys present in a raw config.json dict."""
    return {k: copy.deepcopy(cfg[k]) for k in LONG_CONTEXT_KEYS if k in cfg}


def architecture(cfg: Dict[str, Any]) -> Dict[str, Any]:
    return {k: cfg.get(k) for k in ARCH_KEYS if k in cfg}


def summary(config) -> Dict[str, Any]:
    """What the model will actually use, read from a transformers config object (defaults included)."""
    params = getattr(config, "rope_parameters", None)
    if params is None:
        params = getattr(config, "rope_scaling", None)
    out: Dict[str, Any] = {}
    if _is_nested(params):
        out["rope_parameters"] = {k: dict(sorted(v.items())) for k, v in sorted(params.items())}
    else:
        theta = None
        if isinstance(params, dict) and "rope_theta" in params:
            theta = params["rope_theta"]
        elif getattr(config, "rope_theta", None) is not None:
            theta = config.rope_theta
        out["rope_theta"] = None if theta is None else float(theta)
        out["rope_scaling"] = _raw_scaling({"rope_parameters": params}) if isinstance(params, dict) else None
    out["max_position_embeddings"] = getattr(config, "max_position_embeddings", None)
    original = getattr(config, "original_max_position_embeddings", None)
    if original is not None:
        out["original_max_position_embeddings"] = original
    return out


def _close(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, (int, float)) or isinstance(b, float) and isinstance(a, (int, float)):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=0.0)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    return a == b


def same(a: Dict[str, Any], b: Dict[str, Any]) -> bool:
    return _close(a, b)


def describe(s: Dict[str, Any]) -> str:
    """``rope_theta=925387, max_position_embeddings=8192`` (plus scaling when present)."""
    parts = []
    for key, value in s.items():
        if key == "rope_scaling" and value is None:
            continue
        if isinstance(value, float):
            value = f"{value:g}"
        parts.append(f"{key}={value}")
    return ", ".join(parts)


def differences(a: Dict[str, Any], b: Dict[str, Any]) -> Dict[str, tuple]:
    """``{key: (a value, b value)}`` for the keys whose values differ."""
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if not _close(a.get(k), b.get(k))}


def write_long_context(target: Dict[str, Any], tuned: Dict[str, Any]) -> Dict[str, Any]:
    """Write the tuned config's long-context values into the raw ``target`` config dict, in every spelling the
    target uses (top-level ``rope_theta``/``rope_scaling`` and/or ``rope_parameters``). Returns what was written."""
    written: Dict[str, Any] = {}
    for key, value in long_context_values(tuned).items():
        target[key] = copy.deepcopy(value)
        written[key] = value
    theta, scaling = get_rope_theta(tuned), _raw_scaling(tuned)
    nested = _is_nested(tuned.get("rope_parameters"))
    if not nested and theta is not None:
        if "rope_theta" in target and "rope_theta" not in tuned:
            target["rope_theta"] = written["rope_theta"] = theta
        if "rope_parameters" in target and "rope_parameters" not in tuned:
            params = {"rope_type": "default", **(scaling or {}), "rope_theta": theta}
            target["rope_parameters"] = written["rope_parameters"] = params
        if "rope_scaling" in target and "rope_scaling" not in tuned:
            target["rope_scaling"] = written["rope_scaling"] = copy.deepcopy(scaling)
    return written


def make_sidecar(base_dir, tuned_dir, base_cfg: Dict[str, Any], tuned_cfg: Dict[str, Any], base_summary,
                 tuned_summary, base_ties: Dict[str, str], tuned_ties: Dict[str, str]) -> Dict[str, Any]:
    def side(path, cfg, summ):
        return {"model": str(path), "architecture": architecture(cfg), "config": long_context_values(cfg),
                "summary": summ}

    return {"format": FORMAT, "base": side(base_dir, base_cfg, base_summary),
            "tuned": side(tuned_dir, tuned_cfg, tuned_summary),
            "ties": {"base": dict(base_ties), "tuned": dict(tuned_ties)}}
