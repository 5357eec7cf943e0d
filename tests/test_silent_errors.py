"""Every way users reach the attention is exact, or refused with an error that names the fix.

Each test reaches a feature the way a user does (EasyContext's and ChunkLlama's own call order, a second model in the
same process, wrong ranks and sizes, packed documents) on real gloo processes, and compares with one process.
"""

import pytest
import torch
import torch.distributed as dist

import easy_context as ec
from distributed import run_distributed
from reference import DIFFERS, FP32_TOL, rel_err
from tiny_models import tiny_batch, tiny_model

SEQ_LEN = 64


def _reference_logits(family="llama", seq_len=SEQ_LEN):
    input_ids, position_ids, _ = tiny_batch(seq_len)
    with torch.no_grad():
        return tiny_model(family)(input_ids, position_ids=position_ids).logits


def _sharded_logits(model, method, rank, world_size, seq_len=SEQ_LEN, group=None):
    input_ids, position_ids, _ = tiny_batch(seq_len)
    local = ec.prepare_seq_parallel_inputs(method, input_ids, position_ids, None, rank, world_size, "cpu",
                                           group=group)
    with torch.no_grad():
        logits = model(local["local_input_ids"], position_ids=local["local_position_ids"]).logits
    return ec.gather_seq_parallel(logits, method, group=group)


# ------------------------------------------------------------------------------------- 1. EasyContext's snippet
def _easycontext_snippet(rank, world_size, path):
    from transformers import LlamaForCausalLM

    ec.apply_seq_parallel_monkey_patch("dist_flash_attn", "llama")  # as EasyContext's README calls it
    out = {}
    for implementation in ("flash_attention_2", "sdpa", "eager", None):
        kwargs = {} if implementation is None else {"_attn_implementation": implementation}
        model = LlamaForCausalLM.from_pretrained(path, **kwargs).eval()
        out[str(implementation)] = (model.config._attn_implementation,
                                    _sharded_logits(model, "dist_flash_attn", rank, world_size))
    other = tiny_model("qwen2")  # another family keeps its own attention
    out["qwen2"] = other.config._attn_implementation
    return out


def test_easycontext_snippet_switches_every_later_model_of_the_family(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path / "llama")
    ref = _reference_logits()
    got = run_distributed(_easycontext_snippet, 2, str(tmp_path / "llama"))
    for rank_result in got:
        assert rank_result.pop("qwen2") == "sdpa"
        for implementation, (used, logits) in rank_result.items():
            assert used == "lightseq_attn", implementation
            assert rel_err(logits, ref) <= FP32_TOL, f"loaded with {implementation}: logits differ"


# ------------------------------------------------------------------------------------- 2. ChunkLlama's call order
def test_chunkllama_call_order_switches_models_created_afterwards():
    L = 32
    input_ids, position_ids, _ = tiny_batch(96, batch=1)
    plain = _reference_logits(seq_len=96)[:1]
    explicit = tiny_model("llama")
    ec.apply_seq_parallel_monkey_patch("dca", explicit, pretraining_length=L)
    with torch.no_grad():
        want = explicit(input_ids, position_ids=position_ids).logits
    ec.replace_with_chunkllama(pretraining_length=L)  # ChunkLlama: patch first, then load the model
    try:
        model = tiny_model("llama", attn_implementation="sdpa")
        assert model.config._attn_implementation == "dca"
        with torch.no_grad():
            got = model(input_ids, position_ids=position_ids).logits
    finally:
        ec.apply_seq_parallel_monkey_patch("data_parallel", "llama")
    assert rel_err(got, want) <= FP32_TOL
    assert rel_err(got, plain) > DIFFERS  # beyond the pretraining length DCA is not plain attention


def test_family_patches_keep_their_own_options():
    input_ids, position_ids, _ = tiny_batch(96, batch=1)
    ec.replace_with_chunkllama(pretraining_length=32, model="llama")
    ec.replace_with_chunkllama(pretraining_length=48, model="qwen2")
    try:
        llama, qwen = tiny_model("llama"), tiny_model("qwen2")
        with torch.no_grad():
            got = {"llama": llama(input_ids, position_ids=position_ids).logits,
                   "qwen2": qwen(input_ids, position_ids=position_ids).logits}
    finally:
        ec.apply_seq_parallel_monkey_patch("data_parallel", "llama")
        ec.apply_seq_parallel_monkey_patch("data_parallel", "qwen2")
    for family, length in (("llama", 32), ("qwen2", 48)):
        model = tiny_model(family)
        ec.apply_seq_parallel_monkey_patch("dca", model, pretraining_length=length)
        with torch.no_grad():
            assert rel_err(got[family], model(input_ids, position_ids=position_ids).logits) <= FP32_TOL


