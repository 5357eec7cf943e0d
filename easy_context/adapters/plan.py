"""Which tensors of a checkpoint belong to which module, and what kind of module each is.

The model is built from its config on the ``meta`` device (no memory, no weights), which tells for every parameter
its module's class (``nn.Linear``, ``nn.Embedding``, a norm, ...) and which parameters are tied to another (an LM
head sharing the input embedding). Checkpoint names are the model's parameter names; a tied parameter is usually
not stored.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn


class AdapterError(ValueError):
    """Bad input to extraction or merging: the message names the tensor or setting and, where there is one, the fix."""


class AdapterWarning(UserWarning):
    """A merge that works but deserves attention (different RoPE settings in the target than in the adapter's base)."""


@dataclass
class ModuleSpec:
    name: str  # module name, e.g. "model.layers.0.self_attn.q_proj"
    kind: str  # "linear", "embedding", "small" (only 0-D/1-D parameters: norms, biases), "other"
    params: Dict[str, Tuple[int, ...]] = field(default_factory=dict)  # local name -> shape
    tied: Dict[str, str] = field(default_factory=dict)  # local name -> full name of the parameter it is tied to
    cls: str = ""  # the module's class name

    def full(self, param: str) -> str:
        return f"{self.name}.{param}" if self.name else param


def meta_model(config):
    """The model for ``config`` on the meta device: module classes, parameter shapes and ties, no memory."""
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)


def module_specs(model) -> List[ModuleSpec]:
    """Every module that owns parameters, in the model's order, with its parameters and ties."""
    first_name: Dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        first_name.setdefault(id(p), name)
    specs = []
    for mname, module in model.named_modules():
        own = list(module.named_parameters(recurse=False))
        if not own:
            continue
        if isinstance(module, nn.Linear):
            kind = "linear"
        elif isinstance(module, nn.Embedding):
            kind = "embedding"
        elif all(p.dim() <= 1 for _, p in own):
            kind = "small"
        else:
            kind = "other"
        spec = ModuleSpec(mname, kind, cls=type(module).__name__)
        for pname, p in own:
            spec.params[pname] = tuple(p.shape)
            owner = first_name[id(p)]
            if owner != spec.full(pname):
                spec.tied[pname] = owner
        specs.append(spec)
    return specs


def tied_map(specs: List[ModuleSpec]) -> Dict[str, str]:
    """``{alias parameter: parameter it is tied to}``, e.g. ``{"lm_head.weight": "model.embed_tokens.weight"}``."""
    return {s.full(p): src for s in specs for p, src in s.tied.items()}


def resolve(name: str, ckpt, ties: Dict[str, str], what: str) -> Optional[str]:
    """The checkpoint tensor holding parameter ``name``: itself, or the tensor it is tied to. None when neither
    is stored."""
    if name in ckpt:
        return name
    source = ties.get(name)
    if source is not None and source in ckpt:
        return source
    return None


def check_same_architecture(a: Dict, b: Dict, a_label: str, b_label: str) -> None:
    """Refuse two configs of different model families. (Sizes are compared tensor by tensor, so that the error
    names the tensor.)"""
    for key in ("model_type", "architectures"):
        if key in a and key in b and a[key] != b[key]:
            raise AdapterError(f"architecture mismatch: {a_label} has {key}={a[key]!r} but {b_label} has "
                               f"{key}={b[key]!r}")
