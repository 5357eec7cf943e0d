"""Sharding layouts, padding, and the token-weighted losses."""

import pytest
import torch

import easy_context as ec
from easy_context.layout import CONTIGUOUS, STRIPE, ZIGZAG
from easy_context.loss import chunked_cross_entropy_sum
from distributed import run_distributed
from reference import FP32_TOL, rel_err


@pytest.mark.parametrize("layout", [CONTIGUOUS, ZIGZAG, STRIPE], ids=lambda layout: layout.name)
@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_shard_then_unshard_is_identity(layout, world_size):
    x = torch.arange(2 * 48 * 3).view(2, 48, 3)
    shards = [layout.shard(x, r, world_size, dim=1) for r in range(world_size)]
    assert sorted(torch.cat([s[0, :, 0] for s in shards]).tolist()) == x[0, :, 0].tolist()
    assert torch.equal(layout.unshard(shards, dim=1), x)


def test_zigzag_places_chunks_r_and_2p_minus_1_minus_r():
    assert ZIGZAG.indices(16, 1, 4).tolist() == [2, 3, 12, 13]
    assert STRIPE.indices(8, 1, 4).tolist() == [1, 5]
    assert CONTIGUOUS.indices(8, 3, 4).tolist() == [6, 7]


def _prepare_on_two_ranks(rank, world_size):
    ids = torch.arange(16).view(1, 16)
    local = ec.prepare_seq_parallel_inputs("zigzag_ring_attn", ids, None, ids + 100, rank, world_size, "cpu")
    whole = ec.prepare_seq_parallel_inputs("data_parallel", ids, None, ids, rank, world_size, "cpu")
    short = torch.arange(10).view(1, 10)
    padded = ec.prepare_seq_parallel_inputs("zigzag_ring_attn", short, None, short, rank, world_size, "cpu", pad=True)
    return local, whole["local_input_ids"], padded


def test_prepare_inputs_keeps_global_positions_and_pads_with_ignored_targets():
    results = run_distributed(_prepare_on_two_ranks, 2)
    local, whole, _ = results[1]
    assert local["local_input_ids"].tolist() == [[4, 5, 6, 7, 8, 9, 10, 11]]
    assert local["local_position_ids"].tolist() == [[4, 5, 6, 7, 8, 9, 10, 11]]
    assert local["local_target_ids"].tolist() == [[104, 105, 106, 107, 108, 109, 110, 111]]
    assert torch.equal(whole, torch.arange(16).view(1, 16))
    shards = [padded for _, _, padded in results]
    targets = ZIGZAG.unshard([s["local_target_ids"] for s in shards], dim=1)
    positions = ZIGZAG.unshard([s["local_position_ids"] for s in shards], dim=1)
    assert targets.tolist() == [list(range(10)) + [-100, -100]]
    assert positions.tolist() == [list(range(12))]


def test_length_error_names_the_multiple_and_the_fix():
    ids = torch.zeros(1, 1001, dtype=torch.long)
    with pytest.raises(ValueError, match=r"sequence length 1001 is not divisible by 2\*world_size=8 .*pad to 1008"):
        ec.prepare_seq_parallel_inputs("zigzag_ring_attn", ids, None, ids, 0, 4, "cpu")
    with pytest.raises(ValueError, match="not divisible by world_size=3"):
        ec.prepare_seq_parallel_inputs("ring_attn", ids, None, ids, 0, 3, "cpu")
    with pytest.raises(ValueError, match="rank 4 is outside the group of 4"):
        ec.prepare_seq_parallel_inputs("ring_attn", ids, None, ids, 4, 4, "cpu")
    with pytest.raises(ValueError, match="pad_to_multiple_of=12 is not a multiple of 8"):
        ec.prepare_seq_parallel_inputs("zigzag_ring_attn", ids, None, ids, 0, 4, "cpu", pad_to_multiple_of=12)
    with pytest.raises(ValueError, match="unknown method 'zigzag'.*zigzag_ring_attn"):
        ec.prepare_seq_parallel_inputs("zigzag", ids, None, ids, 0, 4, "cpu")
    with pytest.raises(ValueError, match=r"must be \(batch, seq_len\)"):
        ec.prepare_seq_parallel_inputs("ring_attn", ids[0], None, None, 0, 4, "cpu")


def test_chunked_cross_entropy_equals_full_logits_loss_and_gradients():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 50, 16, generator=g, requires_grad=True)
    weight = torch.randn(40, 16, generator=g, requires_grad=True)
    targets = torch.randint(0, 40, (2, 50), generator=g)
    targets[0, :30] = -100
    total, count = chunked_cross_entropy_sum(hidden, weight, targets, chunk_size=7)
    (total / count).backward()
    got = (total.detach(), hidden.grad.clone(), weight.grad.clone())
    hidden.grad = weight.grad = None
    ref = torch.nn.functional.cross_entropy((hidden @ weight.T).flatten(0, 1), targets.flatten())
    ref.backward()
    assert count.item() == 70
    assert rel_err(got[0] / count, ref) <= FP32_TOL
    assert rel_err(got[1], hidden.grad) <= FP32_TOL and rel_err(got[2], weight.grad) <= FP32_TOL


def test_single_process_loss_is_the_token_mean_and_all_ignored_is_an_error():
    logits = torch.randn(1, 6, 5)
    targets = torch.tensor([[1, 2, -100, 3, -100, 4]])
    expected = torch.nn.functional.cross_entropy(logits[0], targets[0])
    assert rel_err(ec.seq_parallel_cross_entropy(logits, targets), expected) <= FP32_TOL
    with pytest.raises(ValueError, match="no valid targets"):
        ec.seq_parallel_cross_entropy(logits, torch.full_like(targets, -100))
