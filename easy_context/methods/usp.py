"""USP: Ulysses inside groups of U ranks, zigzag ring attention across R groups (U × R = P).

Rank p of the sequence-parallel group is member ``u = p % U`` of Ulysses group ``g = p // U`` (consecutive ranks, so
the Ulysses all-to-all stays on the fastest links) and rank ``g`` of ring ``u`` (ranks u, U+u, 2U+u, ...).

Layout: the plain zigzag layout over all P ranks, so :func:`easy_context.prepare_seq_parallel_inputs` needs nothing
new and the layout does not depend on U. Cut the sequence into 2P chunks; rank p holds chunks p and 2P-1-p. The
members of Ulysses group g then hold chunks gU, ..., gU+U-1 and 2P-1-gU, ..., 2P-U-gU, which are exactly chunks g
and 2R-1-g of the same sequence cut into 2R pieces: the two chunks that zigzag ring rank g holds. After the
all-to-all gathers the members' tokens, one local permutation puts them in that order (first halves in member order,
then second halves in reverse member order), the zigzag ring runs across the R groups on H/U heads, and the inverse
permutation and all-to-all bring the result back. With U = P this is Ulysses (over zigzag shards); with U = 1 it is
zigzag ring attention.

The ring is :func:`easy_context.methods.zigzag.zigzag_ring_attn` itself, run over the ring sub-group; Ulysses is the
all-to-all of :mod:`easy_context.methods.ulysses`. Sub-groups are created once per (group, U) with
``new_group(..., use_local_synchronization=True)``, so only their members take part and data-parallel replicas that
create their own sub-groups at the same time do not interfere.

Choosing U (``ulysses_degree``), first that applies:

1. the ``ulysses_degree`` argument (``apply_seq_parallel_monkey_patch("usp_attn", model, ulysses_degree=2)`` binds
   it for the model);
2. :func:`set_ulysses_degree`, a process-wide default;
3. ``gcd(P, H_kv)``: the largest U that divides both P and the KV heads, so KV heads are never replicated and the
   rest of P goes to the ring.

U must divide P, and the heads must split over U as for Ulysses (query heads divisible by U; KV heads divisible by U
or dividing U).

Packed documents: ``doc_ids`` holds the document id of every token of the *full* sequence (``(S,)`` or ``(B, S)``,
from :func:`easy_context.kernels.document_ids`), the same on every rank. After the all-to-all and the permutation,
Ulysses group g holds exactly the tokens of zigzag ring rank g of R, in that rank's order, so the ring takes
``doc_ids`` unchanged and slices each ring rank's ids with the zigzag layout over R ranks; with R = 1 the permuted
tokens are the whole sequence in order and ``doc_ids`` are the ids of its rows.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Dict, Optional, Tuple

import torch
import torch.distributed as dist

from ..comm import group_rank, group_size
from ..layout import ZIGZAG
from ..mesh import get_sequence_parallel_group
from ..model_config import attention_heads
from .base import Method, get_method, register
from .ring import full_sequence_doc_ids
from .ulysses import check_heads, heads_to_sequence, local_attention, sequence_to_heads, valid_ulysses_sizes
from .zigzag import zigzag_ring_attn

__all__ = ["usp_attn", "set_ulysses_degree", "get_ulysses_degree", "resolve_ulysses_degree", "usp_groups"]

SEQ = 2
_DEFAULT_DEGREE: Optional[int] = None
_GROUPS: Dict[Tuple[Tuple[int, ...], int], Tuple[object, object]] = {}


def set_ulysses_degree(degree: Optional[int]) -> None:
    """Process-wide Ulysses degree U for ``usp_attn`` (``None``: choose ``gcd(P, H_kv)``)."""
    if degree is not None and (not isinstance(degree, int) or degree < 1):
        raise ValueError(f"ulysses_degree must be a positive integer or None, got {degree!r}")
    global _DEFAULT_DEGREE
    _DEFAULT_DEGREE = degree


def get_ulysses_degree() -> Optional[int]:
    """The degree set with :func:`set_ulysses_degree`, or ``None``."""
    return _DEFAULT_DEGREE


def resolve_ulysses_degree(num_heads: int, num_kv_heads: int, world_size: int, degree: Optional[int] = None) -> int:
    """The Ulysses degree U to use (see the module docstring), checked against the heads and ``world_size``."""
    degree = _DEFAULT_DEGREE if degree is None else degree
    if degree is None:
        return math.gcd(world_size, num_kv_heads)
    valid = [u for u in valid_ulysses_sizes(num_heads, num_kv_heads, world_size) if world_size % u == 0]
    if not isinstance(degree, int) or degree < 1 or world_size % degree:
        raise ValueError(
            f"usp_attn: ulysses_degree={degree!r} does not divide the sequence-parallel size {world_size}; valid "
            f"degrees for {num_heads} query / {num_kv_heads} key/value heads: {', '.join(map(str, valid))}"
        )
    check_heads(num_heads, num_kv_heads, degree, what=f"usp_attn: ulysses_degree={degree} splits heads over")
    return degree


def usp_groups(group, degree: int):
    """``(ulysses_group, ring_group)`` of this rank for Ulysses degree ``degree`` inside ``group``; a sub-group of
    size 1 is ``None`` (it needs no communication)."""
    world = group_size(group)
    ranks = tuple(dist.get_process_group_ranks(group)) if group is not None else tuple(range(world))
    key = (ranks, degree)
    if key not in _GROUPS:
        me = group_rank(group)
        ulysses_ranks = list(ranks[(me // degree) * degree:(me // degree + 1) * degree])
        ring_ranks = list(ranks[me % degree::degree])
        make = lambda rs: dist.new_group(rs, use_local_synchronization=True) if len(rs) > 1 else None  # noqa: E731
        _GROUPS[key] = (make(ulysses_ranks), make(ring_ranks))
    return _GROUPS[key]


@functools.lru_cache(maxsize=None)
def _ring_order(degree: int, local_len: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Permutation of the gathered Ulysses sequence (member u's ``local_len`` tokens at ``u*local_len``) into zigzag
    ring order, and its inverse."""
    half = local_len // 2
    first = [u * local_len + t for u in range(degree) for t in range(half)]
    second = [u * local_len + half + t for u in reversed(range(degree)) for t in range(half)]
    order = torch.tensor(first + second)
    return order, torch.argsort(order)


