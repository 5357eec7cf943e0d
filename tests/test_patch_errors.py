"""What the HF patch does and refuses: every unsupported setting is a clear error, never a silent change."""

import pytest
import torch

import easy_context as ec
from reference import FP32_TOL, rel_err
from tiny_models import tiny_batch, tiny_model


def _forward(model, seq_len=32, **kwargs):
    input_ids, position_ids, _ = tiny_batch(seq_len, batch=1)
    return model(input_ids, position_ids=position_ids, **kwargs)


def test_world_size_one_equals_the_unpatched_model():
    ref = _forward(tiny_model("llama")).logits
    model = tiny_model("llama")
    assert ec.apply_seq_parallel_monkey_patch("zigzag_ring_attn", model) == "zigzag_ring_attn"
    assert model.config._attn_implementation == "zigzag_ring_attn"
    assert rel_err(_forward(model).logits, ref) <= FP32_TOL


def test_data_parallel_is_a_no_op():
    model = tiny_model("qwen2")
    assert ec.apply_seq_parallel_monkey_patch("data_parallel", model) == "sdpa"
    assert model.config._attn_implementation == "sdpa"


def test_family_name_switches_later_models_of_that_family_only():
    ref = _forward(tiny_model("mistral")).logits
    name = ec.apply_seq_parallel_monkey_patch("ring_attn", "mistral")
    try:
        model = tiny_model("mistral", attn_implementation="eager")
        assert model.config._attn_implementation == name
        assert tiny_model("llama").config._attn_implementation == "sdpa"
        assert rel_err(_forward(model).logits, ref) <= FP32_TOL
    finally:
        ec.apply_seq_parallel_monkey_patch("data_parallel", "mistral")
    assert tiny_model("mistral").config._attn_implementation == "sdpa"


def test_unknown_method_and_family():
    with pytest.raises(ValueError, match="unknown method 'ring'.*ring_attn"):
        ec.apply_seq_parallel_monkey_patch("ring", "llama")
    with pytest.raises(ValueError, match="unknown model family 'lama'"):
        ec.apply_seq_parallel_monkey_patch("ring_attn", "lama")
    with pytest.raises(TypeError, match="expected a transformers PreTrainedModel"):
        ec.apply_seq_parallel_monkey_patch("ring_attn", torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="ring_attn takes no options"):
        ec.apply_seq_parallel_monkey_patch("ring_attn", tiny_model("llama"), chunk_size=4)


def test_sliding_window_is_refused_at_patch_time():
    model = tiny_model("mistral", sliding_window=16)
    with pytest.raises(ValueError, match="sliding-window attention \\(sliding_window=16 on layers 0, 1\\).*"
                                         "sliding_window=None"):
        ec.apply_seq_parallel_monkey_patch("zigzag_ring_attn", model)
    assert model.config._attn_implementation == "sdpa"  # refused: the model is left as it was
    # A window as long as the model's positions never binds, so it is allowed.
    wide = tiny_model("mistral", sliding_window=4096)
    ref = _forward(wide).logits
    ec.apply_seq_parallel_monkey_patch("zigzag_ring_attn", wide)
    assert rel_err(_forward(wide).logits, ref) <= FP32_TOL


def test_padding_mask_is_refused_not_dropped():
    model = tiny_model("llama")
    ec.apply_seq_parallel_monkey_patch("ring_attn", model)
    mask = torch.ones(1, 32, dtype=torch.long)
    _forward(model, attention_mask=mask)  # an all-ones mask is no mask
    mask[0, -4:] = 0
    with pytest.raises(ValueError, match="cannot honour a padding attention_mask"):
        _forward(model, attention_mask=mask)


def test_attention_dropout_in_training_is_refused():
    model = tiny_model("llama", attention_dropout=0.1)
    ec.apply_seq_parallel_monkey_patch("ring_attn", model)
    _forward(model)  # eval mode: no dropout
    model.train()
    with pytest.raises(ValueError, match="does not implement attention dropout"):
        _forward(model)


def test_softcapping_is_refused_at_patch_time():
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("gemma2", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                  num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(ValueError, match="softcapping"):
        ec.apply_seq_parallel_monkey_patch("ring_attn", model)


def test_kv_cache_generation_is_refused():
    model = tiny_model("llama")
    ec.apply_seq_parallel_monkey_patch("ring_attn", model)
    out = _forward(model, use_cache=True)
    with pytest.raises(ValueError, match="KV cache .* use_cache=False"):
        model(torch.tensor([[1]]), past_key_values=out.past_key_values, use_cache=True)
