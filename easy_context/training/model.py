"""The model ``train.py`` trains: building it, activation recomputation, the optimizer, and the wrapper that owns
the whole step's loss."""

from __future__ import annotations

from typing import Optional

import torch

from ..assets import smollm2_path
from ..checkpointing import enable_remat_aware_checkpointing
from ..loss import chunked_cross_entropy_sum, resolve_loss_chunk_size
from ..model_config import set_rope_theta
from ..offload import enable_checkpoint_offload
from ..tiling import enable_tiled_mlp, resolve_tile_size

__all__ = ["TINY_CONFIG", "model_path", "build_model", "CHECKPOINTING", "enable_checkpointing", "build_optimizer",
           "ChunkedLossModel", "loss_chunk_size_arg", "tile_size_arg"]

TINY_CONFIG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, tie_word_embeddings=False)


def model_path(spec: str) -> str:
    """Where ``from_pretrained`` finds ``spec``: the fetched SmolLM2 folder for ``"smollm2"``, else ``spec``."""
    if spec == "smollm2":
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


def enable_checkpointing(model, mode: str = "full", *, tiled_mlp=None, offload: bool = False) -> None:
    """Activation checkpointing of every decoder layer (non-reentrant ``torch.utils.checkpoint``), and the memory
    options that go with it.

    ``"full"`` recomputes whole layers in backward, sequence-parallel attention (communication included) too;
    ``"remat"`` keeps each layer's attention output so the recomputation stops there (DistFlashAttn's
    rematerialization-aware checkpointing, :mod:`easy_context.checkpointing`); ``"none"`` keeps every activation.

    ``tiled_mlp``: ``None``/``False`` off; ``True``/``"auto"`` each MLP over sequence tiles of the default size (the
    hidden size); an integer, tiles of that many tokens (:func:`easy_context.tiling.enable_tiled_mlp`).
    ``offload``: keep the checkpointed layer inputs in host memory (:func:`easy_context.offload.
    enable_checkpoint_offload`; needs ``"full"`` or ``"remat"``). Neither changes the loss or the gradients.
    """
    if mode not in CHECKPOINTING:
        raise ValueError(f"unknown checkpointing mode {mode!r}: choose one of {', '.join(CHECKPOINTING)}")
    if offload and mode == "none":
        raise ValueError("offloading the checkpointed layer inputs needs activation checkpointing: use "
                         "--checkpointing full or remat, or drop --offload-checkpoints")
    if tiled_mlp is not None and tiled_mlp is not False:
        enable_tiled_mlp(model, None if tiled_mlp is True else tiled_mlp)
    if mode == "none":
        return
    kwargs = {"use_reentrant": False}
    if mode == "remat":
        enable_remat_aware_checkpointing(model, kwargs)
    elif hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if offload:
        enable_checkpoint_offload(model)


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


def loss_chunk_size_arg(value: str):
    """``type=`` for ``--loss-chunk-size``: a positive number of tokens, or ``auto`` (sized from memory by
    :func:`easy_context.loss.auto_loss_chunk_size` for each step's local tokens)."""
    import argparse

    if value == "auto":
        return value
    try:
        chunk = int(value)
    except ValueError:
        chunk = 0
    if chunk < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value} (or auto, sized from memory)")
    return chunk


loss_chunk_size_arg.range_text = ">= 1, or auto"


def tile_size_arg(value: str):
    """``type=`` for ``--tiled-mlp``: a positive number of tokens per MLP tile, or ``auto`` (the hidden size)."""
    import argparse

    if value == "auto":
        return value
    try:
        return resolve_tile_size(int(value), 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1 (tokens per MLP tile) or auto (the model's "
                                         f"hidden size), got {value}") from None


tile_size_arg.range_text = ">= 1, or auto"


class ChunkedLossModel(torch.nn.Module):
    """``forward(input_ids, position_ids, target_ids) -> (loss sum, valid-target count)`` of a causal LM.

    Runs the decoder, then :func:`easy_context.chunked_cross_entropy_sum` over the output head ``chunk_size`` tokens
    at a time, so the ``tokens × vocab`` float32 logits never exist at once. One module owns the whole step, so
    DDP and DeepSpeed wrap it like any model; with ZeRO-3 pass ``zero3=True`` so the head weight (used outside the
    head's own forward) is gathered for this module. ``chunk_size="auto"`` sizes the chunk from memory for each
    call's local tokens (:func:`easy_context.loss.auto_loss_chunk_size`); the result does not depend on it.
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
        config = self.model.config
        chunk = resolve_loss_chunk_size(self.chunk_size, target_ids.numel(), hidden_size=config.hidden_size,
                                        intermediate_size=getattr(config, "intermediate_size", 4 * config.hidden_size),
                                        vocab_size=config.vocab_size, dtype_bytes=hidden.element_size())
        return chunked_cross_entropy_sum(hidden, head.weight, target_ids, bias=head.bias, chunk_size=chunk)

