"""Ring attention, and the ring engine that zigzag and stripe attention reuse.

Every rank keeps its queries and passes its K/V block to the next rank, P-1 times, so each query shard meets every
K/V shard once. The three ring methods differ only in their *plan*: which (query rows, key rows, causal) pieces of a
(local queries, visiting K/V block) pair must be computed, given the layout that placed the tokens. The engine
(:class:`RingAttention`) is shared:

* forward: prefetch the next K/V block while computing the current one; merge pieces into a float32 running
  ``(out, lse)``;
* backward: K/V circulate again together with float32 dK/dV accumulators. At step t a rank adds its share to the
  accumulator of the block it holds and passes it on with the block; after P sends the accumulator is back at the
  block's owner with every rank's contribution. Block gradients use the final ``(out, lse)``, so they are exact.

With world size 1 the plan's single self-block is plain (causal) attention.

Packed documents: ``doc_ids`` holds the document id of every token of the *full* sequence (``(S,)`` or ``(B, S)``,
from :func:`easy_context.kernels.document_ids` of the full ``position_ids``), the same on every rank. Each rank takes
the ids of its own rows and of the visiting block's rows from the layout's global token indices, and the block
primitive computes only the (query rows, key rows) pieces of a plan piece that share a document. Every plan here
supports it, since a plan piece's causal mask (key row ``i`` visible to query row ``j`` when ``i <= j``) is the same
with documents; a plan registered with ``documents=False`` refuses ``doc_ids``.
"""

from __future__ import annotations

import functools
from typing import Callable, List, NamedTuple, Optional

import torch

from ..comm import RingComm, group_size
from ..kernels import block_attention, block_attention_backward, merge, softmax_scale
from ..layout import CONTIGUOUS, Layout
from .base import Method, register

FULL = slice(None)


class Piece(NamedTuple):
    q: slice  # rows of the local queries
    kv: slice  # rows of the visiting K/V block
    causal: bool  # square causal block (diagonal) or full block


# plan(rank, src, world_size, local_len, causal) -> pieces for local queries vs the K/V block that src owns
Plan = Callable[[int, int, int, int, bool], List[Piece]]


def contiguous_plan(rank: int, src: int, world_size: int, local_len: int, causal: bool) -> List[Piece]:
    """Contiguous chunks: a rank sees earlier ranks' blocks fully, its own causally, later ones not at all."""
    if not causal or src < rank:
        return [Piece(FULL, FULL, False)]
    if src == rank:
        return [Piece(FULL, FULL, True)]
    return []


class RingAttention(torch.autograd.Function):
    """Ring schedule over ``plan``. Inputs and outputs are this rank's ``(B, H, S_local, D)`` shards."""

    @staticmethod
    def forward(ctx, q, k, v, plan: Plan, causal: bool, scale: float, group, backend, docs=None):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        comm = RingComm(group)
        world, rank, local_len = comm.world_size, comm.rank, q.shape[2]
        if docs is None:
            docs = _NoDocs()
        out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        lse = torch.full(q.shape[:3], float("-inf"), dtype=torch.float32, device=q.device)
        k_cur, v_cur = k, v
        for step in range(world):
            if step + 1 < world:
                k_next, v_next = comm.start([k_cur, v_cur])
            for p in plan(rank, (rank - step) % world, world, local_len, causal):
                block_out, block_lse = block_attention(
                    q[:, :, p.q], k_cur[:, :, p.kv], v_cur[:, :, p.kv], p.causal, scale, backend,
                    *docs.pair(rank, (rank - step) % world, p),
                )
                merge(out[:, :, p.q], lse[:, :, p.q], block_out, block_lse)
            if step + 1 < world:
                comm.wait()
                k_cur, v_cur = k_next, v_next
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (plan, causal, scale, group, backend, docs)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        plan, causal, scale, group, backend, docs = ctx.args
        dout = dout.contiguous()
        kv_comm, grad_comm = RingComm(group, tag=0), RingComm(group, tag=1)
        world, rank, local_len = kv_comm.world_size, kv_comm.rank, q.shape[2]
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        k_cur, v_cur = k, v
        dk_acc = dv_acc = None  # the accumulators arriving with the next block
        for step in range(world):
            if step + 1 < world:
                k_next, v_next = kv_comm.start([k_cur, v_cur])
            dk_blk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
            dv_blk = torch.zeros_like(dk_blk)
            for p in plan(rank, (rank - step) % world, world, local_len, causal):
                dq_p, dk_p, dv_p = block_attention_backward(
                    dout[:, :, p.q], q[:, :, p.q], k_cur[:, :, p.kv], v_cur[:, :, p.kv],
                    out[:, :, p.q], lse[:, :, p.q], p.causal, scale, backend,
                    *docs.pair(rank, (rank - step) % world, p),
                )
                dq[:, :, p.q] += dq_p
                dk_blk[:, :, p.kv] += dk_p
                dv_blk[:, :, p.kv] += dv_p
            if step > 0:  # the accumulator of this block, with the contributions of the ranks it visited before
                grad_comm.wait()
                dk_blk += dk_acc
                dv_blk += dv_acc
            if world > 1:
                dk_acc, dv_acc = grad_comm.start([dk_blk, dv_blk])
            if step + 1 < world:
                kv_comm.wait()
                k_cur, v_cur = k_next, v_next
        if world > 1:
            grad_comm.wait()
            dk_blk, dv_blk = dk_acc, dv_acc
        return dq.to(q.dtype), dk_blk.to(k.dtype), dv_blk.to(v.dtype), None, None, None, None, None, None


