"""The public patch calls: switch a HuggingFace model, or a whole model family, to a method.

``apply_seq_parallel_monkey_patch("zigzag_ring_attn", model)`` switches one model instance;
``apply_seq_parallel_monkey_patch("zigzag_ring_attn", "llama")`` makes every Llama model use the method, however it
is loaded (``attn_implementation="flash_attention_2"``, ``"sdpa"``, ``"eager"`` or nothing), before or after the call,
as EasyContext and ChunkLlama are called; other families keep their own attention, and
``apply_seq_parallel_monkey_patch("data_parallel", "llama")`` removes the family patch. ``replace_with_chunkllama``
is ChunkLlama's entry point to Dual Chunk Attention.

How the method reaches the model (transformers' ``AttentionInterface``, per-model bindings, family patches) is in
:mod:`easy_context.hf_attention`.
"""

from __future__ import annotations

from typing import Optional

from .checks import check_config
from .comm import group_size
from .hf_attention import DYNAMIC, bind_model, make_binding, patch_family, register_method, unpatch_family
from .mesh import get_sequence_parallel_group
from .methods import Method, get_method
from .model_config import attention_heads

__all__ = ["apply_seq_parallel_monkey_patch", "replace_with_chunkllama"]


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
    bound_group = DYNAMIC if group is None else group
    if isinstance(model, str):
        if m.name == "data_parallel":
            unpatch_family(model)
            return None
        return patch_family(m, model, bound_group, options)
    _check_model(m, model, None if group is None else group)
    if m.name == "data_parallel":
        if options:
            raise TypeError(f"data_parallel takes no options, got {sorted(options)}")
        return getattr(model.config, "_attn_implementation", None)
    register_method(m)
    bind_model(model, make_binding(m, model, bound_group, options))
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
        heads, kv_heads = attention_heads(config)
        world = group_size(get_sequence_parallel_group() if group is None else group)
        method.validate(num_heads=heads, num_kv_heads=kv_heads, world_size=world)


def replace_with_chunkllama(pretraining_length: int = 4096, local_window_size: Optional[int] = None, *,
                            model="llama", chunk_size: Optional[int] = None) -> Optional[str]:
    """ChunkLlama's entry point: switch ``model`` to Dual Chunk Attention. Returns the attention implementation name.

    ``model`` is a model instance (switched at once; recommended) or a family name such as ``"llama"``,
    ``"mistral"`` or ``"qwen2"`` (then create models with ``attn_implementation="dca"``). ``local_window_size`` is
    the local window ``w`` (default ``pretraining_length // 8``) and ``chunk_size`` the chunk size ``s`` (default
    ``3 * pretraining_length // 4``). Positions follow the paper's formulas (see :mod:`easy_context.methods.dca`).
    """
    return apply_seq_parallel_monkey_patch(
        "dca", model, pretraining_length=pretraining_length, chunk_size=chunk_size, local_window=local_window_size
    )
