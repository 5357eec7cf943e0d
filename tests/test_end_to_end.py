"""Patched, sharded tiny models give the single-process loss and parameter gradients (float32, relative 1e-5).

Gradients are compared after averaging over ranks, as DDP, DeepSpeed and accelerate do.
"""

import pytest
import torch

from distributed import run_distributed, sharded_step
from reference import FP32_TOL, rel_err
from tiny_models import FAMILIES, tiny_batch, tiny_model

SEQ_LEN = 96  # divisible by 2*4 for zigzag, and long enough for several chunks per rank
# usp_attn at P=4: U=2 × R=2
METHODS = ["ring_attn", "zigzag_ring_attn", "stripe_attn", "ulysses_attn", "usp_attn", "dist_flash_attn"]


def _sequence_parallel_step(rank, world_size, method):
    import easy_context as ec

    results = {}
    for family in FAMILIES:
        model = tiny_model(family)
        ec.apply_seq_parallel_monkey_patch(method, model)
        input_ids, position_ids, target_ids = tiny_batch(SEQ_LEN, masked_prefix=37)
        loss, full_logits, grads = sharded_step(model, method, input_ids, position_ids, target_ids, rank, world_size)
        results[family] = (loss, grads, full_logits)
    return results if rank == 0 else None


def _single_process(family):
    model = tiny_model(family)
    input_ids, position_ids, target_ids = tiny_batch(SEQ_LEN, masked_prefix=37)
    logits = model(input_ids, position_ids=position_ids).logits
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), target_ids.flatten(), ignore_index=-100)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}, logits.detach()


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("method", METHODS)
def test_loss_and_gradients_match_single_process(method, world_size):
    got = run_distributed(_sequence_parallel_step, world_size, method)[0]
    for family in FAMILIES:
        ref_loss, ref_grads, ref_logits = _single_process(family)
        loss, grads, logits = got[family]
        assert rel_err(loss, ref_loss) <= FP32_TOL, f"{family}: loss {loss.item()} vs {ref_loss.item()}"
        assert rel_err(logits, ref_logits) <= FP32_TOL, f"{family}: logits differ"
        assert grads.keys() == ref_grads.keys()
        for name, ref in ref_grads.items():
            err = rel_err(grads[name], ref)
            assert err <= FP32_TOL, f"{family} {method} P={world_size}: grad {name} relative error {err:.2e}"
