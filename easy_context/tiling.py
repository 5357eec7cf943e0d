"""Sequence-tiled MLP: each decoder layer's MLP runs over tiles of the sequence and is recomputed tile by tile in
backward, so its working set is one tile's intermediate (``tile × intermediate_size``) instead of the whole
sequence's.

Usage::

    from easy_context import enable_tiled_mlp
    enable_tiled_mlp(model)                  # tiles of hidden_size tokens
    enable_tiled_mlp(model, tile_size=2048)  # or a tile size of your own

Why. A Llama-style MLP, ``down(act(gate(x)) * up(x))``, holds several ``tokens × intermediate_size`` tensors (gate,
up, the activation, the product, and their gradients in backward). With ``intermediate_size`` about 3.5× the hidden
size, these are the largest tensors of a decoder layer at long lengths: under full activation checkpointing they set
one layer's recompute working set, and without checkpointing every layer keeps them. The MLP acts on each token on its
own, so it can be computed over any split of the sequence with the same result. DeepSpeed's Arctic Long Sequence
Training (ALST) does this as "TiledMLP"; this module is an independent implementation.

How it works. :func:`enable_tiled_mlp` replaces the ``forward`` of every decoder layer's ``mlp`` module (the instance
attribute; the class, the weights and ``state_dict`` keys are untouched) with one that calls :class:`_TiledMLP`:

* forward, without building a graph: the original ``forward`` on each tile of ``tile_size`` tokens (along the
  sequence dimension, the second-to-last), written into one output tensor. Only the input is saved for backward.
* backward: for each tile, the original ``forward`` again on that tile, with a graph, and ``torch.autograd.grad``
  for the tile's input and the MLP's parameters; input gradients are written into one tensor, parameter gradients
  are summed over the tiles (in float32 for 16-bit parameters) and returned to autograd, which accumulates them into
  ``.grad`` as for any other operation (so gradient hooks, DDP and gradient accumulation see ordinary gradients).
  Under DeepSpeed ZeRO-3 (partitioned parameters) each tile's parameter gradients go to ``.grad`` through
  DeepSpeed's hooks instead, held back from its reduction until the last tile (``ds_grad_is_ready``).

Results. Each output row and each input-gradient row is computed from its own token, as in the plain MLP; the
parameter gradients are the same sums over tokens, added in another order. In float32 the loss and every gradient
agree with the plain model to about 1e-7 relative (``tests/test_tiling.py`` checks 1e-6, also under full and remat
activation checkpointing and sequence-parallel attention). Inputs of at most ``tile_size`` tokens run the plain MLP.

Cost. The MLP runs twice per training step (forward, and again in backward); under full activation checkpointing it
runs three times (forward, the layer's recomputation, the tiled backward), one MLP forward more than without tiling.
The MLP must act on each token independently (no dropout whose mask matters, no mixing across tokens): true of
Llama, Mistral, Qwen2 and their relatives, not of mixture-of-experts blocks with a load-balancing loss.
"""

from __future__ import annotations

from typing import Callable, List, Optional

import torch

__all__ = ["enable_tiled_mlp", "disable_tiled_mlp", "default_tile_size", "tiled_mlp_modules", "resolve_tile_size"]

_ORIGINAL = "_easy_context_untiled_forward"
_TILE = "_easy_context_tile_size"


def default_tile_size(hidden_size: int) -> int:
    """The default tile: ``hidden_size`` tokens (as ALST's TiledMLP), so one tile's MLP intermediate
    (``hidden_size × intermediate_size`` elements) is the size of one of the MLP's weight matrices."""
    return max(1, int(hidden_size))


def resolve_tile_size(tile_size, hidden_size: int) -> int:
    """``tile_size`` checked: a positive integer number of tokens, or ``None`` / ``"auto"`` for
    :func:`default_tile_size`. Anything else is a ``ValueError`` naming the fix."""
    if tile_size is None or tile_size == "auto":
        return default_tile_size(hidden_size)
    if isinstance(tile_size, bool) or not isinstance(tile_size, int) or tile_size < 1:
        raise ValueError(f"tiled MLP: tile_size must be a positive number of tokens, got {tile_size!r}; pass an "
                         f"integer >= 1, or None for the default (the hidden size, {default_tile_size(hidden_size)})")
    return tile_size


def tiled_mlp_modules(model) -> List[torch.nn.Module]:
    """The ``mlp`` module of every decoder layer of ``model`` (a layer is a module with ``self_attn`` and ``mlp``)."""
    return [m.mlp for m in model.modules()
            if isinstance(getattr(m, "mlp", None), torch.nn.Module) and hasattr(m, "self_attn")]


def _hidden_size(model, mlps) -> int:
    config = getattr(model, "config", None)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    size = getattr(config, "hidden_size", None)
    if size is None:
        size = getattr(mlps[0], "hidden_size", None)
    if size is None:
        raise ValueError(f"tiled MLP: cannot find the hidden size of {type(model).__name__}; pass tile_size")
    return int(size)


def enable_tiled_mlp(model, tile_size: Optional[int] = None):
    """Make every decoder layer's MLP of ``model`` compute over sequence tiles of ``tile_size`` tokens (default:
    :func:`default_tile_size`, the hidden size), recomputing each tile in backward. Calling it again changes the
    tile size. Works with activation checkpointing and sequence-parallel attention in any order. Returns ``model``.
    """
    mlps = tiled_mlp_modules(model)
    if not mlps:
        raise ValueError(f"tiled MLP: {type(model).__name__} has no decoder layer with an `mlp` module (Llama, "
                         f"Mistral, Qwen2 and similar models have one); use such a model, or drop the tiled MLP")
    tile = resolve_tile_size(tile_size, _hidden_size(model, mlps))
    for mlp in mlps:
        if _ORIGINAL not in mlp.__dict__:
            original = mlp.forward
            mlp.__dict__[_ORIGINAL] = original
            mlp.forward = _make_tiled_forward(mlp, original)
        mlp.__dict__[_TILE] = tile
    return model


