"""Zigzag ring attention: rank r holds chunks r and 2P-1-r of 2P, so causal work is equal on every rank.

Against the block of a rank ``src`` (chunks ``src`` and ``2P-1-src``), a rank ``r`` needs:

* ``src == r``: its own two chunks, causally (concatenated, they are a square causal block);
* ``src < r``: both local query chunks against the visitor's first chunk only (its second chunk is in the future);
* ``src > r``: only the local second chunk (the later one), against both visiting chunks.

Each step therefore costs every rank the same half block of work.
"""

from __future__ import annotations

from typing import List

from ..layout import ZIGZAG
from .ring import FULL, Piece, register_ring_method


def zigzag_plan(rank: int, src: int, world_size: int, local_len: int, causal: bool) -> List[Piece]:
    if not causal:
        return [Piece(FULL, FULL, False)]
    half = local_len // 2
    if src == rank:
        return [Piece(FULL, FULL, True)]
    if src < rank:
        return [Piece(FULL, slice(0, half), False)]
    return [Piece(slice(half, None), FULL, False)]


zigzag_ring_attn = register_ring_method(
    "zigzag_ring_attn", zigzag_plan, ZIGZAG, "ring over zigzag chunks (r and 2P-1-r); balanced causal work",
    "as ring_attn: K/V P-1 times, 2·S·H_kv·D/P per send", "zigzag_ring",
)
