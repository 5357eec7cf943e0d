"""The transformers adapter: how a method's attention reaches a HuggingFace model.

Each method registers one function with transformers' ``AttentionInterface`` (under
:attr:`~easy_context.methods.base.Method.attn_implementation`) and a mask function with ``AttentionMaskInterface``
that builds no ``S × S`` mask and refuses masks it cannot honour. No class's ``forward`` is replaced, so this survives
transformers releases that rewrite modeling code.

**State belongs to the model.** transformers holds one function per implementation name, for every model in the
process. That function looks up the :class:`Binding` of the attention module it is called with: the method with its
options (``ulysses_degree``, DCA's chunk sizes) and the process group it was given. A model instance binds every one of
its modules (:func:`bind_model`); a family patch binds every model whose config is of that family
(:func:`patch_family`); anything else gets the method's defaults over the current sequence-parallel group. Two models
patched differently in one process therefore both stay right.

**Family names.** transformers reads a model's implementation from ``config._attn_implementation`` at construction
and at every forward. :func:`patch_family` gives the family's config class (``LlamaConfig``) an override of that one
property, which answers the method's name unless the model was explicitly switched to another easy-context method.

The public entry points are in :mod:`easy_context.patch`.
"""

from __future__ import annotations

import functools
import weakref
from typing import Callable, Dict, Optional

import torch

from .checks import check_config, check_shards, padding_mask_refuser, reject_unsupported_features
from .comm import group_rank, group_size
from .kernels import softmax_scale
from .mesh import get_sequence_parallel_group
from .methods import Method

__all__ = ["DYNAMIC", "Binding", "register_method", "make_binding", "bind_model", "sp_attention_forward",
           "patch_family", "unpatch_family", "family_patches", "clear_family_patches"]

DYNAMIC = object()  # "the current sequence-parallel group", resolved at every call


def _attention_interfaces():
    # transformers' attention and mask interfaces import its modeling code, which `import easy_context` does not need
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError as err:  # pragma: no cover - exercised only with old transformers
        raise ImportError(
            "easy_context needs transformers>=4.56.2 (AttentionInterface, AttentionMaskInterface and "
            "set_attn_implementation): pip install -U 'transformers>=4.56.2'"
        ) from err
    return AttentionInterface, AttentionMaskInterface


class Binding:
    """A method bound to its options and process group: the attention function one model (or family) runs."""

    def __init__(self, method: Method, group=DYNAMIC, forward: Optional[Callable] = None):
        self.method = method
        self.group = group
        self.forward = forward or functools.partial(sp_attention_forward, method, binding=self)
        self.guard_layer = None  # the layer index whose calls run the shard guard: the first one called
        self.documents = (None, None)  # (position_ids the guard saw, the document ids it found for them)
        self._checked_configs: Dict[int, "weakref.ref"] = {}

    def resolve_group(self):
        return get_sequence_parallel_group() if self.group is DYNAMIC else self.group

    def check_config_once(self, module) -> None:
        """Config validation for modules reached through a family patch or no patch at all (first forward)."""
        config = getattr(module, "config", None)
        if config is None:
            return
        seen = self._checked_configs.get(id(config))
        if seen is not None and seen() is config:
            return
        check_config(self.method.name, config)
        self._checked_configs[id(config)] = weakref.ref(config)


_MODULE_BINDINGS: "weakref.WeakKeyDictionary[torch.nn.Module, Binding]" = weakref.WeakKeyDictionary()
_FAMILY_BINDINGS: Dict[tuple, Binding] = {}  # (config class, implementation name) -> binding
_FAMILY_IMPLEMENTATION: Dict[type, str] = {}  # config class -> implementation name its models use
_DEFAULT_BINDINGS: Dict[str, Binding] = {}  # implementation name -> the method with default options
_REGISTERED: Dict[str, Method] = {}


def _binding_for(name: str, module) -> Binding:
    binding = _MODULE_BINDINGS.get(module)
    if binding is not None and binding.method.attn_implementation == name:
        return binding
    config = getattr(module, "config", None)
    binding = _FAMILY_BINDINGS.get((type(config), name)) or _DEFAULT_BINDINGS[name]
    binding.check_config_once(module)
    return binding


def register_method(method: Method) -> None:
    """Register ``method``'s dispatching attention function and mask function with transformers (once)."""
    name = method.attn_implementation
    if name in _REGISTERED:
        return
    attention_interface, mask_interface = _attention_interfaces()
    if method.hf_attention is not None:
        _, mask_fn = method.hf_attention(None)
    else:
        mask_fn = padding_mask_refuser(method.name, "drop it and pad at the end with -100 targets instead "
                                       "(prepare_seq_parallel_inputs(..., pad=True))")

    def attention(module, *args, **kwargs):
        return _binding_for(name, module).forward(module, *args, **kwargs)

    attention.__name__ = f"{method.name}_attention"
    _DEFAULT_BINDINGS[name] = make_binding(method, None, DYNAMIC, {})
    attention_interface.register(name, attention)
    mask_interface.register(name, mask_fn)
    _REGISTERED[name] = method


def make_binding(method: Method, model, group, options: dict) -> Binding:
    """``method`` with ``options`` bound for ``model`` (``None``: a family or the defaults), over ``group``
    (:data:`DYNAMIC`: the current sequence-parallel group at every call)."""
    if method.hf_attention is not None:  # a method with its own per-model state (dca)
        forward, _ = method.hf_attention(model, **options)
        return Binding(method, group, forward)
    if method.bind is not None:
        method = method.bind(model, group=None if group is DYNAMIC else group, **options)
    elif options:
        raise TypeError(f"{method.name} takes no options, got {sorted(options)}")
    return Binding(method, group)