def usp_attn(q, k, v, *, causal: bool = True, scale=None, group=None, backend=None,
             ulysses_degree: Optional[int] = None, doc_ids: Optional[torch.Tensor] = None):
    """USP attention of this rank's zigzag ``(B, H, S/P, D)`` shards; returns ``(out, lse)`` shards.

    ``doc_ids``: document ids of the full sequence (see the module notes); a query then attends only to keys of its
    own document."""
    world = group_size(group)
    degree = resolve_ulysses_degree(q.shape[1], k.shape[1], world, ulysses_degree)
    if doc_ids is not None:
        doc_ids = full_sequence_doc_ids(doc_ids, world, q.shape[SEQ], q.shape[0], "usp_attn")
    if world == 1:
        return local_attention(q, k, v, causal=causal, scale=scale, backend=backend, doc_ids=doc_ids)
    ulysses_group, ring_group = usp_groups(group, degree)
    if degree == 1:
        return zigzag_ring_attn(q, k, v, causal=causal, scale=scale, group=ring_group, backend=backend,
                                doc_ids=doc_ids)
    if q.shape[SEQ] % 2:
        raise ValueError(f"usp_attn needs an even number of local tokens (zigzag layout), got {q.shape[SEQ]}")
    order, inverse = (t.to(q.device) for t in _ring_order(degree, q.shape[SEQ]))
    qh, kh, vh = (x.index_select(SEQ, order) for x in heads_to_sequence(q, k, v, ulysses_group))
    if ring_group is None:
        out, lse = local_attention(qh, kh, vh, causal=causal, scale=scale, backend=backend, doc_ids=doc_ids)
    else:
        out, lse = zigzag_ring_attn(qh, kh, vh, causal=causal, scale=scale, group=ring_group, backend=backend,
                                    doc_ids=doc_ids)
    return sequence_to_heads(out.index_select(SEQ, inverse), lse.index_select(SEQ, inverse), ulysses_group)


def _check(*, num_heads: int, num_kv_heads: int, world_size: int, ulysses_degree: Optional[int] = None) -> None:
    resolve_ulysses_degree(num_heads, num_kv_heads, world_size, ulysses_degree)


def _bind(model, group=None, ulysses_degree: Optional[int] = None, **unknown) -> Method:
    """``apply_seq_parallel_monkey_patch`` hook: ``usp_attn`` with ``ulysses_degree`` bound for one model."""
    if unknown:
        raise TypeError(f"usp_attn takes only the option ulysses_degree, got {sorted(unknown)}")
    if ulysses_degree is not None and model is not None:  # a bad degree fails now, not at the first forward
        heads, kv_heads = attention_heads(model.config)
        _check(num_heads=heads, num_kv_heads=kv_heads,
               world_size=group_size(get_sequence_parallel_group() if group is None else group),
               ulysses_degree=ulysses_degree)
    return dataclasses.replace(
        get_method("usp_attn"),
        attention=functools.partial(usp_attn, ulysses_degree=ulysses_degree),
        check=functools.partial(_check, ulysses_degree=ulysses_degree),
        bind=None,
    )


USP = register(
    Method(
        name="usp_attn",
        description="Ulysses inside groups of U consecutive ranks, zigzag ring across the P/U groups (U·R = P)",
        layout=ZIGZAG,
        attention=usp_attn,
        bind=_bind,
        check=_check,
        communication="Ulysses part: 4 all-to-alls of a local S·H·D/P tensor within U ranks; ring part: K/V of "
                      "2·S·max(H_kv,U)·D/P per send, R-1 sends (R = P/U)",
        options={"ulysses_degree": None},
        documents=True,
    ),
    "usp",
)