def disable_tiled_mlp(model):
    """Back to the plain MLPs. Returns ``model``."""
    for mlp in tiled_mlp_modules(model):
        if _ORIGINAL in mlp.__dict__:
            del mlp.__dict__["forward"]
            del mlp.__dict__[_ORIGINAL]
            del mlp.__dict__[_TILE]
    return model


def _make_tiled_forward(mlp: torch.nn.Module, original: Callable) -> Callable:
    def forward(x, *args, **kwargs):
        tile = mlp.__dict__[_TILE]
        if args or kwargs or not isinstance(x, torch.Tensor) or x.dim() < 2 or x.shape[-2] <= tile:
            return original(x, *args, **kwargs)
        params = tuple(p for p in mlp.parameters() if p.requires_grad)
        if not torch.is_grad_enabled() or not (x.requires_grad or params):
            with torch.no_grad():
                return _tiles_forward(original, x, tile)
        if any(hasattr(p, "ds_id") for p in params):  # DeepSpeed ZeRO-3 partitions: see _TiledMLP.backward
            return _TiledMLP.apply(original, tile, params, x)
        return _TiledMLP.apply(original, tile, None, x, *params)

    forward.tiled_mlp = True
    return forward


def _tiles(length: int, tile: int):
    for start in range(0, length, tile):
        yield start, min(tile, length - start)


def _tiles_forward(fn: Callable, x: torch.Tensor, tile: int) -> torch.Tensor:
    dim = x.dim() - 2
    out = None
    for start, size in _tiles(x.shape[dim], tile):
        y = fn(x.narrow(dim, start, size))
        if not isinstance(y, torch.Tensor) or y.dim() != x.dim() or y.shape[dim] != size:
            raise ValueError("tiled MLP: the MLP must return one tensor with a row per input token; this one does "
                             "not (a mixture-of-experts block?): drop the tiled MLP for this model")
        if out is None:
            shape = list(y.shape)
            shape[dim] = x.shape[dim]
            out = y.new_empty(shape)
        out.narrow(dim, start, size).copy_(y)
        del y
    return out


class _TiledMLP(torch.autograd.Function):
    """``fn(x)`` over sequence tiles; backward recomputes each tile and differentiates it alone."""

    @staticmethod
    def forward(ctx, fn, tile, zero3_params, x, *params):
        ctx.fn, ctx.tile, ctx.params, ctx.zero3_params = fn, tile, params, zero3_params
        device = x.device.type
        ctx.autocast = (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)) \
            if torch.amp.is_autocast_available(device) else None
        ctx.save_for_backward(x)
        with torch.no_grad():
            return _tiles_forward(fn, x, tile)

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        params, dim = ctx.params, x.dim() - 2
        need_x = ctx.needs_input_grad[3]
        wanted = [i for i, need in enumerate(ctx.needs_input_grad[4:]) if need]
        grad_x = torch.empty_like(x) if need_x else None
        sums: List[Optional[torch.Tensor]] = [None] * len(params)
        device = x.device.type
        autocast = torch.autocast(device, dtype=ctx.autocast[1], enabled=ctx.autocast[0]) \
            if ctx.autocast is not None else torch.autocast(device, enabled=False)
        if ctx.zero3_params is not None:
            return (None, None, None, _zero3_backward(ctx, x, grad_out, grad_x, autocast))
        for start, size in _tiles(x.shape[dim], ctx.tile):
            x_tile = x.narrow(dim, start, size).detach().requires_grad_(need_x)
            with torch.enable_grad(), autocast:
                y = ctx.fn(x_tile)
            inputs = ([x_tile] if need_x else []) + [params[i] for i in wanted]
            grads = torch.autograd.grad(y, inputs, grad_out.narrow(dim, start, size), allow_unused=True)
            del y
            if need_x:
                grad_x.narrow(dim, start, size).copy_(grads[0])
                grads = grads[1:]
            for i, g in zip(wanted, grads):
                if g is None:
                    continue
                if sums[i] is None:
                    sums[i] = g.float() if g.dtype in (torch.float16, torch.bfloat16) else g
                else:
                    sums[i].add_(g)
        param_grads = [s.to(p.dtype) if s is not None else None for s, p in zip(sums, params)]
        return (None, None, None, grad_x, *param_grads)


def _zero3_backward(ctx, x, grad_out, grad_x, autocast):
    """The tiled backward under DeepSpeed ZeRO-3, whose partitioned parameters cannot be inputs of ``autograd.grad``
    nor outputs of this Function: each tile's parameter gradients go to ``.grad`` through DeepSpeed's own hooks
    (``torch.autograd.backward``), which add them to the reduction bucket only after the last tile
    (``ds_grad_is_ready``, as DeepSpeed's own TiledMLP does). Returns the input's gradient."""
    dim = x.dim() - 2
    tiles = list(_tiles(x.shape[dim], ctx.tile))
    try:
        for k, (start, size) in enumerate(tiles):
            for p in ctx.zero3_params:
                p.ds_grad_is_ready = k == len(tiles) - 1
            x_tile = x.narrow(dim, start, size).detach().requires_grad_(grad_x is not None)
            with torch.enable_grad(), autocast:
                y = ctx.fn(x_tile)
            torch.autograd.backward(y, grad_out.narrow(dim, start, size))
            del y
            if grad_x is not None:
                grad_x.narrow(dim, start, size).copy_(x_tile.grad)
    finally:
        for p in ctx.zero3_params:
            p.ds_grad_is_ready = True
    return grad_x
