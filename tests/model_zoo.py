"""Tiny models of many transformers families, built from their configs, for the patch-time validation sweep.

Each case is ``(name, model_type, overrides, expected)``: ``expected`` is ``"exact"`` when sequence-parallel attention
must reproduce the single-process model, or a fragment of the refusal message when the config has an attention
feature that plain causal attention cannot honour. Every family with such a feature appears twice: as configured by
default (refused) and with the feature turned off as the message says (exact).
"""

from __future__ import annotations

import torch

BASE = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=False)
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)

CASES = [
    ("llama", "llama", {}, "exact"),
    ("mistral", "mistral", {"sliding_window": None}, "exact"),
    ("mistral+window", "mistral", {"sliding_window": 16}, "sliding-window attention"),
    ("qwen2", "qwen2", {}, "exact"),
    ("qwen3", "qwen3", {"head_dim": 16}, "exact"),
    ("qwen2_moe", "qwen2_moe", {**MOE, "shared_expert_intermediate_size": 32}, "exact"),
    ("qwen2_moe+window", "qwen2_moe", {**MOE, "shared_expert_intermediate_size": 32, "use_sliding_window": True,
                                       "sliding_window": 16, "max_window_layers": 1}, "sliding-window attention"),
    ("qwen3_moe", "qwen3_moe", {**MOE, "head_dim": 16}, "exact"),
    ("mixtral", "mixtral", {"num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": None}, "exact"),
    ("phi3", "phi3", {"pad_token_id": 0}, "exact"),
    ("phimoe", "phimoe", {"num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": None}, "exact"),
    ("phimoe+window", "phimoe", {"num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": 16},
     "sliding-window attention"),
    ("gemma", "gemma", {"head_dim": 16}, "exact"),
    ("gemma2", "gemma2", {"head_dim": 16, "attn_logit_softcapping": 0.001}, "softcapping"),
    ("gemma3", "gemma3_text", {"head_dim": 16, "sliding_window": 16}, "sliding-window attention"),
    ("gemma3 full", "gemma3_text", {"head_dim": 16, "layer_types": ["full_attention"] * 2}, "exact"),
    ("olmo2", "olmo2", {}, "exact"),
    ("cohere", "cohere", {}, "exact"),
    ("granite", "granite", {}, "exact"),
    ("stablelm (partial rotary)", "stablelm", {"partial_rotary_factor": 0.25}, "exact"),
    ("gpt_neox (partial rotary)", "gpt_neox", {"rotary_pct": 0.25, "num_key_value_heads": 4}, "exact"),
    ("starcoder2", "starcoder2", {"sliding_window": None}, "exact"),
    ("starcoder2+window", "starcoder2", {"sliding_window": 16}, "sliding-window attention"),
    ("gpt2 (no RoPE)", "gpt2", {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 4096}, "exact"),
    ("llama4 (chunked, temperature)", "llama4_text", {"head_dim": 16, "intermediate_size_mlp": 128,
                                                      "num_local_experts": 2, "attention_chunk_size": 32},
     "chunked attention"),
    ("llama4 full", "llama4_text", {"head_dim": 16, "intermediate_size_mlp": 128, "num_local_experts": 2,
                                    "attention_chunk_size": None, "attn_temperature_tuning": False}, "exact"),
    ("deepseek_v3 (MLA)", "deepseek_v3", {"num_key_value_heads": 4, "kv_lora_rank": 16, "q_lora_rank": 32,
                                          "qk_rope_head_dim": 8, "qk_nope_head_dim": 16, "v_head_dim": 8,
                                          "n_routed_experts": 4, "num_experts_per_tok": 2, "n_group": 1,
                                          "topk_group": 1, "first_k_dense_replace": 1,
                                          "moe_intermediate_size": 32}, "exact"),
]

# For each refused case, the overrides that turn its feature off (the fix its message names).
FIXES = {
    "mistral+window": {"sliding_window": None},
    "qwen2_moe+window": {"use_sliding_window": False},
    "phimoe+window": {"sliding_window": None},
    "gemma2": {"attn_logit_softcapping": None},
    "gemma3": {"layer_types": ["full_attention"] * 2},
    "starcoder2+window": {"sliding_window": None},
    "llama4 (chunked, temperature)": {"attention_chunk_size": None, "attn_temperature_tuning": False},
}


def zoo_model(model_type: str, overrides: dict, seed: int = 0):
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = {**BASE, **overrides}
    if model_type == "gpt2":
        kwargs = {k: v for k, v in kwargs.items() if k not in ("hidden_size", "num_hidden_layers",
                                                               "num_attention_heads", "num_key_value_heads",
                                                               "max_position_embeddings", "intermediate_size")}
    config = AutoConfig.for_model(model_type, **kwargs)
    for name in ("attention_dropout", "attn_pdrop", "resid_pdrop", "embd_pdrop", "hidden_dropout",
                 "attention_probs_dropout_prob", "hidden_dropout_prob"):
        if hasattr(config, name):
            setattr(config, name, 0.0)
    torch.manual_seed(seed)
    # Gemma-2's softcapping is computed only by its eager path (SDPA ignores it where the family offers SDPA at all).
    implementation = "eager" if model_type == "gemma2" else "sdpa"
    model = AutoModelForCausalLM.from_config(config, attn_implementation=implementation)
    return model.eval()
