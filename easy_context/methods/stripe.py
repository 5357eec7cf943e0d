"""Stripe attention: token i lives on rank i mod P, so causal work is balanced at token granularity.

Local row j of rank r is global token ``j*P + r``. A visiting row i of rank ``src`` is token ``i*P + src``, visible
to local row j when ``i*P + src <= j*P + r``:

* ``src <= r``: exactly when ``i <= j``, a causal block including the diagonal;
* ``src > r``: exactly when ``i < j``, a causal block shifted by one: local rows ``1:`` against visiting rows ``:-1``.
"""

from __future__ import annotations

import functools
from typing import List

from ..layout import STRIPE
from .base import Method, register
from .ring import FULL, Piece, ring_schedule


def stripe_plan(rank: int, src: int, world_size: int, local_len: int, causal: bool) -> List[Piece]:
    if not causal:
        return [Piece(FULL, FULL, False)]
    if src <= rank:
        return [Piece(FULL, FULL, True)]
    if local_len == 1:
        return []
    return [Piece(slice(1, None), slice(0, local_len - 1), True)]


stripe_attn = functools.partial(ring_schedule, plan=stripe_plan)

register(
    Method(
        name="stripe_attn",
        description="ring over a token stripe (i mod P); balanced causal work",
        layout=STRIPE,
        attention=stripe_attn,
        communication="as ring_attn: K/V P-1 times, 2·S·H_kv·D/P per send",
    ),
)
