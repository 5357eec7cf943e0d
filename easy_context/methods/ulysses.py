"""Ulysses attention (DeepSpeed-Ulysses): trade sequence shards for head shards with all-to-all.

Each of the P ranks holds S/P contiguous tokens of all heads. One all-to-all per tensor scatters the heads and gathers
the sequence, so every rank then holds *all* S tokens of H/P query heads (and their K/V heads); plain block attention
runs over the full sequence, which is exact and perfectly balanced; one all-to-all returns the output to sequence
shards. Forward moves q, k, v and out: 4 all-to-alls, each of a local tensor of S·H·D/P elements (K/V: S·H_kv'·D/P,
with H_kv' the KV heads after replication, see below); backward moves their gradients the same way.

Autograd: the all-to-all is a small autograd Function whose backward is the reverse all-to-all, and the local
attention is another (forward :func:`block_attention`, backward :func:`block_attention_backward`). Autograd chains
them, so dQ/dK/dV come back to their sequence shards exactly; ``lse`` is returned without a graph, like the ring
methods'.

GQA: each rank needs the KV heads of its H/P query heads.

* ``H_kv % P == 0``: KV heads are split like the query heads, H_kv/P per rank.
* ``P % H_kv == 0`` (fewer KV heads than ranks): each KV head is replicated P/H_kv times before the all-to-all so
  every rank receives the one KV head its query heads share; the gradients of the copies are summed back (by
  autograd, through ``repeat_interleave``).
* otherwise there is no way to give each rank whole KV groups, and :func:`check_heads` names the valid sizes.

The query heads must divide by P.

Packed documents: ``doc_ids`` holds the document id of every token of the *full* sequence (``(S,)`` or ``(B, S)``,
from :func:`easy_context.kernels.document_ids`), the same on every rank. After the all-to-all every rank holds the
whole sequence in order (the members' contiguous shards in rank order), so ``doc_ids`` themselves are the ids of its
query rows and key rows: the local attention computes one causal square per document (non-causal: one full square),
on H/P heads. The work is the documents' own on every rank, balanced by heads whatever the documents.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from ..comm import group_size
from ..kernels import block_attention, block_attention_backward, softmax_scale
from ..layout import CONTIGUOUS
from .base import Method, register
from .ring import full_sequence_doc_ids

__all__ = ["all_to_all", "ulysses_attn", "local_attention", "check_heads", "kv_replication", "valid_ulysses_sizes"]

HEADS, SEQ = 1, 2  # dimensions of (B, H, S, D)


# ----------------------------------------------------------------------------------------------------------------------
# All-to-all between heads and sequence
# ----------------------------------------------------------------------------------------------------------------------
def _exchange(x: torch.Tensor, group, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    """Split ``x`` into P pieces along ``scatter_dim``, send piece j to rank j, and concatenate the pieces received
    (in rank order) along ``gather_dim``."""
    world = group_size(group)
    if x.shape[scatter_dim] % world:
        raise ValueError(f"cannot split dimension {scatter_dim} of size {x.shape[scatter_dim]} over {world} ranks")
    send = torch.stack(x.tensor_split(world, dim=scatter_dim))  # (P, ...) contiguous, piece j for rank j
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return torch.cat(recv.unbind(0), dim=gather_dim)


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, scatter_dim, gather_dim):
        ctx.args = (group, scatter_dim, gather_dim)
        return _exchange(x, group, scatter_dim, gather_dim)

    @staticmethod
    def backward(ctx, grad):
        group, scatter_dim, gather_dim = ctx.args
        return _exchange(grad.contiguous(), group, gather_dim, scatter_dim), None, None, None


def all_to_all(x: torch.Tensor, group=None, scatter_dim: int = HEADS, gather_dim: int = SEQ) -> torch.Tensor:
    """Differentiable all-to-all over ``group``: scatter ``scatter_dim``, gather ``gather_dim``.

    With the defaults, ``(B, H, S/P, D)`` sequence shards become ``(B, H/P, S, D)`` head shards; swapping the two
    dimensions is the inverse. Gathered pieces are concatenated in group-rank order.
    """
    if group_size(group) == 1:
        return x
    return _AllToAll.apply(x, group, scatter_dim, gather_dim)


# ----------------------------------------------------------------------------------------------------------------------
# Local attention over the full sequence
# ----------------------------------------------------------------------------------------------------------------------
class _LocalAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, scale, backend, docs):
        out, lse = block_attention(q, k, v, causal, scale, backend, docs, docs)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (causal, scale, backend, docs)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        causal, scale, backend, docs = ctx.args
        dq, dk, dv = block_attention_backward(dout.contiguous(), q, k, v, out, lse, causal, scale, backend, docs, docs)
        return dq, dk, dv, None, None, None, None


def local_attention(q, k, v, *, causal: bool = True, scale=None, backend=None, doc_ids=None):
    """Single-block attention with autograd: ``(out, lse)`` for ``(B, H, S, D)`` tensors on one process.

    ``doc_ids``: the document id of every row (``(S,)`` or ``(B, S)``), or ``None`` for one document."""
    return _LocalAttention.apply(q, k, v, causal, softmax_scale(q, scale), backend, doc_ids)


# ----------------------------------------------------------------------------------------------------------------------
# Head constraints
# ----------------------------------------------------------------------------------------------------------------------
def _splits(num_heads: int, num_kv_heads: int, size: int) -> bool:
    return num_heads % size == 0 and (num_kv_heads % size == 0 or size % num_kv_heads == 0)


def valid_ulysses_sizes(num_heads: int, num_kv_heads: int, limit: Optional[int] = None):
    """Group sizes Ulysses can split ``num_heads`` query and ``num_kv_heads`` KV heads over (up to ``limit``)."""
    limit = num_heads if limit is None else limit
    return [p for p in range(1, limit + 1) if _splits(num_heads, num_kv_heads, p)]


def check_heads(num_heads: int, num_kv_heads: int, size: int, what: str = "ulysses_attn over") -> None:
    """Raise ``ValueError`` naming the valid sizes unless the heads split over ``size`` ranks."""
    if num_kv_heads < 1 or num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads are not a multiple of {num_kv_heads} key/value heads")
    if _splits(num_heads, num_kv_heads, size):
        return
    valid = ", ".join(map(str, valid_ulysses_sizes(num_heads, num_kv_heads)))
    if num_heads % size:
        reason = f"the {num_heads} query heads do not divide by {size}"
    else:
        reason = (f"the {num_kv_heads} key/value heads neither divide by {size} nor divide {size} (so they can be "
                  "neither split nor replicated evenly)")
    raise ValueError(f"{what} {size} ranks: {reason}. Valid sizes for {num_heads} query / {num_kv_heads} key/value "
                     f"heads: {valid}")


def kv_replication(num_kv_heads: int, size: int) -> int:
    """How many copies of each KV head the all-to-all sends (1 when the KV heads divide by ``size``)."""
    return 1 if num_kv_heads % size == 0 else size // num_kv_heads


# ----------------------------------------------------------------------------------------------------------------------
# The method
# ----------------------------------------------------------------------------------------------------------------------
def heads_to_sequence(q, k, v, group):
    """All-to-all ``(B, H, S/P, D)`` sequence shards of q, k, v into ``(B, H/P, S, D)`` head shards over ``group``
    (replicating KV heads when there are fewer than P)."""
    size = group_size(group)
    check_heads(q.shape[HEADS], k.shape[HEADS], size)
    copies = kv_replication(k.shape[HEADS], size)
    if copies > 1:
        k, v = k.repeat_interleave(copies, dim=HEADS), v.repeat_interleave(copies, dim=HEADS)
    return (all_to_all(x.contiguous(), group, HEADS, SEQ) for x in (q, k, v))


def sequence_to_heads(out, lse, group):
    """Inverse of :func:`heads_to_sequence` for the attention result: ``(B, H/P, S, D)`` out and ``(B, H/P, S)``
    lse back to ``(B, H, S/P, D)`` and ``(B, H, S/P)``. Only ``out`` is differentiable."""
    out = all_to_all(out.contiguous(), group, SEQ, HEADS)
    if group_size(group) > 1:
        with torch.no_grad():
            lse = _exchange(lse.unsqueeze(-1).contiguous(), group, SEQ, HEADS).squeeze(-1)
    return out, lse


def ulysses_attn(q, k, v, *, causal: bool = True, scale=None, group=None, backend=None, doc_ids=None):
    """Ulysses attention of this rank's contiguous ``(B, H, S/P, D)`` shards; returns ``(out, lse)`` shards.

    ``doc_ids``: document ids of the full sequence (see the module notes); a query then attends only to keys of its
    own document."""
    if doc_ids is not None:
        doc_ids = full_sequence_doc_ids(doc_ids, group_size(group), q.shape[SEQ], q.shape[0], "ulysses_attn")
    qh, kh, vh = heads_to_sequence(q, k, v, group)
    out, lse = local_attention(qh, kh, vh, causal=causal, scale=scale, backend=backend, doc_ids=doc_ids)
    return sequence_to_heads(out, lse, group)


def _check(*, num_heads: int, num_kv_heads: int, world_size: int) -> None:
    check_heads(num_heads, num_kv_heads, world_size)


ULYSSES = register(
    Method(
        name="ulysses_attn",
        description="all-to-all heads <-> sequence, then full-sequence attention on H/P heads; perfectly balanced",
        layout=CONTIGUOUS,
        attention=ulysses_attn,
        check=_check,
        documents=True,
        communication="4 all-to-alls (q, k, v, out) of a local S·H·D/P tensor each (K/V: S·max(H_kv,P)·D/P); "
                      "backward the same 4 for the gradients",
    ),
    "ulysses",
)
