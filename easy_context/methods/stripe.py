"""Stripe attention: token i lives on rank i mod P, so causal work is balanced at token granularity.

Local row j of rank r is global token ``j*P + r``. A visiting row i of rank ``src`` is token ``i*P + src``, visible
to local row j when ``i*P + src <= j*P + r``:

* ``src <= r``: exactly when ``i <= j``, a causal block including the diagonal;
* ``src > r``: exactly when ``i < j``, a causal block shifted by one: local rows ``1:`` against visiting rows ``:-1``.
"""

from __future__ import annotations

from typing import List

from ..layout import STRIPE
from .ring import FULL, Piece, register_ring_method


def stripe_plan(rank: int, src: int, world_size: int, local_len: int, causal: bool) -> List[Piece]:
    if not causal:
        return [Piece(FULL, FULL, False)]
    if src <= rank:
        return [Piece(FULL, FULL, True)]
    if local_len == 1:
        return []
    return [Piece(slice(1, None), slice(0, local_len - 1), True)]


stripe_attn = register_ring_method(
    "stripe_attn", stripe_plan, STRIPE, "ring over a token stripe (i mod P); balanced causal work",
    "as ring_attn: K/V P-1 times, 2·S·H_kv·D/P per send",
)
