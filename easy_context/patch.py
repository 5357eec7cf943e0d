"""Plugging a method into HuggingFace models through transformers' own extension points.

Each method registers one function with ``AttentionInterface`` (under :attr:`Method.attn_implementation`) and a mask
function with ``AttentionMaskInterface`` that builds no ``S × S`` mask and refuses masks it cannot honour. No class's
``forward`` is replaced, so the patch survives transformers releases that rewrite modeling code.

**State belongs to the model.** transformers holds one function per implementation name, for every model in the
process. That function looks up the *binding* of the attention module it is called with: the method with its options
(``ulysses_degree``, DCA's chunk sizes) and the process group it was given. A model instance binds every one of its
modules; a family patch binds every model whose config is of that family; anything else gets the method's defaults
over the current sequence-parallel group. Two models patched differently in one process therefore both stay right.

**Family names, as EasyContext and ChunkLlama are called.** ``apply_seq_parallel_monkey_patch("zigzag_ring_attn",
"llama")`` makes every Llama model use the method, however it is loaded (``attn_implementation="flash_attention_2"``,
``"sdpa"``, ``"eager"`` or nothing), before or after the call. transformers reads a model's implementation from
``config._attn_implementation`` at construction and at every forward; the family's config class (``LlamaConfig``) gets
an override of that one property, which answers the method's name unless the model was explicitly switched to another
easy-context method. Other families keep their own attention. ``apply_seq_parallel_monkey_patch("data_parallel",
"llama")`` removes the family patch.
"""

from __future__ import annotations

import functools
import weakref
from typing import Callable, Dict, Optional

import torch

from .checks import check_config, check_shards, reject_unsupported_features, text_config
from .comm import group_rank, group_size
from .mesh import get_sequence_parallel_group
from .methods import Method, get_method

__all__ = ["apply_seq_parallel_monkey_patch", "sp_attention_forward", "reject_unsupported_features"]

_DYNAMIC = object()  # "the current sequence-parallel group", resolved at every call


def _attention_interfaces():
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError as err:  # pragma: no cover - exercised only with old transformers
        raise ImportError(
            "easy_context needs transformers>=4.56.2 (AttentionInterface, AttentionMaskInterface and "
            "set_attn_implementation): pip install -U 'transformers>=4.56.2'"
        ) from err
    return AttentionInterface, AttentionMaskInterface


class _Binding:
    """A method bound to its options and process group: the attention function one model (or family) runs."""

    def __init__(self, method: Method, group=_DYNAMIC, forward: Optional[Callable] = None):
        self.method = method
        self.group = group
        self.forward = forward or functools.partial(sp_attention_forward, method, binding=self)
        self.guard_layer = None  # the layer index whose calls run the shard guard: the first one called
        self._checked_configs: Dict[int, "weakref.ref"] = {}

    def resolve_group(self):
        return get_sequence_parallel_group() if self.group is _DYNAMIC else self.group

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


_BINDINGS: "weakref.WeakKeyDictionary[torch.nn.Module, _Binding]" = weakref.WeakKeyDictionary()
_FAMILY_BINDINGS: Dict[tuple, _Binding] = {}  # (config class, implementation name) -> binding
_FAMILY_IMPLEMENTATION: Dict[type, str] = {}  # config class -> implementation name its models use
_DEFAULT_BINDINGS: Dict[str, _Binding] = {}  # implementation name -> the method with default options
_REGISTERED: Dict[str, Method] = {}


def _binding_for(name: str, module) -> _Binding:
    binding = _BINDINGS.get(module)
    if binding is not None and binding.method.attn_implementation == name:
        return binding
    config = getattr(module, "config", None)
    binding = _FAMILY_BINDINGS.get((type(config), name)) or _DEFAULT_BINDINGS[name]
    binding.check_config_once(module)
    return binding


def _register(method: Method) -> None:
    """Register ``method``'s dispatching attention function and mask function with transformers (once)."""
    name = method.attn_implementation
    if name in _REGISTERED:
        return
    attention_interface, mask_interface = _attention_interfaces()
    if method.hf_attention is not None:
        _, mask_fn = method.hf_attention(None)
    else:
        mask_fn = _no_mask(method.name)

    def attention(module, *args, **kwargs):
        return _binding_for(name, module).forward(module, *args, **kwargs)

    attention.__name__ = f"{method.name}_attention"
    _DEFAULT_BINDINGS[name] = _make_binding(method, None, _DYNAMIC, {})
    attention_interface.register(name, attention)
    mask_interface.register(name, mask_fn)
    _REGISTERED[name] = method


def _make_binding(method: Method, model, group, options: dict) -> _Binding:
    if method.hf_attention is not None:  # a method with its own per-model state (dca)
        forward, _ = method.hf_attention(model, **options)
        return _Binding(method, group, forward)
    if method.bind is not None:
        method = method.bind(model, group=None if group is _DYNAMIC else group, **options)
    elif options:
        raise TypeError(f"{method.name} takes no options, got {sorted(options)}")
    return _Binding(method, group)


