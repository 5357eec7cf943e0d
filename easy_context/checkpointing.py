"""Rematerialization-aware gradient checkpointing: recomputation stops at the attention output.

With plain gradient checkpointing every decoder layer runs twice per training step: once in the forward pass, and once
more in the backward pass to rebuild the activations it dropped. For sequence-parallel attention that second run
repeats the whole distributed attention forward (every block, every transfer). DistFlashAttn (Li et al. 2023) places
the checkpoint boundary at the attention output instead: keep each layer's attention output (and what its backward
needs), and let the backward recomputation rebuild only the cheap parts (norms, projections, rotary embeddings, MLP).

Usage::

    from easy_context.checkpointing import enable_remat_aware_checkpointing
    apply_seq_parallel_monkey_patch("dist_flash_attn", model)
    enable_remat_aware_checkpointing(model)          # turns on HF gradient checkpointing if it is off

How it works. Transformers' decoder layers (``GradientCheckpointingLayer``) call
``self._gradient_checkpointing_func(layer_forward, *args)``. :func:`enable_remat_aware_checkpointing` wraps that
function of every layer, whatever it is (non-reentrant or reentrant ``torch.utils.checkpoint``, with or without CPU
offload), so each checkpointed call gets a fresh *frame*: the first run of the layer *records*, the recomputation
*replays*. The model's attention implementation in ``AttentionInterface`` is wrapped once; outside a frame it is
untouched.

* Record (first forward). The attention function runs once, on graph-detached ``q, k, v`` that a small tap Function
  (:class:`_Tap`) turns back into differentiable inputs: its autograd graph is private to the frame. Its saved tensors
  go through this module's ``saved_tensors_hooks``: a saved tensor that *is* one of the inputs ``q, k, v`` is stored as
  a placeholder (its memory is not kept; the recomputation rebuilds it), anything else (the output, the LSE) is kept.
  The layer sees the output through :class:`_Replay`.
* Replay (recomputation in backward). The attention function is not called: :class:`_Replay` returns the recorded
  output and saves the recomputed ``q, k, v``.
* Backward of :class:`_Replay`: the placeholders are bound to the recomputed ``q, k, v`` and the private graph is
  run backward once: the method's own backward (any schedule's, or SDPA's), whose gradients the tap returns to the
  recomputed ``q, k, v``.

It is therefore exact for every attention implementation registered in ``AttentionInterface`` (every
sequence-parallel method of this package, ``sdpa``, flash-attention), with no per-method code. Memory per layer: the
attention output and LSE (as DistFlashAttn keeps them), plus whatever else the method saves besides its inputs.
A step's graph can be run backward once (no ``retain_graph``).
"""

from __future__ import annotations

import functools
import threading
from typing import Any, Callable, List, Optional

import torch

from .model_config import text_config

__all__ = ["enable_remat_aware_checkpointing", "disable_remat_aware_checkpointing", "is_remat_aware"]

_LOCAL = threading.local()  # .frames: the stack of frames being run on this thread


def _current_frame() -> Optional["_Frame"]:
    frames = getattr(_LOCAL, "frames", None)
    return frames[-1] if frames else None


class _Slot:
    """Placeholder for a saved tensor that is one of the attention inputs (index 0, 1, 2 for q, k, v)."""

    __slots__ = ("index",)

    def __init__(self, index: int):
        self.index = index


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
            and a.dtype == b.dtype and a.device == b.device)


class _Entry:
    """One attention call of one checkpointed layer: its recorded output and its private autograd graph."""

    def __init__(self):
        self.inputs: Optional[tuple] = None  # the tapped q, k, v while the attention function runs
        self.bound: Optional[tuple] = None  # the recomputed q, k, v while the private graph runs backward
        self.grads: Optional[tuple] = None
        self.graph_output: Optional[torch.Tensor] = None
        self.output: Optional[torch.Tensor] = None
        self.rest: Any = None

    # saved_tensors_hooks of the private graph
    def pack(self, x: torch.Tensor):
        for i, tapped in enumerate(self.inputs or ()):
            if _same_tensor(x, tapped):
                return _Slot(i)
        return x

    def unpack(self, x):
        if not isinstance(x, _Slot):
            return x
        if self.bound is None:
            raise RuntimeError("remat-aware checkpointing: the attention inputs were not recomputed before the "
                               "attention backward ran")
        return self.bound[x.index].contiguous()

    def record(self, fn: Callable, module, query, key, value, args, kwargs):
        token = torch.zeros((), device=query.device, requires_grad=True)
        with torch.enable_grad():
            self.inputs = _Tap.apply(self, token, query.detach(), key.detach(), value.detach())
            try:
                with torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack):
                    result = fn(module, *self.inputs, *args, **kwargs)
            finally:
                self.inputs = None
        out, *self.rest = result
        self.graph_output = out if out.requires_grad else None
        self.output = out.detach()

    def backward(self, dout: torch.Tensor, q, k, v):
        if self.graph_output is None:
            raise RuntimeError("remat-aware checkpointing: this attention output was already used in a backward pass "
                               "(retain_graph is not supported)")
        self.bound = (q, k, v)
        try:
            torch.autograd.backward(self.graph_output, dout)
        finally:
            self.bound, self.graph_output = None, None
        grads, self.grads = self.grads, None
        return grads


class _Tap(torch.autograd.Function):
    """Entry of a private attention graph: contiguous aliases of q, k, v whose gradients are handed to the entry."""

    @staticmethod
    def forward(ctx, entry: _Entry, token, q, k, v):
        ctx.entry = entry
        return tuple(x.contiguous() if not x.is_contiguous() else x.view_as(x) for x in (q, k, v))

    @staticmethod
    def backward(ctx, dq, dk, dv):
        ctx.entry.grads = (dq, dk, dv)
        return None, None, None, None, None


