"""DistFlashAttn (LightSeq, Li et al. 2023): contiguous shards, causal work balanced by helpers.

Rank ``r`` of ``P`` holds contiguous chunk ``r``: queries ``Q_r`` and keys/values ``K_r, V_r``. Causal attention needs
every pair (query block ``r``, key block ``j``) with ``j <= r``. A plain ring gives rank ``P-1`` all ``P`` of its
pairs while rank 0 has one. Here the pairs are grouped by *distance* ``d = r - j``:

* step 0: every rank computes its diagonal block ``(r, r)`` (causal, local);
* step ``t`` for ``1 <= t < P/2``: the ``P - t`` pairs at distance ``t`` are computed by their *query owners*
  (rank ``r >= t`` receives ``K_{r-t}, V_{r-t}``), and the ``t`` pairs at distance ``P - t`` by their *key owners*:
  rank ``j < t``, which has nothing left of its own, receives ``Q_{j+P-t}``, attends it to its own K/V and returns
  the partial ``(out, lse)``, which the query owner merges. Every rank computes exactly one full block.
* step ``P/2`` (even ``P`` only): the ``P/2`` pairs at distance ``P/2`` are split by query rows: the query owner
  computes the first half of its rows, the idle key owner the second half.

Distances ``t`` and ``P - t`` over ``t = 1 .. floor(P/2)`` cover ``1 .. P-1`` once each, so every causal pair is
computed exactly once, and every rank does the same work: one causal diagonal block plus ``(P-1)/2`` full blocks
(``P/2`` block-equivalents including the diagonal, against ``P - 1/2`` for the busiest rank of a plain ring). Odd
world sizes need no half blocks. The schedule for ``P = 4`` (``Qa·Kb`` is query block ``a`` against key block ``b``;
``→a`` marks a helper whose partial result goes back to rank ``a``; ``½`` is half of the query rows):

====== ============ ============ ==================
rank   step 0       step 1       step 2
====== ============ ============ ==================
0      Q0·K0 causal Q3·K0 →3     ½Q2·K0 (2nd) →2
1      Q1·K1 causal Q1·K0        ½Q3·K1 (2nd) →3
2      Q2·K2 causal Q2·K1        ½Q2·K0 (1st)
3      Q3·K3 causal Q3·K2        ½Q3·K1 (1st)
====== ============ ============ ==================

Non-causal attention runs the plain ring on the same engine: at step ``t`` rank ``r`` attends to ``K/V_{(r-t) mod P}``.

**Packed documents.** ``doc_ids`` holds the document id of every token of the *full* sequence (``(S,)`` or ``(B, S)``,
from :func:`easy_context.kernels.document_ids`), the same on every rank. Rank ``r``'s rows are contiguous chunk ``r``,
so a work item's query rows take ``doc_ids`` of chunk ``q_owner`` (its ``rows``) and its key rows those of chunk
``kv_owner``; the block primitive then computes only the sub-blocks of the documents both hold (a query attends to
earlier keys of its own document; non-causal: to all of them). The causal pieces are the diagonal blocks and every
other piece's keys all precede its queries, so the schedule's masks are the same with documents. Since every rank
knows every chunk's ids, work items whose query and key rows share no document are dropped from the schedule on
every rank alike: they cost neither a kernel call nor a transfer (with documents shorter than a chunk most of the
schedule beyond the diagonal goes).

**Engine.** A schedule is a list of steps, each a list of :class:`Work` items, identical on every rank. From it each
rank derives what it must receive before a step (K/V of another rank; another rank's query rows) and what it must
return after it (partial ``(out, lse)`` to the query owner). Step ``t`` runs while one batched ``batch_isend_irecv``
moves the inputs of step ``t+1`` and the results of step ``t-1``: communication overlaps compute, with one step of
buffers in flight (double buffering). The backward pass runs the same schedule: a helper receives the query rows
with their ``dout``, ``out`` and ``lse``, and returns float32 ``dQ``; a query owner that used another rank's K/V
returns float32 ``dK, dV`` to it. Block gradients use the final merged ``(out, lse)``, so each is its exact share.
"""

from __future__ import annotations

from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch

from ..comm import PeerExchange, group_rank, group_size
from ..kernels import block_attention, block_attention_backward, merge, softmax_scale
from ..layout import CONTIGUOUS
from .base import Method, register
from .ring import full_sequence_doc_ids

__all__ = ["Work", "Transfer", "causal_schedule", "full_schedule", "make_schedule", "dist_flash_attn",
           "DistFlashAttention", "ChunkDocs"]