class _NoDocs:
    @staticmethod
    def pair(rank, src, piece):
        return None, None


def full_sequence_doc_ids(doc_ids: torch.Tensor, world: int, local_len: int, batch: int,
                          name: str = "doc_ids") -> torch.Tensor:
    """``doc_ids`` detached on the CPU, after checking that they are the document ids of the full sequence: ``(S,)``
    or ``(B, S)`` with ``S = world * local_len``. ``name`` names the method in the error."""
    seq_len = world * local_len
    if doc_ids.dim() not in (1, 2) or doc_ids.shape[-1] != seq_len or (
            doc_ids.dim() == 2 and doc_ids.shape[0] not in (1, batch)):
        raise ValueError(f"{name}: doc_ids must hold the document ids of the full sequence, (S,) or (B, S) with "
                         f"S = world_size * local length = {world} * {local_len} = {seq_len} and B = {batch}; "
                         f"got {tuple(doc_ids.shape)}")
    return doc_ids.detach().cpu()


class _ShardDocs:
    """The document ids of every rank's rows under ``layout``, sliced per plan piece."""

    def __init__(self, doc_ids: torch.Tensor, layout: Layout, world: int, local_len: int, batch: int,
                 name: str = "doc_ids"):
        seq_len = world * local_len
        doc_ids = full_sequence_doc_ids(doc_ids, world, local_len, batch, name)
        self.per_rank = [doc_ids[..., layout.indices(seq_len, r, world)] for r in range(world)]

    def pair(self, rank, src, piece):
        return self.per_rank[rank][..., piece.q], self.per_rank[src][..., piece.kv]


def ring_schedule(q, k, v, *, plan: Plan, causal: bool = True, scale=None, group=None, backend=None,
                  doc_ids: Optional[torch.Tensor] = None, layout: Layout = CONTIGUOUS, documents: bool = True,
                  name: str = "ring engine"):
    """Run the ring engine with ``plan``; returns ``(out, lse)`` for this rank's queries.

    ``doc_ids``: document ids of the full sequence (see the module notes); a query then attends only to keys of its
    own document. ``layout`` is the layout that placed the shards, used to find each rank's tokens.
    """
    docs = None
    if doc_ids is not None:
        if not documents:
            raise NotImplementedError(f"{name} does not support packed documents (doc_ids) yet; use a method "
                                      "registered with documents=True (ring, zigzag, stripe, dist_flash, ulysses, "
                                      "usp)")
        docs = _ShardDocs(doc_ids, layout, group_size(group), q.shape[2], q.shape[0], name)
    return RingAttention.apply(q, k, v, plan, causal, softmax_scale(q, scale), group, backend, docs)


def register_ring_method(name: str, plan: Plan, layout: Layout, description: str, communication: str,
                         *aliases: str, documents: bool = True) -> Callable:
    """Register the ring engine with ``plan`` over ``layout`` as method ``name``; returns its attention function.

    ``documents``: whether the plan supports packed documents (its causal pieces are diagonal blocks)."""
    attention = functools.partial(ring_schedule, plan=plan, layout=layout, documents=documents, name=name)
    register(Method(name=name, description=description, layout=layout, attention=attention,
                    communication=communication, documents=documents), *aliases)
    return attention


ring_attn = register_ring_method(
    "ring_attn", contiguous_plan, CONTIGUOUS,
    "ring over contiguous chunks; causal work is unbalanced (rank P-1 does P blocks, rank 0 one)",
    "K/V: P-1 sends of 2·S·H_kv·D/P per rank (backward: K/V again plus float32 dK/dV P times)",
)
