"""The helpers behind train.py: RoPE-base formulas, packing, batch order, option checks, the chunked-loss wrapper,
atomic checkpoints and memory measurement."""

import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from easy_context import training as T
from reference import DIFFERS, FP32_TOL, rel_err
from tiny_models import tiny_model

EOS, PAD = 99, 0


# ---------------------------------------------------------------------------------------------------- RoPE bases


def test_scaling_law_base_matches_both_closed_forms():
    base, t0, t = 1e4, 4096, 524288
    got = T.scaling_law_rope_base(base, t0, t)
    assert math.isclose(got, base * (t / t0) ** (math.log(base) / math.log(t0 / (2 * math.pi))), rel_tol=1e-12)
    assert math.isclose(got, base ** (math.log(t / (2 * math.pi)) / math.log(t0 / (2 * math.pi))), rel_tol=1e-12)
    assert math.isclose(T.scaling_law_rope_base(base, t0, t0), base, rel_tol=1e-12)


def test_scaling_law_base_keeps_the_critical_dimension_period_at_the_target_length():
    base, t0, t = 1e5, 8192, 65536
    critical = math.log(t0 / (2 * math.pi)) / math.log(base)  # 2i/d of the channel whose period is T0
    assert math.isclose(2 * math.pi * base ** critical, t0, rel_tol=1e-9)
    assert math.isclose(2 * math.pi * T.scaling_law_rope_base(base, t0, t) ** critical, t, rel_tol=1e-9)


def test_ntk_base_interpolates_the_slowest_channel_by_the_length_ratio():
    base, t0, t, d = 1e4, 4096, 32768, 128
    new = T.ntk_rope_base(base, t0, t, d)
    slowest = (d - 2) / d  # exponent of the last channel pair
    assert math.isclose(t * new ** -slowest, t0 * base ** -slowest, rel_tol=1e-9)
    with pytest.raises(ValueError, match="head-dim"):
        T.rope_base("ntk", base, t0, t)


def test_rope_base_cli_prints_the_formula_value():
    out = subprocess.run([sys.executable, "-m", "easy_context.training", "rope-base", "--formula", "scaling-law",
                          "--original-base", "10000", "--original-length", "4096", "--target-length", "524288"],
                         capture_output=True, text=True, check=True).stdout
    assert math.isclose(float(out), T.scaling_law_rope_base(1e4, 4096, 524288), rel_tol=1e-5)


def test_set_rope_theta_lands_in_the_config_transformers_reads():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2)
    T.set_rope_theta(config, 123456.0)
    assert T.get_rope_theta(config) == 123456.0
    inv_freq = LlamaForCausalLM(config).model.rotary_emb.inv_freq
    assert torch.allclose(inv_freq, 1.0 / 123456.0 ** (torch.arange(0, 16, 2).float() / 16))


# ---------------------------------------------------------------------------------------------------- packing


def test_packing_shifts_targets_and_keeps_document_boundaries():
    docs = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]  # + EOS each: 12 tokens -> 3 samples of 5 (3 padded)
    data = T.pack_documents(docs, 5, EOS, PAD)
    stream = [1, 2, 3, EOS, 4, 5, EOS, 6, 7, 8, 9, EOS]
    assert data["input_ids"].flatten().tolist() == stream + [PAD] * 3
    # Next-token targets; an end-of-document token predicts nothing; the tail is padded with -100.
    assert data["target_ids"].flatten().tolist() == [2, 3, EOS, -100, 5, EOS, -100, 7, 8, 9, EOS, -100, -100, -100,
                                                     -100]
    assert data["position_ids"].tolist() == [list(range(5))] * 3
    assert data["doc_start"].flatten().nonzero().flatten().tolist() == [0, 4, 7]


def test_reset_position_ids_restart_at_each_document_and_each_sample():
    data = T.pack_documents([[1, 2, 3], [4, 5], [6, 7, 8, 9]], 5, EOS, PAD, reset_position_ids=True)
    assert data["position_ids"].tolist() == [[0, 1, 2, 3, 0], [0, 1, 0, 1, 2], [0, 1, 2, 3, 4]]


def test_unpacked_short_documents_are_padded_never_a_crash():
    data = T.pack_documents([[1, 2], [3, 4, 5, 6, 7, 8]], 4, EOS, PAD, pack=False)
    assert data["input_ids"].tolist() == [[1, 2, EOS, PAD], [3, 4, 5, 6], [7, 8, EOS, PAD]]
    assert data["target_ids"].tolist() == [[2, EOS, -100, -100], [4, 5, 6, 7], [8, EOS, -100, -100]]
    with pytest.raises(ValueError, match="no tokens"):
        T.pack_documents([[], []], 4, EOS, PAD)


def test_reset_position_ids_mask_attention_across_documents_with_sdpa():
    """With positions restarting, transformers' sdpa attention masks across packed documents: the packed loss sum
    equals the sum of each document's loss computed alone."""
    model = tiny_model("llama")
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(1, 98, (n,), generator=g).tolist() for n in (7, 12, 9)]
    data = T.pack_documents(docs, 31, EOS, PAD, reset_position_ids=True)
    wrapped = T.ChunkedLossModel(model, chunk_size=8)
    packed, _ = wrapped(data["input_ids"], data["position_ids"], data["target_ids"])
    alone = 0.0
    for doc in docs:
        one = T.pack_documents([doc], len(doc) + 1, EOS, PAD)
        alone = alone + wrapped(one["input_ids"], one["position_ids"], one["target_ids"])[0]
    assert rel_err(packed, alone) <= FP32_TOL
    unmasked, _ = wrapped(data["input_ids"], torch.arange(31)[None], data["target_ids"])
    assert rel_err(unmasked, alone) > DIFFERS  # without the reset, documents do see each other