# ------------------------------------------------------------------------------------- 3 and 6. the shard guard
def _catch(fn):
    try:
        fn()
    except ValueError as err:
        return str(err)
    return None


def _wrong_shards(rank, world_size):
    method = "zigzag_ring_attn"
    model = tiny_model("llama")
    ec.apply_seq_parallel_monkey_patch(method, model)
    input_ids, position_ids, _ = tiny_batch(SEQ_LEN)
    messages = {}

    def forward(ids, pos):
        with torch.no_grad():
            model(ids, position_ids=pos)

    # Both ranks pass rank=0.
    local = ec.prepare_seq_parallel_inputs(method, input_ids, position_ids, None, 0, world_size, "cpu")
    messages["same_rank"] = _catch(lambda: forward(local["local_input_ids"], local["local_position_ids"]))
    # Unsharded input to a switched model (what a plain training loop or transformers.Trainer does).
    messages["unsharded"] = _catch(lambda: forward(input_ids, position_ids))
    messages["no_positions"] = _catch(lambda: forward(input_ids[:, :SEQ_LEN // 2], None))
    # Ranks with different local lengths.
    n = SEQ_LEN // 2 if rank == 0 else SEQ_LEN // 4
    messages["lengths"] = _catch(lambda: forward(input_ids[:, :n], position_ids[:, :n]))
    # Packed documents, sharded by hand and by prepare_seq_parallel_inputs: taken (tests/test_packed_training.py
    # checks they are exact). Positions that break without restarting at 0 are not documents: refused.
    packed = torch.cat([torch.arange(SEQ_LEN // 2), torch.arange(SEQ_LEN // 2)]).expand(2, SEQ_LEN)
    from easy_context.layout import ZIGZAG
    messages["packed"] = _catch(lambda: forward(ZIGZAG.shard(input_ids, rank, world_size),
                                                ZIGZAG.shard(packed, rank, world_size)))
    messages["packed_prepare"] = _catch(lambda: ec.prepare_seq_parallel_inputs(
        method, input_ids, packed, None, rank, world_size, "cpu"))
    broken = torch.cat([torch.arange(SEQ_LEN // 2), torch.arange(5, 5 + SEQ_LEN // 2)]).expand(2, SEQ_LEN)
    messages["broken"] = _catch(lambda: forward(ZIGZAG.shard(input_ids, rank, world_size),
                                                ZIGZAG.shard(broken, rank, world_size)))
    messages["broken_prepare"] = _catch(lambda: ec.prepare_seq_parallel_inputs(
        method, input_ids, broken, None, rank, world_size, "cpu"))
    # Both ranks pass rank=0 to a method with contiguous shards: the two shards look like two documents of one packed
    # row, and only the tokens tell them apart.
    ring = tiny_model("llama")
    ec.apply_seq_parallel_monkey_patch("ring_attn", ring)
    same = ec.prepare_seq_parallel_inputs("ring_attn", input_ids, position_ids, None, 0, world_size, "cpu")
    with torch.no_grad():
        messages["same_rank_contiguous"] = _catch(lambda: ring(same["local_input_ids"],
                                                               position_ids=same["local_position_ids"]))
    # A world size larger than the process group.
    messages["world_4"] = _catch(lambda: ec.prepare_seq_parallel_inputs(
        method, input_ids, position_ids, None, rank, 4, "cpu"))
    # After all that, the right call still works on both ranks (no rank was left behind in a collective).
    right = _sharded_logits(model, method, rank, world_size)
    return messages, right


def test_the_guard_refuses_inputs_that_are_not_shards_of_one_sequence():
    ref = _reference_logits()
    for rank, (messages, logits) in enumerate(run_distributed(_wrong_shards, 2)):
        not_one_sequence = "positions do not make one sequence of packed documents"
        assert not_one_sequence in messages["same_rank"] and "a wrong rank" in messages["same_rank"]
        assert "prepare_seq_parallel_inputs" in messages["same_rank"]
        assert "ranks 0 and 1 hold the same shard" in messages["same_rank_contiguous"]
        assert not_one_sequence in messages["unsharded"] and "input that was not sharded" in messages["unsharded"]
        assert "SeqParallelTrainer" in messages["unsharded"]
        assert not_one_sequence in messages["no_positions"]
        assert "different shapes (rank 0: 2x32, rank 1: 2x16)" in messages["lengths"]
        assert messages["packed"] is None and messages["packed_prepare"] is None
        assert not_one_sequence in messages["broken"]
        assert "restarting at 0" in messages["broken_prepare"]
        assert "world_size=4 is larger than the 2 processes" in messages["world_4"]
        assert rel_err(logits, ref) <= FP32_TOL, f"rank {rank}: the right call after the refusals is not exact"


def test_world_size_above_one_without_a_process_group_is_refused():
    input_ids, position_ids, _ = tiny_batch(SEQ_LEN)
    with pytest.raises(ValueError, match="world_size=2 but torch.distributed is not initialised"):
        ec.prepare_seq_parallel_inputs("ring_attn", input_ids, position_ids, None, 0, 2, "cpu")
    with pytest.raises(ValueError, match="rank 2 is outside the group of 2"):
        ec.prepare_seq_parallel_inputs("ring_attn", input_ids, position_ids, None, 2, 2, "cpu")


def test_packed_documents_on_one_process_are_kept_apart_or_refused():
    """ring_attn on one process keeps packed documents apart, as transformers' own attention does; dca refuses them;
    positions that break without restarting at 0 are refused."""
    input_ids, _, _ = tiny_batch(SEQ_LEN)
    packed = torch.cat([torch.arange(40), torch.arange(24)]).expand(2, SEQ_LEN)
    with torch.no_grad():
        separate = torch.cat([tiny_model("llama")(input_ids[:, :40]).logits,
                              tiny_model("llama")(input_ids[:, 40:]).logits], dim=1)
        model = tiny_model("llama")
        ec.apply_seq_parallel_monkey_patch("ring_attn", model)
        assert rel_err(model(input_ids, position_ids=packed).logits, separate) <= FP32_TOL
        local = ec.prepare_seq_parallel_inputs("ring_attn", input_ids, packed, None, 0, 1, "cpu")
        assert rel_err(model(local["local_input_ids"], position_ids=local["local_position_ids"]).logits,
                       separate) <= FP32_TOL
        broken = torch.cat([torch.arange(40), torch.arange(3, 27)]).expand(2, SEQ_LEN)
        with pytest.raises(ValueError, match="do not make one sequence of packed documents"):
            model(input_ids, position_ids=broken)
        with pytest.raises(ValueError, match="restarting at 0"):
            ec.prepare_seq_parallel_inputs("ring_attn", input_ids, broken, None, 0, 1, "cpu")
        # Positions shifted by a constant are one sequence, and allowed.
        model(input_ids, position_ids=torch.arange(100, 100 + SEQ_LEN).expand(2, SEQ_LEN))
        dca = tiny_model("llama")
        ec.apply_seq_parallel_monkey_patch("dca", dca, pretraining_length=32)
        with pytest.raises(ValueError, match="packed sequences"):
            dca(input_ids, position_ids=packed)


# ------------------------------------------------------------------------------------- 7. per-model state
def _two_models(rank, world_size):
    singles = [dist.new_group([r]) for r in range(world_size)]  # every rank creates every group
    mine = singles[rank]
    sharded, local = tiny_model("llama"), tiny_model("llama")
    ec.apply_seq_parallel_monkey_patch("zigzag_ring_attn", sharded)  # over the whole world
    ec.apply_seq_parallel_monkey_patch("zigzag_ring_attn", local, group=mine)  # over this rank alone
    first = _sharded_logits(sharded, "zigzag_ring_attn", rank, world_size)
    alone = _sharded_logits(local, "zigzag_ring_attn", 0, 1, group=mine)
    again = _sharded_logits(sharded, "zigzag_ring_attn", rank, world_size)
    usp_a, usp_b = tiny_model("llama"), tiny_model("llama")
    ec.apply_seq_parallel_monkey_patch("usp_attn", usp_a, ulysses_degree=1)
    ec.apply_seq_parallel_monkey_patch("usp_attn", usp_b, ulysses_degree=2)
    return first, alone, again, _sharded_logits(usp_a, "usp_attn", rank, world_size), \
        _sharded_logits(usp_b, "usp_attn", rank, world_size)


def test_two_models_patched_differently_in_one_process_both_stay_exact():
    ref = _reference_logits()
    for rank, results in enumerate(run_distributed(_two_models, 2)):
        for name, logits in zip(("sharded", "alone", "sharded again", "usp U=1", "usp U=2"), results):
            assert rel_err(logits, ref) <= FP32_TOL, f"rank {rank}: {name} differs"
