"""SmolLM2-135M on a 2,048-token Austen passage: zigzag ring attention over 2 gloo ranks gives the single-process
logits (float32, relative error <= 1e-4)."""

import pytest
import torch

from distributed import run_distributed
from reference import MODEL_TOL, rel_err

pytestmark = pytest.mark.real_model

SEQ_LEN = 2048
METHOD = "zigzag_ring_attn"


def _passage():
    from easy_context.assets import austen_texts, load_tokenizer

    text = austen_texts()["emma"]
    ids = load_tokenizer()(text[200_000:230_000], return_tensors="pt").input_ids[:, :SEQ_LEN]
    assert ids.shape[1] == SEQ_LEN
    return ids


def _sharded_logits(rank, world_size):
    import easy_context as ec
    from easy_context.assets import load_smollm2

    torch.set_num_threads(1)
    model, _ = load_smollm2()
    ec.apply_seq_parallel_monkey_patch(METHOD, model)
    ids = _passage()
    local = ec.prepare_seq_parallel_inputs(METHOD, ids, None, None, rank, world_size, "cpu")
    with torch.no_grad():
        logits = model(local["local_input_ids"], position_ids=local["local_position_ids"]).logits
        return ec.gather_seq_parallel(logits, METHOD) if rank == 0 else ec.gather_seq_parallel(logits, METHOD)[:0]


def test_smollm2_zigzag_two_ranks_matches_single_process():
    from easy_context.assets import have_assets, load_smollm2

    if not have_assets():
        pytest.skip("real assets missing: run bash scripts/setup.sh")
    logits = run_distributed(_sharded_logits, 2, timeout=600)[0]
    model, _ = load_smollm2()
    with torch.no_grad():
        ref = model(_passage()).logits
    assert logits.shape == ref.shape == (1, SEQ_LEN, model.config.vocab_size)
    err = rel_err(logits, ref)
    assert err <= MODEL_TOL, f"relative error {err:.2e}"
