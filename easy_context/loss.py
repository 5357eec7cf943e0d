"""Losses that equal the single-process loss exactly under sequence (and data) parallelism.

Each rank holds a slice of the targets, and slices hold different numbers of valid (``!= -100``) targets, so a mean
of per-rank means is *not* the mean over the batch. Here every rank computes the sum of its token losses, the sums
and counts are reduced over the group, and the loss is ``global sum / global count``: the same number on every rank,
equal to what one process computes on the whole batch.

Gradients: the backward of the global sum is an all-reduce of the incoming gradients, so each rank's local terms get
gradient ``W / N`` (W ranks, N valid targets). Averaging parameter gradients over the W ranks, which DDP, DeepSpeed
and accelerate do, then yields exactly the gradient of the global mean. (If you sum gradients instead, divide by W.)

:func:`chunked_cross_entropy_sum` computes the token-loss sum from hidden states in chunks, recomputing each chunk's
logits in backward, so ``tokens × vocab`` logits never exist at once (32K tokens × 49K vocab is 6 GB in float32).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .comm import all_reduce_sum, group_size

__all__ = [
    "IGNORE_INDEX",
    "global_sum",
    "token_weighted_loss",
    "seq_parallel_cross_entropy",
    "chunked_cross_entropy_sum",
    "LOSS_CHUNK_ROWS",
    "loss_bytes_per_chunk_token",
    "loss_chunk_size_for_budget",
    "auto_loss_chunk_size",
    "resolve_loss_chunk_size",
]

IGNORE_INDEX = -100


class _GlobalSum(torch.autograd.Function):
    """All-reduce (sum) whose backward is again an all-reduce (sum) of the gradients."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        y = x.clone().contiguous()
        dist.all_reduce(y, group=group)
        return y

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone().contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def global_sum(x: torch.Tensor, group=None) -> torch.Tensor:
    """Differentiable sum of ``x`` over ``group``; the identity on a single process."""
    return x if group_size(group) == 1 else _GlobalSum.apply(x, group)


def token_weighted_loss(loss_sum: torch.Tensor, count: torch.Tensor, group=None) -> torch.Tensor:
    """``sum over the group of loss_sum / sum over the group of count``.

    ``group`` is the group whose gradients get averaged: by default every process (sequence *and* data parallel
    ranks), which makes the result the token-weighted mean over the global batch.
    """
    total = all_reduce_sum(count.detach().to(torch.float64), group)
    if total.item() == 0:
        raise ValueError("no valid targets in the batch (all are -100): nothing to average")
    return global_sum(loss_sum.float(), group) / total.to(torch.float32)


def seq_parallel_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, group=None, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Token-weighted cross entropy of this rank's ``logits`` ``(..., V)`` against ``targets`` ``(...)``."""
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match targets {tuple(targets.shape)}")
    loss_sum = F.cross_entropy(
        logits.flatten(0, -2).float(), targets.flatten(), ignore_index=ignore_index, reduction="sum"
    )
    return token_weighted_loss(loss_sum, (targets != ignore_index).sum(), group)


def _chunk_loss(hidden, weight, bias, targets, ignore_index):
    logits = F.linear(hidden, weight, bias).float()
    return F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="sum")


def chunked_cross_entropy_sum(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    chunk_size: int = 4096,
    ignore_index: int = IGNORE_INDEX,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(sum of token losses, number of valid targets)`` for ``logits = hidden @ weight.T + bias``.

    ``hidden`` is ``(..., E)`` and ``targets`` ``(...)``. Logits exist for ``chunk_size`` tokens at a time, in forward
    and (recomputed) in backward.
    """
    hidden = hidden.flatten(0, -2)
    targets = targets.flatten().to(hidden.device)
    if hidden.shape[0] != targets.shape[0]:
        raise ValueError(f"{hidden.shape[0]} hidden states but {targets.shape[0]} targets")
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_size):
        h, t = hidden[start : start + chunk_size], targets[start : start + chunk_size]
        if not bool((t != ignore_index).any()):
            continue
        if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
            total = total + checkpoint(_chunk_loss, h, weight, bias, t, ignore_index, use_reentrant=False)
        else:
            total = total + _chunk_loss(h, weight, bias, t, ignore_index)
    return total, (targets != ignore_index).sum()


#: Float32 ``vocab``-wide rows alive at once per token of a chunk at the loss's peak (its backward: the recomputed
#: logits' log-softmax, the gradient of the loss and the logits' gradient).
LOSS_CHUNK_ROWS = 3


def loss_bytes_per_chunk_token(vocab_size: int, dtype_bytes: int = 4) -> int:
    """Bytes of the loss's working set per token of a chunk: ``LOSS_CHUNK_ROWS`` float32 rows of ``vocab_size``,
    plus the head's own output row in a 16-bit training dtype."""
    return (LOSS_CHUNK_ROWS * 4 + (dtype_bytes if dtype_bytes < 4 else 0)) * vocab_size


def loss_chunk_size_for_budget(budget_bytes: float, vocab_size: int, *, dtype_bytes: int = 4,
                               multiple: int = 256) -> int:
    """The largest chunk (a multiple of ``multiple`` tokens, at least ``multiple``) whose loss working set
    (:func:`loss_bytes_per_chunk_token` per token) fits in ``budget_bytes``."""
    chunk = int(budget_bytes // loss_bytes_per_chunk_token(vocab_size, dtype_bytes))
    return max(multiple, chunk // multiple * multiple)


def auto_loss_chunk_size(tokens: int, *, hidden_size: int, intermediate_size: int, vocab_size: int,
                         dtype_bytes: int = 4, multiple: int = 256) -> int:
    """A loss chunk sized from memory rather than fixed: its working set is at most half of what one decoder layer
    holds while it is recomputed over the same ``tokens`` (``(8 × hidden + 6 × intermediate) × dtype_bytes`` per
    token, as ``benchmarks/memory_scaling.py`` measures it), so the loss does not set the step's peak and shrinks,
    like the rest of the step, as the sequence is split over more ranks. The result is a multiple of ``multiple``
    tokens, at least ``multiple`` and at most ``tokens`` rounded up to it. The chunk size never changes the result:
    the chunks' sums add up to the same loss and gradients."""
    layer_bytes = tokens * (8 * hidden_size + 6 * intermediate_size) * dtype_bytes
    chunk = loss_chunk_size_for_budget(layer_bytes / 2, vocab_size, dtype_bytes=dtype_bytes, multiple=multiple)
    return min(chunk, -(-tokens // multiple) * multiple)


def resolve_loss_chunk_size(spec, tokens: int, *, hidden_size: int, intermediate_size: int, vocab_size: int,
                            dtype_bytes: int = 4) -> int:
    """``spec`` as an integer chunk size, or ``"auto"`` as :func:`auto_loss_chunk_size` for ``tokens`` tokens."""
    if spec == "auto":
        return auto_loss_chunk_size(tokens, hidden_size=hidden_size, intermediate_size=intermediate_size,
                                    vocab_size=vocab_size, dtype_bytes=dtype_bytes)
    chunk = int(spec)
    if chunk < 1:
        raise ValueError(f"loss chunk size must be a positive integer or 'auto', got {spec!r}")
    return chunk