class Work(NamedTuple):
    """One block of attention: rows ``rows`` of ``q_owner``'s queries against all of ``kv_owner``'s keys."""

    rank: int  # the rank that computes it
    q_owner: int  # whose queries (and who merges the result)
    kv_owner: int  # whose keys/values (and who receives dK/dV in backward)
    rows: Tuple[int, int]  # [start, stop) of q_owner's local query rows
    causal: bool  # diagonal block, causally masked


Schedule = List[List[Work]]


def causal_schedule(world_size: int, local_len: int) -> Schedule:
    """The load-balanced causal schedule described in the module docstring."""
    P, n = world_size, local_len
    steps: Schedule = [[Work(r, r, r, (0, n), True) for r in range(P)]]
    for t in range(1, P // 2 + 1):
        step: List[Work] = []
        if 2 * t < P:
            step += [Work(r, r, r - t, (0, n), False) for r in range(t, P)]  # owners, distance t
            step += [Work(j, j + P - t, j, (0, n), False) for j in range(t)]  # helpers, distance P - t
        else:  # 2t == P: distance P/2, split by query rows between the query owner and the idle key owner
            half = n // 2
            for r in range(t, P):
                if half > 0:
                    step.append(Work(r, r, r - t, (0, half), False))
                step.append(Work(r - t, r, r - t, (half, n), False))
        steps.append(step)
    return steps


def full_schedule(world_size: int, local_len: int) -> Schedule:
    """Non-causal attention: the plain ring, rank ``r`` attends to ``K/V_{(r-t) mod P}`` at step ``t``."""
    P, n = world_size, local_len
    return [[Work(r, r, (r - t) % P, (0, n), False) for r in range(P)] for t in range(P)]


def make_schedule(world_size: int, local_len: int, causal: bool, docs: Optional["ChunkDocs"] = None) -> Schedule:
    """The schedule for ``causal``; with ``docs``, without the work items whose rows share no document."""
    steps = causal_schedule(world_size, local_len) if causal else full_schedule(world_size, local_len)
    if docs is None:
        return steps
    return [[w for w in step if docs.shared(w)] for step in steps]


class ChunkDocs:
    """The document ids of every rank's contiguous chunk, sliced per work item."""

    def __init__(self, doc_ids: torch.Tensor, world: int, local_len: int, batch: int):
        doc_ids = full_sequence_doc_ids(doc_ids, world, local_len, batch, "dist_flash_attn")
        self.per_rank = [doc_ids[..., r * local_len:(r + 1) * local_len] for r in range(world)]

    def pair(self, w: Work) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(q_docs, k_docs)``: ids of ``w``'s query rows and key rows."""
        return self.per_rank[w.q_owner][..., w.rows[0]:w.rows[1]], self.per_rank[w.kv_owner]

    def shared(self, w: Work) -> bool:
        """Whether some query row of ``w`` has a key of its own document in the block (per batch row: ids count
        from 0 in every row). A causal item is a diagonal block, which always does."""
        q_docs, k_docs = self.pair(w)
        if w.causal:
            return q_docs.shape[-1] > 0
        q_rows = q_docs.reshape(-1, q_docs.shape[-1])
        k_rows = k_docs.reshape(-1, k_docs.shape[-1])
        rows = max(len(q_rows), len(k_rows))
        return any(bool(torch.isin(q_rows[min(b, len(q_rows) - 1)], k_rows[min(b, len(k_rows) - 1)]).any())
                   for b in range(rows))


# ----------------------------------------------------------------------------------------------------------------------
# Transfers derived from a schedule, and the pipelined executor
# ----------------------------------------------------------------------------------------------------------------------
class Transfer(NamedTuple):
    """Tensors moving from ``src`` to ``dst``. Kinds: inputs ``kv`` and ``q`` (before a step); results ``out``
    (forward), ``dq`` and ``dkv`` (backward), after it. ``rows`` are the query rows concerned."""

    kind: str
    src: int
    dst: int
    rows: Tuple[int, int]


def _inputs(works: Sequence[Work]) -> List[Transfer]:
    found: Dict[Transfer, None] = {}
    for w in works:
        if w.kv_owner != w.rank:
            found[Transfer("kv", w.kv_owner, w.rank, (0, 0))] = None
        if w.q_owner != w.rank:
            found[Transfer("q", w.q_owner, w.rank, w.rows)] = None
    return list(found)


def _results(works: Sequence[Work], backward: bool) -> List[Transfer]:
    found: Dict[Transfer, None] = {}
    for w in works:
        if w.q_owner != w.rank:
            found[Transfer("dq" if backward else "out", w.rank, w.q_owner, w.rows)] = None
        if backward and w.kv_owner != w.rank:
            found[Transfer("dkv", w.rank, w.kv_owner, (0, 0))] = None
    return list(found)


def _post(exchange: PeerExchange, transfers: Sequence[Transfer], payload: Callable[[Transfer], List[torch.Tensor]],
          like: Callable[[Transfer], List[torch.Tensor]]) -> Dict[Transfer, List[torch.Tensor]]:
    """Start the ``transfers`` that involve this rank as one batch; returns receive buffers (filled after
    ``exchange.wait()``).

    Every rank derives the same ordered transfer list for a batch, and a tensor's tag is its position in that list,
    so sends and receives match on backends that use tags (gloo) and on those that match by order (NCCL).
    """
    received = {}
    for index, tr in enumerate(transfers):
        if tr.src == exchange.rank:
            for i, x in enumerate(payload(tr)):
                exchange.send(x, tr.dst, 8 * index + i)
        elif tr.dst == exchange.rank:
            received[tr] = [exchange.recv(x, tr.src, 8 * index + i) for i, x in enumerate(like(tr))]
    exchange.start()
    return received


def _execute(steps: Schedule, rank: int, group, *, backward: bool,
             payload: Callable[[Transfer], List[torch.Tensor]],
             like: Callable[[Transfer], List[torch.Tensor]],
             compute: Callable[[Work, Dict[Transfer, List[torch.Tensor]]], None],
             deliver: Callable[[Transfer, List[torch.Tensor]], None]) -> None:
    """Run ``steps`` on this rank: while step ``t`` computes, the inputs of ``t+1`` and results of ``t-1`` move.

    ``payload(tr)`` gives the tensors this rank sends for ``tr``; ``like(tr)`` tensors shaped like those it receives;
    ``compute(work, inputs)`` does one block of this rank; ``deliver(tr, tensors)`` folds a received result in.
    """
    exchange = PeerExchange(group)
    inputs = [_inputs(step) for step in steps]
    results = [_results(step, backward) for step in steps]
    current = _post(exchange, inputs[0], payload, like)
    exchange.wait()
    for t, step in enumerate(steps):
        transfers = (inputs[t + 1] if t + 1 < len(steps) else []) + (results[t - 1] if t > 0 else [])
        arriving = _post(exchange, transfers, payload, like)
        for work in step:
            if work.rank == rank:
                compute(work, current)
        exchange.wait()
        current = {tr: x for tr, x in arriving.items() if tr.kind in ("kv", "q")}
        for tr, tensors in arriving.items():
            if tr.kind not in ("kv", "q"):
                deliver(tr, tensors)
    if steps:
        arriving = _post(exchange, results[-1], payload, like)
        exchange.wait()
        for tr, tensors in arriving.items():
            deliver(tr, tensors)


def _rows(x: torch.Tensor, rows: Tuple[int, int]) -> torch.Tensor:
    return x[:, :, rows[0]:rows[1]]


# ----------------------------------------------------------------------------------------------------------------------
# The autograd Function
# ----------------------------------------------------------------------------------------------------------------------
class DistFlashAttention(torch.autograd.Function):
    """The schedule over ``group``. Inputs and outputs are this rank's contiguous ``(B, H, S_local, D)`` shards."""

    @staticmethod
    def forward(ctx, q, k, v, causal: bool, scale: float, group, backend, docs: Optional[ChunkDocs] = None):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        rank, world = group_rank(group), group_size(group)
        steps = make_schedule(world, q.shape[2], causal, docs)
        pair = docs.pair if docs is not None else lambda w: (None, None)
        out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        lse = torch.full(q.shape[:3], float("-inf"), dtype=torch.float32, device=q.device)
        outbox: Dict[Transfer, List[torch.Tensor]] = {}

        def payload(tr):
            if tr.kind == "kv":
                return [k, v]
            if tr.kind == "q":
                return [_rows(q, tr.rows)]
            return outbox.pop(tr)

        def like(tr):
            if tr.kind == "kv":
                return [k, v]
            if tr.kind == "q":
                return [_rows(q, tr.rows)]
            return [_rows(q, tr.rows), _rows(lse, tr.rows)]  # "out": a partial (out, lse)

        def compute(w, received):
            q_w = _rows(q, w.rows) if w.q_owner == rank else received[Transfer("q", w.q_owner, rank, w.rows)][0]
            k_w, v_w = (k, v) if w.kv_owner == rank else received[Transfer("kv", w.kv_owner, rank, (0, 0))]
            block_out, block_lse = block_attention(q_w, k_w, v_w, w.causal, scale, backend, *pair(w))
            if w.q_owner == rank:
                merge(_rows(out, w.rows), _rows(lse, w.rows), block_out, block_lse)
            else:
                outbox[Transfer("out", rank, w.q_owner, w.rows)] = [block_out.to(q.dtype), block_lse.float()]

        def deliver(tr, tensors):
            merge(_rows(out, tr.rows), _rows(lse, tr.rows), tensors[0], tensors[1])

        _execute(steps, rank, group, backward=False, payload=payload, like=like, compute=compute, deliver=deliver)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (causal, scale, group, backend, docs)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        causal, scale, group, backend, docs = ctx.args
        dout = dout.contiguous()
        rank, world = group_rank(group), group_size(group)
        steps = make_schedule(world, q.shape[2], causal, docs)
        pair = docs.pair if docs is not None else lambda w: (None, None)
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
        dv = torch.zeros_like(dk)
        outbox: Dict[Transfer, List[torch.Tensor]] = {}

        def payload(tr):
            if tr.kind == "kv":
                return [k, v]
            if tr.kind == "q":
                return [_rows(x, tr.rows) for x in (q, dout, out, lse)]
            return outbox.pop(tr)

        def like(tr):
            if tr.kind == "kv":
                return [k, v]
            if tr.kind == "q":
                return [_rows(x, tr.rows) for x in (q, dout, out, lse)]
            if tr.kind == "dq":
                return [_rows(dq, tr.rows)]
            return [dk, dv]  # "dkv"

        def send_back(tr, grads):
            if tr in outbox:  # several blocks of one step return to the same rank: add them up
                for acc, g in zip(outbox[tr], grads):
                    acc += g
            else:
                outbox[tr] = [g.float() for g in grads]

        def compute(w, received):
            if w.q_owner == rank:
                q_w, do_w, o_w, l_w = (_rows(x, w.rows) for x in (q, dout, out, lse))
            else:
                q_w, do_w, o_w, l_w = received[Transfer("q", w.q_owner, rank, w.rows)]
            k_w, v_w = (k, v) if w.kv_owner == rank else received[Transfer("kv", w.kv_owner, rank, (0, 0))]
            dq_w, dk_w, dv_w = block_attention_backward(do_w, q_w, k_w, v_w, o_w, l_w, w.causal, scale, backend,
                                                        *pair(w))
            if w.q_owner == rank:
                _rows(dq, w.rows).add_(dq_w)
            else:
                send_back(Transfer("dq", rank, w.q_owner, w.rows), [dq_w])
            if w.kv_owner == rank:
                dk.add_(dk_w)
                dv.add_(dv_w)
            else:
                send_back(Transfer("dkv", rank, w.kv_owner, (0, 0)), [dk_w, dv_w])

        def deliver(tr, tensors):
            if tr.kind == "dq":
                _rows(dq, tr.rows).add_(tensors[0])
            else:
                dk.add_(tensors[0])
                dv.add_(tensors[1])

        _execute(steps, rank, group, backward=True, payload=payload, like=like, compute=compute, deliver=deliver)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None


def dist_flash_attn(q, k, v, *, causal: bool = True, scale: Optional[float] = None, group=None, backend=None,
                    doc_ids: Optional[torch.Tensor] = None):
    """DistFlashAttn over ``group`` on contiguous shards; returns ``(out, lse)`` for this rank's queries.

    ``q``: ``(B, H, S_local, D)``; ``k``, ``v``: ``(B, H_kv, S_local, D)``; every rank holds the same ``S_local``
    (the contiguous layout guarantees it). Any world size works; non-causal attention runs a plain ring.
    ``doc_ids``: document ids of the full sequence, the same on every rank (see the module notes); a query then
    attends only to keys of its own document.
    """
    docs = None if doc_ids is None else ChunkDocs(doc_ids, group_size(group), q.shape[2], q.shape[0])
    return DistFlashAttention.apply(q, k, v, causal, softmax_scale(q, scale), group, backend, docs)


register(
    Method(
        name="dist_flash_attn",
        description="DistFlashAttn (LightSeq) over contiguous chunks: idle ranks compute for busy ones; "
                    "every rank does P/2 blocks of causal work",
        layout=CONTIGUOUS,
        attention=dist_flash_attn,
        communication="causal: floor(P/2) steps; a rank receives K/V (2·S·H_kv·D/P) or sends Q (S·H·D/P) and gets "
                      "(out, lse) back per step",
        implementation="lightseq_attn",
        documents=True,
    ),
    "dist_flash",
)
