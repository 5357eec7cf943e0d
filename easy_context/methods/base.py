"""A method and the registry of methods.

A :class:`Method` is everything the rest of the package needs to know about one way of computing attention:

* ``layout``: how :func:`easy_context.prepare_seq_parallel_inputs` places tokens on ranks (``None``: not sharded);
* ``attention``: the schedule, ``attention(q, k, v, *, causal, scale, group) -> (out, lse)`` on ``(B, H, S, D)``
  local shards, for sequence-parallel methods;
* ``hf_attention``: a ready function for transformers' ``AttentionInterface``, for methods that need more than the
  schedule (Dual Chunk Attention reads positions and the KV cache); ``None`` means :mod:`easy_context.hf_attention`
  wraps ``attention`` in the standard adapter;
* ``bind``: for methods with options (``usp_attn``'s ``ulysses_degree``), ``bind(model, group=..., **options)``
  returns the method with its options bound for one model; ``None`` means the method takes no options;
* ``check``: validates head counts and world size up front, so errors name the fix rather than failing mid-ring;
* ``documents``: whether ``attention`` takes ``doc_ids`` (the document id of every token of the full sequence, from
  :func:`easy_context.kernels.document_ids`) and then lets a query attend only to keys of its own document, so the
  method trains on packed documents.

Method modules register themselves with :func:`register` when :mod:`easy_context.methods` imports them; nothing else
switches on names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Optional

from ..layout import Layout

__all__ = ["Method", "register", "get_method", "available_methods", "document_methods"]


@dataclass(frozen=True)
class Method:
    name: str
    description: str
    layout: Optional[Layout] = None
    attention: Optional[Callable] = None
    hf_attention: Optional[Callable] = None
    bind: Optional[Callable] = None
    causal_only: bool = False
    check: Optional[Callable[..., None]] = None
    # For the README's methods table: what crosses the wire per attention layer, forward.
    communication: str = ""
    options: Dict[str, object] = field(default_factory=dict)
    # Name registered with transformers' AttentionInterface; empty means ``name``. transformers takes every
    # implementation whose name contains "flash" for a flash-attention kernel, so such methods need another name.
    implementation: str = ""
    documents: bool = False

    @property
    def attn_implementation(self) -> str:
        return self.implementation or self.name

    @property
    def is_sequence_parallel(self) -> bool:
        return self.layout is not None

    def validate(self, *, num_heads: int, num_kv_heads: int, world_size: int, causal: bool = True) -> None:
        """Raise ``ValueError`` naming the fix when this method cannot run the given shapes."""
        if self.causal_only and not causal:
            raise ValueError(f"{self.name} supports causal attention only; use 'ring_attn' for non-causal attention")
        if self.check is not None:
            self.check(num_heads=num_heads, num_kv_heads=num_kv_heads, world_size=world_size)


_REGISTRY: Dict[str, Method] = {}
_ALIASES: Dict[str, str] = {}


def register(method: Method, *aliases: str) -> Method:
    _REGISTRY[method.name] = method
    for alias in aliases:
        _ALIASES[alias] = method.name
    return method


def available_methods() -> list:
    return sorted(_REGISTRY)


def document_methods() -> list:
    """Names of the methods that take packed documents."""
    return [name for name in available_methods() if _REGISTRY[name].documents]


def get_method(name) -> Method:
    """The registered :class:`Method` for ``name`` (or ``name`` itself if it already is one)."""
    if isinstance(name, Method):
        return name
    key = _ALIASES.get(name, name)
    if key not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}: choose one of {', '.join(available_methods())}")
    return _REGISTRY[key]