# ---------------------------------------------------------------------------------------------- the attention
def sp_attention_forward(method: Method, module, query, key, value, attention_mask, scaling=None, dropout=0.0, *,
                         binding: Optional[_Binding] = None, **kwargs):
    """The ``AttentionInterface`` function of a sequence-parallel method.

    ``query`` is ``(B, H, S_local, D)``, ``key``/``value`` ``(B, H_kv, S_local, D)``, already rotated by their global
    positions; returns ``((B, S_local, H, D_v), None)``.
    """
    name = method.name
    group = get_sequence_parallel_group() if binding is None else binding.resolve_group()
    world_size, rank = group_size(group), group_rank(group)
    layer = getattr(module, "layer_idx", None)
    if binding is not None and binding.guard_layer is None:
        binding.guard_layer = layer
    if binding is None or layer is None or layer == binding.guard_layer:
        # Every rank reaches this point in every forward; the collective check runs before any rank may raise.
        check_shards(name, method.layout, group, rank, world_size, query, kwargs.get("position_ids"))
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
        scaling = qk_dim ** -0.5 if scaling is None else scaling
        width = max(qk_dim, v_dim)
        pad = lambda x: torch.nn.functional.pad(x, (0, width - x.shape[-1]))  # noqa: E731
        query, key, value = pad(query), pad(key), pad(value)
    out, _ = method.attention(query, key, value, causal=causal, scale=scaling, group=group)
    return out[..., :v_dim].transpose(1, 2), None


def _no_mask(method_name: str):
    def mask_function(*args, attention_mask: Optional[torch.Tensor] = None, **kwargs):
        if attention_mask is not None and attention_mask.dim() == 2 and not bool(attention_mask.all()):
            raise ValueError(
                f"{method_name} cannot honour a padding attention_mask with zeros: drop it and pad at the end with "
                "-100 targets instead (prepare_seq_parallel_inputs(..., pad=True))"
            )
        return None

    return mask_function


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


def _patch_family(method: Method, family: str, group, options: dict) -> Optional[str]:
    config_class = _family_config_class(family)
    if method.name == "data_parallel":
        _FAMILY_IMPLEMENTATION.pop(config_class, None)
        return None
    _register(method)
    name = method.attn_implementation
    _FAMILY_BINDINGS[(config_class, name)] = _make_binding(method, None, group, options)
    _install_family_hook(config_class)
    _FAMILY_IMPLEMENTATION[config_class] = name
    return name


# ---------------------------------------------------------------------------------------------- the entry point
def apply_seq_parallel_monkey_patch(method, model, *, group=None, **options) -> Optional[str]:
    """Make ``model`` compute attention with ``method``. Returns the attention implementation name.

    Args:
        method: a registered method name (``"zigzag_ring_attn"``, ``"ring_attn"``, ``"stripe_attn"``,
            ``"dist_flash_attn"``, ``"ulysses_attn"``, ``"usp_attn"``, ``"dca"``, ``"data_parallel"``).
        model: a model instance, switched at once; or a model family name (a transformers ``model_type`` such as
            ``"llama"``), as EasyContext and ChunkLlama are called: every model of that family then uses the method,
            whatever ``attn_implementation`` it is created with, and other families keep their own attention.
        group: the process group this model's attention runs over (default: the current sequence-parallel group,
            see :func:`easy_context.mesh.setup_mesh`, read at every call). It is bound to this model only.
        **options: method options: ``ulysses_degree`` for ``"usp_attn"``; ``pretraining_length``, ``chunk_size``
            and ``local_window`` for ``"dca"``. Other methods take none. Bound to this model only.

    Every attention feature of the model's config the method cannot compute exactly (sliding windows, chunked
    attention, position-dependent query scaling, softcapping, sinks, dropout) is refused here with the fix. The
    returned name is usually the method's name; ``dist_flash_attn`` registers as ``"lightseq_attn"``, because
    transformers takes every implementation whose name contains "flash" for a flash-attention kernel.
    """
    m = get_method(method)
    bound_group = _DYNAMIC if group is None else group
    if isinstance(model, str):
        return _patch_family(m, model, bound_group, options)
    _check_model(m, model, None if group is None else group)
    if m.name == "data_parallel":
        if options:
            raise TypeError(f"data_parallel takes no options, got {sorted(options)}")
        return getattr(model.config, "_attn_implementation", None)
    _register(m)
    binding = _make_binding(m, model, bound_group, options)
    for module in model.modules():
        _BINDINGS[module] = binding
    name = m.attn_implementation
    model.set_attn_implementation(name)
    return name


def _check_model(method: Method, model, group) -> None:
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "set_attn_implementation"):
        raise TypeError(f"expected a transformers PreTrainedModel or a model family name, got {type(model).__name__}")
    if method.name == "data_parallel":
        return
    check_config(method.name, config, model)
    if method.layout is not None:
        config = text_config(config)
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        world = group_size(get_sequence_parallel_group() if group is None else group)
        method.validate(num_heads=heads, num_kv_heads=kv_heads, world_size=world)