class _Replay(torch.autograd.Function):
    """The recorded attention output, differentiable in q, k, v through the entry's private graph."""

    @staticmethod
    def forward(ctx, entry: _Entry, q, k, v):
        ctx.entry = entry
        ctx.save_for_backward(q, k, v)  # under checkpointing: dropped, and rebuilt by the recomputation
        return entry.output.view_as(entry.output)

    @staticmethod
    def backward(ctx, dout):
        q, k, v = ctx.saved_tensors
        return (None, *ctx.entry.backward(dout, q, k, v))


class _Frame:
    """The attention calls of one checkpointed layer call: recorded by its first run, replayed by the second."""

    def __init__(self):
        self.entries: List[_Entry] = []
        self.runs = 0
        self.cursor = 0

    def run(self, function: Callable, *args, **kwargs):
        self.runs += 1
        self.cursor = 0
        frames = _LOCAL.__dict__.setdefault("frames", [])
        frames.append(self)
        try:
            return function(*args, **kwargs)
        finally:
            frames.pop()

    def attend(self, fn: Callable, module, query, key, value, args, kwargs):
        if self.runs == 1:
            entry = _Entry()
            entry.record(fn, module, query, key, value, args, kwargs)
            self.entries.append(entry)
        else:
            if self.cursor >= len(self.entries):
                raise RuntimeError("remat-aware checkpointing: the recomputation called attention more often than "
                                   "the forward pass")
            entry = self.entries[self.cursor]
            self.cursor += 1
        return (_Replay.apply(entry, query, key, value), *entry.rest)


# ----------------------------------------------------------------------------------------------------------------------
# Installation
# ----------------------------------------------------------------------------------------------------------------------
def _remat_attention(fn: Callable) -> Callable:
    """``fn`` (an ``AttentionInterface`` function), recorded/replayed inside a remat frame and untouched outside."""

    @functools.wraps(fn)
    def attention(module, query, key, value, *args, **kwargs):
        frame = _current_frame()
        if frame is None:
            return fn(module, query, key, value, *args, **kwargs)
        return frame.attend(fn, module, query, key, value, args, kwargs)

    attention.remat_wrapped = fn
    return attention


def _ensure_attention_wrapped(implementation: str) -> None:
    from transformers import AttentionInterface

    fn = AttentionInterface._global_mapping.get(implementation)
    if fn is None:
        raise ValueError(
            f"remat-aware checkpointing wraps the model's attention function in transformers' AttentionInterface, "
            f"which has no {implementation!r}: use a sequence-parallel method (apply_seq_parallel_monkey_patch) or "
            f"attn_implementation='sdpa'"
        )
    if getattr(fn, "remat_wrapped", None) is None:
        AttentionInterface.register(implementation, _remat_attention(fn))


class _RematCheckpoint:
    """Replaces a layer's ``_gradient_checkpointing_func``: runs ``checkpoint_fn`` with a fresh frame per call."""

    def __init__(self, checkpoint_fn: Callable, config):
        self.checkpoint_fn = checkpoint_fn
        self.config = config

    def __call__(self, function: Callable, *args, **kwargs):
        # Re-check on every call: the model may have been switched to another method since it was enabled.
        _ensure_attention_wrapped(self.config._attn_implementation)
        frame = _Frame()
        return self.checkpoint_fn(functools.partial(frame.run, function), *args, **kwargs)


def _checkpointing_layers(model):
    return [m for m in model.modules() if getattr(m, "gradient_checkpointing", False)
            and callable(getattr(m, "_gradient_checkpointing_func", None))]


def enable_remat_aware_checkpointing(model, gradient_checkpointing_kwargs: Optional[dict] = None):
    """Turn on gradient checkpointing for ``model`` with recomputation stopping at the attention output.

    If HF gradient checkpointing is off it is turned on first (``gradient_checkpointing_kwargs`` as for
    ``model.gradient_checkpointing_enable``; default non-reentrant); if it is on, its settings are kept and
    ``gradient_checkpointing_kwargs`` must be ``None``. Call it after ``gradient_checkpointing_enable`` (which would
    replace the wrappers) and before training. Returns ``model``.
    """
    if not _checkpointing_layers(model):
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=gradient_checkpointing_kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs)
    elif gradient_checkpointing_kwargs is not None:
        raise ValueError("gradient checkpointing is already on: pass its kwargs to gradient_checkpointing_enable, "
                         "or call enable_remat_aware_checkpointing on a model without checkpointing")
    layers = _checkpointing_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no layer that supports gradient checkpointing")
    config = text_config(model.config)
    _ensure_attention_wrapped(config._attn_implementation)
    for layer in layers:
        if not isinstance(layer._gradient_checkpointing_func, _RematCheckpoint):
            layer._gradient_checkpointing_func = _RematCheckpoint(layer._gradient_checkpointing_func, config)
    return model


def disable_remat_aware_checkpointing(model):
    """Back to plain gradient checkpointing (still on). Returns ``model``."""
    for module in model.modules():
        fn = getattr(module, "_gradient_checkpointing_func", None)
        if isinstance(fn, _RematCheckpoint):
            module._gradient_checkpointing_func = fn.checkpoint_fn
    return model


def is_remat_aware(model) -> bool:
    """Whether every checkpointed layer of ``model`` stops recomputation at the attention output."""
    layers = _checkpointing_layers(model)
    return bool(layers) and all(isinstance(m._gradient_checkpointing_func, _RematCheckpoint) for m in layers)
