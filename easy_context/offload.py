"""Host-memory offload of the checkpointed layer inputs.

Under activation checkpointing, what stays on the accelerator between the forward and the backward pass is, per
decoder layer, the layer's input (``tokens × hidden_size``; the layer's inside is recomputed in backward). At long
lengths these ``L`` tensors are the largest part of a step's activations (the ``checkpointed`` term of
docs/capacity.md). :func:`enable_checkpoint_offload` keeps them in host memory instead: each is copied to the host
when the layer's forward saves it and copied back when the backward pass recomputes that layer.

Usage::

    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    offload = enable_checkpoint_offload(model)       # after checkpointing (and remat-aware checkpointing) is on
    ...
    offload.saved_tensors, offload.saved_bytes       # what went through the hooks so far

How it works. ``torch.utils.checkpoint`` saves the inputs of a checkpointed call as saved tensors *before* it
installs its own saved-tensor hooks for the inside of the call, so saved-tensor hooks around the call see exactly
the checkpointed inputs and nothing from inside the layer. Transformers' decoder layers call
``self._gradient_checkpointing_func(layer_forward, hidden_states)`` (every other argument is bound into
``layer_forward``), so those hooks see one tensor per layer: its input hidden states. The RoPE cos/sin and the mask,
shared by every layer, stay where they are. :func:`enable_checkpoint_offload` wraps each layer's
``_gradient_checkpointing_func`` with :class:`CheckpointOffload`'s hooks, inside remat-aware checkpointing's wrapper
when that is on.

Exact: the copy to the host and back is bit for bit, so the loss and gradients are identical (tested with
``torch.equal``). Cost: one device-to-host copy per layer in forward (blocking, as ``torch.autograd.graph.save_on_cpu``
does) and one host-to-device copy per layer in backward, into pinned host memory on CUDA.

On a CPU-only run the inputs already are in host memory: the hooks see them, count them, and keep them as they are
(nothing is copied, and memory does not change).
"""

from __future__ import annotations

from typing import Callable

import torch

from .checkpointing import _checkpointing_layers, _RematCheckpoint

__all__ = ["CheckpointOffload", "enable_checkpoint_offload", "disable_checkpoint_offload", "checkpoint_offload"]


class CheckpointOffload:
    """Saved-tensor hooks that keep tensors in host memory; ``saved_tensors`` / ``saved_bytes`` count what they
    have been given (cumulative), ``copied_bytes`` what they copied off an accelerator."""

    def __init__(self):
        self.saved_tensors = 0
        self.saved_bytes = 0
        self.copied_bytes = 0

    def pack(self, tensor: torch.Tensor):
        nbytes = tensor.numel() * tensor.element_size()
        self.saved_tensors += 1
        self.saved_bytes += nbytes
        if tensor.device.type == "cpu":
            return None, tensor  # already in host memory
        host = torch.empty(tensor.size(), dtype=tensor.dtype, layout=tensor.layout,
                           pin_memory=torch.cuda.is_available() and not tensor.is_sparse)
        host.copy_(tensor)
        self.copied_bytes += nbytes
        return tensor.device, host

    @staticmethod
    def unpack(packed):
        device, tensor = packed
        if device is None:
            return tensor
        return tensor.to(device, non_blocking=tensor.is_pinned())

    def hooks(self):
        """The context manager that routes the tensors saved inside it through these hooks."""
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)


class _OffloadedCheckpoint:
    """A layer's ``_gradient_checkpointing_func`` whose checkpointed inputs go through ``offload``'s hooks."""

    def __init__(self, checkpoint_fn: Callable, offload: CheckpointOffload):
        self.checkpoint_fn = checkpoint_fn
        self.offload = offload

    def __call__(self, function: Callable, *args, **kwargs):
        with self.offload.hooks():
            return self.checkpoint_fn(function, *args, **kwargs)


def _inner(layer):
    """``(owner, attribute)`` of the checkpoint function to wrap: inside remat-aware checkpointing's wrapper."""
    fn = layer._gradient_checkpointing_func
    if isinstance(fn, _RematCheckpoint):
        return fn, "checkpoint_fn"
    return layer, "_gradient_checkpointing_func"


def checkpoint_offload(model):
    """The :class:`CheckpointOffload` of ``model``, or ``None`` when the offload is off."""
    for layer in _checkpointing_layers(model):
        owner, attr = _inner(layer)
        fn = getattr(owner, attr)
        if isinstance(fn, _OffloadedCheckpoint):
            return fn.offload
    return None


def enable_checkpoint_offload(model) -> CheckpointOffload:
    """Keep the checkpointed layer inputs of ``model`` in host memory (see the module's doc). Activation
    checkpointing must be on (``gradient_checkpointing_enable`` / ``easy_context.training.enable_checkpointing``);
    enabling checkpointing again afterwards removes the offload. Returns the hooks' :class:`CheckpointOffload`."""
    layers = _checkpointing_layers(model)
    if not layers:
        raise ValueError(f"checkpoint offload: {type(model).__name__} has no checkpointed layer; turn on activation "
                         f"checkpointing first (full or remat), or drop the offload")
    offload = checkpoint_offload(model) or CheckpointOffload()
    for layer in layers:
        owner, attr = _inner(layer)
        fn = getattr(owner, attr)
        if not isinstance(fn, _OffloadedCheckpoint):
            setattr(owner, attr, _OffloadedCheckpoint(fn, offload))
    return offload


def disable_checkpoint_offload(model):
    """Back to keeping the checkpointed layer inputs where they are. Returns ``model``."""
    for layer in _checkpointing_layers(model):
        owner, attr = _inner(layer)
        fn = getattr(owner, attr)
        if isinstance(fn, _OffloadedCheckpoint):
            setattr(owner, attr, fn.checkpoint_fn)
    return model
