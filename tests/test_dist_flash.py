"""DistFlashAttn (LightSeq schedule): exact against single-process attention, and load-balanced, measured."""

import pytest
import torch

from distributed import run_distributed
from schedule_check import Case, check_method

from easy_context.methods.dist_flash import causal_schedule, full_schedule

CASES = [
    Case(torch.float32, 2, 8, 2, 96, True),  # GQA
    Case(torch.float32, 1, 4, 4, 120, True, seed=1),  # MHA; 120/4 = 30 rows, split 15 + 15 at the last step
    Case(torch.float32, 1, 8, 2, 48, False, seed=2),  # non-causal: plain ring on the same engine
    Case(torch.bfloat16, 1, 4, 2, 24, True, seed=3),
]


# At P=4, odd shard lengths too: 7 rows split 3 + 4 at the last step; 1 row per rank leaves the owner no rows.
ODD_LENGTHS = [Case(torch.float32, 1, 4, 2, 28, True, seed=4), Case(torch.float32, 1, 2, 1, 4, True, seed=5)]


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_schedule_matches_single_process(world_size):
    check_method("dist_flash_attn", world_size, CASES + (ODD_LENGTHS if world_size == 4 else []))


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("local_len", [1, 7, 16])
def test_every_causal_pair_is_computed_exactly_once(world_size, local_len):
    """Each (query row, key block) with key block <= query block appears once; none other does."""
    seen = {}
    for step in causal_schedule(world_size, local_len):
        assert len({w.rank for w in step}) == len(step), "a rank computes two blocks in one step"
        for w in step:
            assert w.kv_owner <= w.q_owner and (w.causal == (w.kv_owner == w.q_owner))
            assert w.rank in (w.q_owner, w.kv_owner), "a block runs where its queries or its keys live"
            for row in range(*w.rows):
                key = (w.q_owner, row, w.kv_owner)
                assert key not in seen
                seen[key] = w
    expected = {(r, row, j) for r in range(world_size) for j in range(r + 1) for row in range(local_len)}
    assert set(seen) == expected
    assert len(causal_schedule(world_size, local_len)) == world_size // 2 + 1


def test_non_causal_schedule_covers_all_pairs():
    pairs = [(w.q_owner, w.kv_owner) for step in full_schedule(5, 8) for w in step]
    assert sorted(pairs) == [(r, j) for r in range(5) for j in range(5)]


def _block_work(rank, world_size, methods, seq_len):
    """This rank's forward ``(calls, pairs)`` for each method."""
    from easy_context.kernels import count_block_work
    from easy_context.methods import get_method

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, seq_len, 16, generator=g) for _ in range(3))
    work = {}
    for method in methods:
        m = get_method(method)
        shard = lambda x: m.layout.shard(x, rank, world_size, dim=2)  # noqa: E731
        with count_block_work() as counter:
            m.attention(shard(q), shard(k), shard(v), causal=True, scale=None, group=None)
        work[method] = (counter.calls, counter.pairs)
    return work


def _imbalance(values):
    return max(values) / (sum(values) / len(values))


def test_load_balance_at_four_ranks():
    """Per-rank forward work at P=4, measured by counting block calls.

    ``pairs`` (query-key pairs actually scored, a causal diagonal block counting half) is the measure that matters:
    it is proportional to the FLOPs of each rank, whereas a call can be a half, a causal or a full block.
    """
    seq_len, world_size = 256, 4
    block = (seq_len // world_size) ** 2
    per_rank = run_distributed(_block_work, world_size, ["dist_flash_attn", "ring_attn"], seq_len)
    dist_flash = [w["dist_flash_attn"] for w in per_rank]
    ring = [w["ring_attn"] for w in per_rank]
    dist_pairs, ring_pairs = [p for _, p in dist_flash], [p for _, p in ring]
    # Together the ranks score every causal pair once: P(P-1)/2 full blocks and P half (diagonal) blocks.
    total_blocks = world_size * (world_size - 1) / 2 + world_size / 2
    assert sum(dist_pairs) == sum(ring_pairs) == total_blocks * block
    assert _imbalance(dist_pairs) <= 1.25, dist_pairs
    assert _imbalance(ring_pairs) >= 1.6, ring_pairs
    # The busiest rank: P/2 blocks of work against P - 1/2 for the ring.
    assert max(dist_pairs) == world_size / 2 * block
    assert max(ring_pairs) == (world_size - 0.5) * block
    # Block calls tell the same story: 3 on every rank against 1, 2, 3, 4.
    assert [c for c, _ in dist_flash] == [3, 3, 3, 3]
    assert [c for c, _ in ring] == [1, 2, 3, 4]
