"""Rematerialization-aware checkpointing: one attention forward per layer per step, same loss and gradients.

Attention forwards are counted with ``count_block_work``: each forward of a sequence-parallel method calls the block
primitive a fixed number of times on each rank (the backward never calls it), so a training step's block calls divided
by those of one forward pass is the number of attention forwards per layer per step.
"""

import warnings

import pytest
import torch.distributed as dist

from distributed import run_distributed
from reference import FP32_TOL, rel_err
from tiny_models import tiny_batch, tiny_model

SEQ_LEN = 48


def _train_step(family, method, mode, reentrant=False, rank=0, world_size=1):
    """Loss, parameter gradients and block calls of one forward+backward; ``mode`` is none, plain or remat."""
    import easy_context as ec
    from easy_context.checkpointing import enable_remat_aware_checkpointing, is_remat_aware
    from easy_context.kernels import count_block_work

    model = tiny_model(family).train()
    if method != "sdpa":
        ec.apply_seq_parallel_monkey_patch(method, model)
    kwargs = {"use_reentrant": reentrant}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # gradient_checkpointing_enable is deprecated in favour of ...
        if mode == "plain":
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        elif mode == "remat":
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
            enable_remat_aware_checkpointing(model)  # on top of HF's own switch, keeping its settings
            assert is_remat_aware(model)
    input_ids, position_ids, target_ids = tiny_batch(SEQ_LEN, masked_prefix=5)
    if method != "sdpa":
        local = ec.prepare_seq_parallel_inputs(method, input_ids, position_ids, target_ids, rank, world_size, "cpu")
        input_ids, position_ids, target_ids = (local[k] for k in
                                               ("local_input_ids", "local_position_ids", "local_target_ids"))
    with count_block_work() as work:
        logits = model(input_ids, position_ids=position_ids, use_cache=False).logits
        forward_calls = work.calls
        loss = ec.seq_parallel_cross_entropy(logits, target_ids)
        loss.backward()
    grads = {}
    for name, p in model.named_parameters():
        g = p.grad.contiguous()
        if world_size > 1:
            dist.all_reduce(g)
        grads[name] = g / world_size
    return loss.detach(), grads, forward_calls, work.calls


def _assert_same(got, ref, what):
    assert rel_err(got[0], ref[0]) <= FP32_TOL, f"{what}: loss {got[0].item()} vs {ref[0].item()}"
    for name, g in ref[1].items():
        err = rel_err(got[1][name], g)
        assert err <= FP32_TOL, f"{what}: gradient {name} relative error {err:.2e}"


@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
@pytest.mark.parametrize("method", ["sdpa", "ring_attn"])
def test_single_process_remat_matches_plain_checkpointing(method, reentrant):
    """Any attention implementation (SDPA here): same loss and gradients as no and as plain checkpointing."""
    ref = _train_step("llama", method, "none")
    plain = _train_step("llama", method, "plain", reentrant)
    remat = _train_step("llama", method, "remat", reentrant)
    _assert_same(plain, ref, f"plain checkpointing {method}")
    _assert_same(remat, ref, f"remat-aware checkpointing {method}")
    if method != "sdpa":
        layers, per_forward = 2, ref[2]
        assert per_forward == layers  # world size 1: one block per attention forward
        assert plain[3] / per_forward == 2 and remat[3] / per_forward == 1


def _distributed_steps(rank, world_size, methods):
    out = {}
    for method in methods:
        for mode in ("none", "plain", "remat"):
            for family in ("llama", "qwen2"):
                out[(method, mode, family)] = _train_step(family, method, mode, rank=rank, world_size=world_size)
    return out if rank == 0 else None


@pytest.mark.parametrize("world_size", [2])
def test_attention_forwards_per_layer_per_step(world_size):
    """Over real ranks: plain checkpointing runs each attention forward twice per step, remat-aware once; the loss
    and gradients equal the single-process model's."""
    methods = ["dist_flash_attn", "ring_attn"]
    got = run_distributed(_distributed_steps, world_size, methods)[0]
    for family in ("llama", "qwen2"):
        ref = _train_step(family, "sdpa", "none")
        for method in methods:
            none, plain, remat = (got[(method, mode, family)] for mode in ("none", "plain", "remat"))
            per_forward = none[2]  # block calls of one forward pass on rank 0, all layers
            assert per_forward > 0 and none[3] == per_forward  # backward runs no block forward
            attention_forwards = {"plain": plain[3] / per_forward, "remat": remat[3] / per_forward}
            assert attention_forwards == {"plain": 2, "remat": 1}, (method, attention_forwards)
            for mode, result in (("none", none), ("plain", plain), ("remat", remat)):
                _assert_same(result, ref, f"{family} {method} {mode} P={world_size}")


def test_enable_refuses_unknown_implementation():
    from easy_context.checkpointing import enable_remat_aware_checkpointing

    model = tiny_model("llama", attn_implementation="eager").train()
    with pytest.raises(ValueError, match="AttentionInterface"):
        enable_remat_aware_checkpointing(model)


def test_disable_goes_back_to_plain_checkpointing():
    from easy_context.checkpointing import (disable_remat_aware_checkpointing, enable_remat_aware_checkpointing,
                                            is_remat_aware)

    model = tiny_model("llama").train()
    enable_remat_aware_checkpointing(model)
    assert is_remat_aware(model)
    disable_remat_aware_checkpointing(model)
    assert not is_remat_aware(model)
    assert all(m.gradient_checkpointing for m in model.model.layers)
