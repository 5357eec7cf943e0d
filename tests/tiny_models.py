"""Tiny Llama, Mistral and Qwen2 models built from configs (GQA, 2 layers), identical on every process."""

from __future__ import annotations

import torch

FAMILIES = ("llama", "mistral", "qwen2")


def tiny_config(family: str, **overrides):
    from transformers import AutoConfig

    kwargs = dict(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=4096, rope_theta=10000.0, tie_word_embeddings=False,
    )
    if family == "mistral":
        kwargs["sliding_window"] = None
    kwargs.update(overrides)
    return AutoConfig.for_model(family, **kwargs)


def tiny_model(family: str, seed: int = 0, attn_implementation: str = "sdpa", **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(
        tiny_config(family, **overrides), attn_implementation=attn_implementation
    )
    return model.eval()


def tiny_batch(seq_len: int, batch: int = 2, vocab: int = 128, seed: int = 0, masked_prefix: int = 0):
    """Random token ids with targets shifted by one; the first ``masked_prefix`` targets are -100 (so ranks hold
    different numbers of valid targets)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq_len + 1), generator=g)
    input_ids, target_ids = ids[:, :-1].clone(), ids[:, 1:].clone()
    target_ids[:, :masked_prefix] = -100
    position_ids = torch.arange(seq_len).expand(batch, seq_len)
    return input_ids, position_ids, target_ids


def rope_config_kwargs(rope_parameters: dict) -> dict:
    """Config keyword arguments that mean ``rope_parameters`` on every supported transformers: 5.x reads
    ``rope_parameters``; 4.x reads ``rope_theta`` and ``rope_scaling`` and ignores ``rope_parameters``."""
    import transformers

    if int(transformers.__version__.split(".")[0]) >= 5:
        return {"rope_parameters": dict(rope_parameters)}
    params = dict(rope_parameters)
    kwargs = {"rope_theta": params.pop("rope_theta")} if "rope_theta" in params else {}
    if params.get("rope_type", "default") != "default":
        kwargs["rope_scaling"] = params
    return kwargs