# ---------------------------------------------------------------------------------------------- the attention
def sp_attention_forward(method: Method, module, query, key, value, attention_mask, scaling=None, dropout=0.0, *,
                         binding: Optional[Binding] = None, **kwargs):
    """The ``AttentionInterface`` function of a sequence-parallel method.

    ``query`` is ``(B, H, S_local, D)``, ``key``/``value`` ``(B, H_kv, S_local, D)``, already rotated by their global
    positions; returns ``((B, S_local, H, D_v), None)``.
    """
    name = method.name
    group = get_sequence_parallel_group() if binding is None else binding.resolve_group()
    world_size, rank = group_size(group), group_rank(group)
    layer = getattr(module, "layer_idx", None)
    position_ids = kwargs.get("position_ids")
    if binding is not None and binding.guard_layer is None:
        binding.guard_layer = layer
    if binding is None or layer is None or layer == binding.guard_layer or binding.documents[0] is not position_ids:
        # Every rank reaches this point in every forward; the collective check runs before any rank may raise. Its
        # document ids (packed documents) serve every layer of the forward, which all get the same position_ids.
        doc_ids = check_shards(name, method.layout, group, rank, world_size, query, position_ids,
                               documents=method.documents)
        if binding is not None:
            binding.documents = (position_ids, doc_ids)
    else:
        doc_ids = binding.documents[1]
    if attention_mask is not None:
        raise ValueError(
            f"{name} cannot apply an explicit attention mask: pass attention_mask=None. Pad at the end with "
            "-100 targets (prepare_seq_parallel_inputs(..., pad=True)); causal attention never lets a real token "
            "see the padding"
        )
    reject_unsupported_features(name, dropout, kwargs)
    if query.shape[2] != key.shape[2]:
        raise ValueError(
            f"{name} got {query.shape[2]} queries but {key.shape[2]} keys: a KV cache (generation) is not supported "
            "by sequence-parallel attention; call the model with use_cache=False, or use 'dca' or the plain model "
            "for generation"
        )
    total = query.shape[2] * world_size
    window = kwargs.get("sliding_window")
    if window is not None and window < total:
        raise ValueError(
            f"{name} computes full attention but the model uses a sliding window of {window} tokens, shorter than the "
            f"sequence ({total} tokens): set config.sliding_window=None (full attention) or keep sequences within "
            f"{window} tokens"
        )
    causal = bool(getattr(module, "is_causal", True))
    method.validate(num_heads=query.shape[1], num_kv_heads=key.shape[1], world_size=world_size, causal=causal)
    qk_dim, v_dim = query.shape[-1], value.shape[-1]
    if qk_dim != v_dim:  # MLA (DeepSeek-V2/V3): zero-pad to one head size; zero columns change no score or output
        scaling = softmax_scale(query, scaling)
        width = max(qk_dim, v_dim)
        pad = lambda x: torch.nn.functional.pad(x, (0, width - x.shape[-1]))  # noqa: E731
        query, key, value = pad(query), pad(key), pad(value)
    documents = {} if doc_ids is None else {"doc_ids": doc_ids.to(query.device)}
    out, _ = method.attention(query, key, value, causal=causal, scale=scaling, group=group, **documents)
    return out[..., :v_dim].transpose(1, 2), None


# ---------------------------------------------------------------------------------------------- family patches
def _family_config_class(family: str):
    from transformers import CONFIG_MAPPING

    if family not in CONFIG_MAPPING:
        raise ValueError(
            f"unknown model family {family!r}: pass a model instance or a transformers model_type such as "
            "'llama', 'mistral' or 'qwen2'"
        )
    return CONFIG_MAPPING[family]


def _base_property(config_class):
    for klass in config_class.__mro__[1:]:
        prop = klass.__dict__.get("_attn_implementation")
        if isinstance(prop, property):
            return prop
    raise TypeError(f"{config_class.__name__} has no _attn_implementation property: "
                    "transformers>=4.56.2 is needed")


def _install_family_hook(config_class) -> None:
    if getattr(config_class.__dict__.get("_attn_implementation"), "fget", None) is not None and \
            getattr(config_class.__dict__["_attn_implementation"].fget, "_easy_context", False):
        return
    base = _base_property(config_class)

    def fget(config):
        value = base.fget(config)
        chosen = _FAMILY_IMPLEMENTATION.get(type(config))
        if chosen is None or (isinstance(value, str) and value in _REGISTERED):
            return value
        return chosen

    fget._easy_context = True
    config_class._attn_implementation = property(fget, base.fset)


def patch_family(method: Method, family: str, group, options: dict) -> str:
    """Make every model of ``family`` (a transformers ``model_type``) run ``method`` with ``options`` over ``group``;
    returns the attention implementation name."""
    config_class = _family_config_class(family)
    register_method(method)
    name = method.attn_implementation
    _FAMILY_BINDINGS[(config_class, name)] = make_binding(method, None, group, options)
    _install_family_hook(config_class)
    _FAMILY_IMPLEMENTATION[config_class] = name
    return name


def unpatch_family(family: str) -> None:
    """Give the models of ``family`` back their own attention."""
    _FAMILY_IMPLEMENTATION.pop(_family_config_class(family), None)


def family_patches() -> Dict[type, str]:
    """``{config class: implementation name}`` of the family patches in place."""
    return dict(_FAMILY_IMPLEMENTATION)


def clear_family_patches() -> None:
    """Remove every family patch."""
    _FAMILY_IMPLEMENTATION.clear()


def bind_model(model: torch.nn.Module, binding: Binding) -> None:
    """Bind every module of ``model`` (a weak reference: nothing is kept alive) to ``binding``."""
    for module in model.modules():
        _MODULE_BINDINGS[module] = binding