# ---------------------------------------------------------------------------------------------------- batches, options


def test_global_batches_walk_seeded_permutations_epoch_by_epoch():
    n, batch = 10, 4
    order = torch.cat([T.global_batch_indices(s, n, batch, seed=5) for s in range(5)]).tolist()
    assert sorted(order[:10]) == list(range(10)) and sorted(order[10:20]) == list(range(10))
    assert order[:10] != order[10:20]  # a new permutation per epoch
    assert T.global_batch_indices(3, n, batch, seed=5).tolist() == order[12:16]  # a pure function of the step


@pytest.mark.parametrize("kwargs, message", [
    (dict(method="zigzag_ring_attn", world_size=4, sp_size=3, seq_length=96), "--sp-size 3 does not divide"),
    (dict(method="zigzag_ring_attn", world_size=2, sp_size=None, seq_length=130),
     "--seq-length 130 is not divisible by 4"),
    (dict(method="data_parallel", world_size=2, sp_size=2, seq_length=64), "--sp-size 2 needs a sequence-parallel"),
])
def test_parallel_option_errors_name_the_fix(kwargs, message):
    with pytest.raises(ValueError, match=message):
        T.check_parallel_options(**kwargs)


def test_reset_position_ids_needs_a_method_that_takes_packed_documents():
    from easy_context.methods import Method, base, get_method

    assert T.check_parallel_options("ring_attn", 2, 2, 64, reset_position_ids=True) == 2
    one_span = Method(name="one_span_attn", description="a method without packed documents",
                      layout=get_method("ring_attn").layout, attention=get_method("ring_attn").attention)
    base.register(one_span)
    try:
        with pytest.raises(ValueError, match="--reset-position-ids needs .* use --parallel-mode data_parallel or "
                                             ".*zigzag_ring_attn"):
            T.check_parallel_options("one_span_attn", 2, 2, 64, reset_position_ids=True)
    finally:
        del base._REGISTRY["one_span_attn"]


def test_parallel_options_defaults():
    assert T.check_parallel_options("zigzag_ring_attn", 4, None, 64) == 4
    assert T.check_parallel_options("zigzag_ring_attn", 4, 2, 64) == 2
    assert T.check_parallel_options("zigzag_ring_attn", 2, None, 130, pad_to_multiple=True) == 2
    assert T.check_parallel_options("data_parallel", 4, None, 63) == 1


# ---------------------------------------------------------------------------------------------------- datasets


def test_load_documents_from_local_files(tmp_path):
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "b.txt").write_text("second")
    assert T.load_documents(str(tmp_path)) == ["first", "second"]
    assert T.load_documents(str(tmp_path / "a.txt")) == ["first"]
    (tmp_path / "d.jsonl").write_text(json.dumps({"body": "x y"}) + "\n\n" + json.dumps({"body": "z"}) + "\n")
    assert T.load_documents(str(tmp_path / "d.jsonl"), text_field="body") == ["x y", "z"]
    with pytest.raises(ValueError, match="--text-field"):
        T.load_documents(str(tmp_path / "d.jsonl"))
    import datasets

    datasets.Dataset.from_dict({"input_ids": [[1, 2, 3], [4]]}).save_to_disk(str(tmp_path / "tok"))
    assert T.load_documents(str(tmp_path / "tok")) == [[1, 2, 3], [4]]  # pre-tokenized passes through
    with pytest.raises(FileNotFoundError, match="does not exist"):
        T.load_documents(str(tmp_path / "missing.jsonl"))


# ---------------------------------------------------------------------------------------------------- loss wrapper


def test_chunked_loss_model_matches_full_logits_cross_entropy():
    model = tiny_model("qwen2")
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 128, (2, 40), generator=g)
    targets = torch.randint(0, 128, (2, 40), generator=g)
    targets[:, :5] = -100
    positions = torch.arange(40).expand(2, 40)
    loss_sum, count = T.ChunkedLossModel(model, chunk_size=16)(ids, positions, targets)
    (loss_sum / count).backward()
    chunked = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    logits = model(ids, position_ids=positions).logits
    ref = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
    ref.backward()
    assert count == 70 and rel_err(loss_sum / count, ref) <= FP32_TOL
    for name, p in model.named_parameters():
        assert rel_err(chunked[name], p.grad) <= FP32_TOL, name


# ---------------------------------------------------------------------------------------------------- checkpoints


def test_checkpoint_roundtrip_is_atomic_and_exact(tmp_path):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (s + 1))
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    for _ in range(2):
        model(torch.ones(2, 4)).sum().backward()
        optimizer.step()
        scheduler.step()
    (tmp_path / ".checkpoint-9.tmp").mkdir()  # a crashed save leaves only a hidden temporary folder behind
    for step in (1, 2, 3):
        T.save_checkpoint(accelerator, tmp_path, step, {"data_position": 4 * step}, keep=2)
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    assert T.latest_checkpoint(tmp_path).name == "checkpoint-3"
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    saved_opt = optimizer.state_dict()["state"][0]["exp_avg"].clone()
    model(torch.ones(2, 4)).sum().backward()
    optimizer.step()
    scheduler.step()
    state = T.load_checkpoint(accelerator, tmp_path)
    assert state["step"] == 3 and state["data_position"] == 12
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    assert torch.equal(optimizer.state_dict()["state"][0]["exp_avg"], saved_opt)
    assert scheduler.last_epoch == 2
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        T.latest_checkpoint(tmp_path / "nothing")


# ---------------------------------------------------------------------------------------------------- memory


def test_peak_memory_sees_a_temporary_allocation():
    with T.PeakMemory() as m:
        x = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        del x
    assert m.extra >= 60 * 2**20, m.extra
