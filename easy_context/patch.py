"""Plugging a method into a HuggingFace model through transformers' own extension points.

The method's attention is registered with ``AttentionInterface`` under the method's name, together with a mask
function in ``AttentionMaskInterface`` that builds no ``S × S`` mask (the schedule knows causality) and refuses masks
it cannot honour. The model is then switched to that implementation with ``set_attn_implementation``. No class's
``forward`` is replaced, so the patch survives transformers releases that rewrite modeling code.
"""

from __future__ import annotations

from typing import Optional

import torch

from .comm import group_size
from .mesh import get_sequence_parallel_group, set_sequence_parallel_group
from .methods import Method, get_method

__all__ = ["apply_seq_parallel_monkey_patch", "sp_attention_forward", "reject_unsupported_features"]


def _attention_interfaces():
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError as err:  # pragma: no cover - exercised only with very old transformers
        raise ImportError(
            "easy_context needs transformers>=4.51 (AttentionInterface): pip install -U transformers"
        ) from err
    return AttentionInterface, AttentionMaskInterface


def reject_unsupported_features(name: str, dropout: float, kwargs: dict) -> None:
    """Raise for attention features no method here implements: dropout, logit softcapping, attention sinks."""
    if dropout:
        raise ValueError(f"{name} does not implement attention dropout ({dropout}): set config.attention_dropout=0")
    if kwargs.get("softcap"):
        raise ValueError(f"{name} does not implement attention logit softcapping (softcap={kwargs['softcap']})")
    if kwargs.get("s_aux") is not None:
        raise ValueError(f"{name} does not implement attention sinks (s_aux)")


def sp_attention_forward(method: Method, module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                         **kwargs):
    """The ``AttentionInterface`` function of a sequence-parallel method.

    ``query`` is ``(B, H, S_local, D)``, ``key``/``value`` ``(B, H_kv, S_local, D)``, already rotated by their global
    positions; returns ``((B, S_local, H, D), None)``.
    """
    name = method.name
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
    group = get_sequence_parallel_group()
    world_size = group_size(group)
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
    out, _ = method.attention(query, key, value, causal=causal, scale=scaling, group=group)
    return out.transpose(1, 2), None


def _no_mask(method_name: str):
    def mask_function(*args, attention_mask: Optional[torch.Tensor] = None, **kwargs):
        if attention_mask is not None and attention_mask.dim() == 2 and not bool(attention_mask.all()):
            raise ValueError(
                f"{method_name} cannot honour a padding attention_mask with zeros: drop it and pad at the end with "
                "-100 targets instead (prepare_seq_parallel_inputs(..., pad=True))"
            )
        return None

    return mask_function


def _family_config(family: str):
    from transformers import CONFIG_MAPPING

    if family not in CONFIG_MAPPING:
        raise ValueError(
            f"unknown model family {family!r}: pass a model instance or a transformers model_type such as "
            "'llama', 'mistral' or 'qwen2'"
        )
    return CONFIG_MAPPING[family]


def apply_seq_parallel_monkey_patch(method, model, *, group=None, **options) -> Optional[str]:
    """Make ``model`` compute attention with ``method``. Returns the attention implementation name.

    Args:
        method: a registered method name (``"zigzag_ring_attn"``, ``"ring_attn"``, ``"stripe_attn"``,
            ``"dist_flash_attn"``, ``"ulysses_attn"``, ``"usp_attn"``, ``"dca"``, ``"data_parallel"``).
        model: a model instance, which is switched to the method at once; or a model family name (a transformers
            ``model_type`` such as ``"llama"``), in which case the implementation is registered and models created
            afterwards with ``attn_implementation=<returned name>`` use it.
        group: the process group to run over (default: the current sequence-parallel group, see
            :func:`easy_context.mesh.set_sequence_parallel_group`).
        **options: method options: ``ulysses_degree`` for ``"usp_attn"``; ``pretraining_length``, ``chunk_size``
            and ``local_window`` for ``"dca"``. Other methods take none.

    The returned name is usually the method's name; ``dist_flash_attn`` registers as ``"lightseq_attn"``, because
    transformers takes every implementation whose name contains "flash" for a flash-attention kernel.
    """
    m = get_method(method)
    if group is not None:
        set_sequence_parallel_group(group)
    is_family = isinstance(model, str)
    if is_family:
        _family_config(model)
    if m.name == "data_parallel":
        return None if is_family else getattr(model.config, "_attn_implementation", None)
    if not is_family:
        _check_model(m, model)
    attention_interface, mask_interface = _attention_interfaces()
    if m.hf_attention is not None:
        attention_fn, mask_fn = m.hf_attention(None if is_family else model, **options)
    else:
        if options:
            raise TypeError(f"{m.name} takes no options, got {sorted(options)}")

        def attention_fn(*args, **kwargs):
            return sp_attention_forward(m, *args, **kwargs)

        mask_fn = _no_mask(m.name)
    name = m.attn_implementation
    attention_interface.register(name, attention_fn)
    mask_interface.register(name, mask_fn)
    if not is_family:
        model.set_attn_implementation(name)
    return name


def _check_model(method: Method, model) -> None:
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "set_attn_implementation"):
        raise TypeError(f"expected a transformers PreTrainedModel or a model family name, got {type(model).__name__}")
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(config, "attn_logit_softcapping", None):
        raise ValueError(f"{method.name} does not implement attention logit softcapping "
                         f"(config.attn_logit_softcapping={config.attn_logit_softcapping})")
    if method.layout is not None:
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        method.validate(num_heads=heads, num_kv_heads=kv_heads,
                        world_size=group_size(get_sequence_parallel_group()))
