"""Ring, zigzag ring and stripe attention equal single-process attention: out, lse, dq, dk, dv."""

import pytest

from schedule_check import check_method


@pytest.mark.parametrize("world_size", [1, 2, 4])
@pytest.mark.parametrize("method", ["ring_attn", "zigzag_ring_attn", "stripe_attn"])
def test_schedule_matches_single_process(method, world_size):
    check_method(method, world_size)
