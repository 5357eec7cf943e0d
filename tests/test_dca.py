"""Dual Chunk Attention: against standard attention, an independent brute-force reference, KV-cached decoding and the
real SmolLM2-135M model on Jane Austen.

The brute-force reference writes down the paper's relative-position matrix ``d[i, j]`` directly and computes every
score from the *unrotated* queries and keys as ``Re(sum_f zq_f conj(zk_f) exp(i d θ_f))`` (the complex form of RoPE)
followed by one softmax over all keys, in float64. The implementation under test instead re-rotates vectors that
are already rotated at their true positions, splits the keys into three block schedules and merges them through the
float32 LSE merge: the two share nothing but the position formulas of the paper.
"""

from __future__ import annotations

import math
import time

import pytest
import torch
import torch.nn.functional as F
from reference import BF16_TOL, DIFFERS, FP32_TOL, MODEL_TOL, reference_attention, rel_err
from tiny_models import rope_config_kwargs

from easy_context import apply_seq_parallel_monkey_patch, get_method, replace_with_chunkllama
from easy_context.methods.dca import DCAConfig, dca_plan, dual_chunk_attention, rotated_key_bytes


# ----------------------------------------------------------------------------------------------------------------------
# The specification: the paper's relative positions, and attention computed from them in one softmax
# ----------------------------------------------------------------------------------------------------------------------
def dca_distance(i: int, j: int, s: int, w: int, c: int) -> int:
    """Relative position the model sees between query ``i`` and key ``j <= i`` (An et al. 2024, section 3)."""
    key = j % s
    if i // s == j // s:  # intra-chunk: query at i % s
        query = i % s
    elif i // s == j // s + 1:  # successive chunk: s + i % s inside the local window, else c - 1
        query = s + i % s if i % s < w else c - 1
    else:  # inter-chunk: c - 1
        query = c - 1
    return query - key


def distance_matrix(q_start: int, kv_len: int, s: int, w: int, c: int) -> torch.Tensor:
    rows = []
    for i in range(q_start, kv_len):
        rows.append([dca_distance(i, j, s, w, c) if j <= i else 0 for j in range(kv_len)])
    return torch.tensor(rows, dtype=torch.float64)


def bruteforce_dca(q_raw, k_raw, v, inv_freq, s, w, c, scale=None):
    """Float64 DCA from unrotated ``q_raw`` (B, H, Sq, D) and ``k_raw``/``v`` (B, Hkv, Skv, D). Returns (out, lse)."""
    b, h, sq, d = q_raw.shape
    kv_len = k_raw.shape[2]
    groups = h // k_raw.shape[1]
    k_raw = k_raw.double().repeat_interleave(groups, 1)
    v = v.double().repeat_interleave(groups, 1)
    half = inv_freq.shape[0]
    zq = torch.complex(q_raw.double()[..., :half], q_raw.double()[..., half:])  # (B, H, Sq, F)
    zk = torch.complex(k_raw[..., :half], k_raw[..., half:])
    dist = distance_matrix(kv_len - sq, kv_len, s, w, c)  # (Sq, Skv)
    phase = torch.polar(torch.ones((), dtype=torch.float64), dist[..., None] * inv_freq.double())  # (Sq, Skv, F)
    scores = torch.einsum("bhqf,bhkf,qkf->bhqk", zq, zk.conj(), phase).real
    scores = scores * (d**-0.5 if scale is None else scale)
    causal = torch.arange(kv_len)[None, :] > torch.arange(kv_len - sq, kv_len)[:, None]
    scores = scores.masked_fill(causal, -math.inf)
    lse = torch.logsumexp(scores, -1)
    return torch.softmax(scores, -1) @ v, lse


def rope64(x, positions, inv_freq):
    """RoPE at ``positions`` computed in float64, returned in ``x``'s dtype (differentiable)."""
    ang = positions.double()[:, None] * inv_freq.double()[None, :]
    cos, sin = torch.cat((ang, ang), -1).cos(), torch.cat((ang, ang), -1).sin()
    xd = x.double()
    half = x.shape[-1] // 2
    rot = torch.cat((-xd[..., half:], xd[..., :half]), -1)
    return (xd * cos + rot * sin).to(x.dtype)


def inv_freq_for(dim, theta=10000.0):
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))


# ----------------------------------------------------------------------------------------------------------------------
# Parameters and positions
# ----------------------------------------------------------------------------------------------------------------------
def test_defaults_follow_the_reference():
    cfg = DCAConfig.create(8192)
    assert (cfg.pretraining_length, cfg.chunk_size, cfg.local_window) == (8192, 6144, 1024)


def test_distance_spec_small_example():
    # s=4, w=2, c=7: chunks [0..3], [4..7], [8..11]
    assert dca_distance(5, 4, 4, 2, 7) == 1  # same chunk: true distance
    assert dca_distance(4, 3, 4, 2, 7) == 1  # previous chunk, inside the local window: true distance
    assert dca_distance(5, 1, 4, 2, 7) == 4  # previous chunk, inside the window: 4 + 1 - 1, true
    assert dca_distance(6, 3, 4, 2, 7) == 3  # previous chunk, past the window: c - 1 - 3
    assert dca_distance(11, 0, 4, 2, 7) == 6  # two chunks back: c - 1 - 0
    assert max(dca_distance(i, j, 4, 2, 7) for i in range(40) for j in range(i + 1)) == 6  # never beyond c - 1


def test_positions_match_spec():
    cfg = DCAConfig.create(32, chunk_size=10, local_window=5)
    pos = torch.arange(60)
    for i in range(60):
        for j in range(i + 1):
            if i // 10 == j // 10:
                qp = cfg.intra_positions(pos)[i]
            elif i // 10 == j // 10 + 1:
                qp = cfg.successive_positions(pos)[i]
            else:
                qp = cfg.inter_positions(pos)[i]
            assert int(qp - cfg.key_positions(pos)[j]) == dca_distance(i, j, 10, 5, 32)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(pretraining_length=64, chunk_size=64), "chunk_size"),
        (dict(pretraining_length=64, chunk_size=0), "chunk_size"),
        (dict(pretraining_length=64, chunk_size=48, local_window=17), "local_window"),
        (dict(pretraining_length=1), "pretraining_length"),
    ],
)
def test_invalid_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DCAConfig.create(**kwargs)


def test_plan_covers_every_causal_pair_once():
    for q_start, q_len, s in [(0, 100, 16), (37, 1, 16), (30, 45, 16), (0, 7, 16), (16, 16, 16)]:
        cover = torch.zeros(q_len, q_start + q_len, dtype=torch.int64)
        for p in dca_plan(q_start, q_len, s):
            block = torch.ones(p.q.stop - p.q.start, p.kv.stop - p.kv.start, dtype=torch.int64)
            if p.causal:
                assert block.shape[0] == block.shape[1]
                block = block.tril()
            cover[p.q, p.kv] += block
        want = (torch.arange(q_start + q_len)[None, :] <= torch.arange(q_start, q_start + q_len)[:, None]).long()
        assert torch.equal(cover, want)


# ----------------------------------------------------------------------------------------------------------------------
# Attention level: standard attention for short sequences, the brute-force reference beyond
# ----------------------------------------------------------------------------------------------------------------------
def _inputs(seed, heads=4, kv_heads=2, q_len=64, kv_len=64, dim=16, theta=10000.0):
    g = torch.Generator().manual_seed(seed)
    q_raw = torch.randn(1, heads, q_len, dim, generator=g, requires_grad=True)
    k_raw = torch.randn(1, kv_heads, kv_len, dim, generator=g, requires_grad=True)
    v = torch.randn(1, kv_heads, kv_len, dim, generator=g, requires_grad=True)
    dout = torch.randn(1, heads, q_len, dim, generator=g)
    return q_raw, k_raw, v, dout, inv_freq_for(dim, theta)


@pytest.mark.parametrize("seq_len, chunk", [(48, 48), (30, 48), (2, 48)])
def test_short_sequence_equals_causal_attention(seq_len, chunk):
    q_raw, k_raw, v, dout, inv_freq = _inputs(0, q_len=seq_len, kv_len=seq_len)
    pos = torch.arange(seq_len)
    q, k = rope64(q_raw, pos, inv_freq), rope64(k_raw, pos, inv_freq)
    out, lse = dual_chunk_attention(q, k, v, inv_freq, DCAConfig.create(64, chunk_size=chunk))
    ref_out, ref_lse = reference_attention(q, k, v, causal=True)
    assert rel_err(out, ref_out) <= FP32_TOL
    assert (lse.double() - ref_lse).abs().max().item() <= FP32_TOL
    grads = torch.autograd.grad(out, (q_raw, k_raw, v), dout, retain_graph=True)
    ref_grads = torch.autograd.grad(ref_out, (q_raw, k_raw, v), dout.double())
    for name, a, b in zip("qkv", grads, ref_grads):
        assert rel_err(a, b) <= FP32_TOL, name


@pytest.mark.parametrize(
    "kv_len, q_len, s, w, c",
    [
        (64, 64, 16, 4, 24),  # 4 whole chunks
        (100, 100, 24, 8, 32),  # ragged last chunk
        (130, 130, 32, 0, 40),  # no local window
        (96, 96, 16, 16, 32),  # w = c - s: the min(s + i % s, c - 1) form
        (200, 200, 48, 8, 64),  # the defaults for L = 64
        (150, 1, 16, 4, 24),  # one decoding query
        (150, 37, 16, 4, 24),  # a chunk of queries starting mid-chunk (chunked prefill with a cache)
    ],
)
def test_matches_bruteforce_reference(kv_len, q_len, s, w, c):
    q_raw, k_raw, v, dout, inv_freq = _inputs(kv_len + q_len, q_len=q_len, kv_len=kv_len)
    q = rope64(q_raw, torch.arange(kv_len - q_len, kv_len), inv_freq)
    k = rope64(k_raw, torch.arange(kv_len), inv_freq)
    out, lse = dual_chunk_attention(q, k, v, inv_freq, DCAConfig(c, s, w))
    ref_out, ref_lse = bruteforce_dca(q_raw, k_raw, v, inv_freq, s, w, c)
    assert rel_err(out, ref_out) <= FP32_TOL
    assert (lse.double() - ref_lse).abs().max().item() <= FP32_TOL
    grads = torch.autograd.grad(out, (q_raw, k_raw, v), dout)
    ref_grads = torch.autograd.grad(ref_out, (q_raw, k_raw, v), dout.double())
    for name, a, b in zip("qkv", grads, ref_grads):
        assert rel_err(a, b) <= FP32_TOL, name
    # and it really differs from plain causal attention once the sequence is longer than a chunk
    plain, _ = reference_attention(q, k, v, causal=True) if q_len == kv_len else (None, None)
    if plain is not None:
        assert rel_err(out, plain) > DIFFERS


def test_bfloat16_close_to_reference():
    q_raw, k_raw, v, _, inv_freq = _inputs(4, q_len=80, kv_len=80)
    pos = torch.arange(80)
    q, k = rope64(q_raw, pos, inv_freq).detach(), rope64(k_raw, pos, inv_freq).detach()
    out, _ = dual_chunk_attention(q.bfloat16(), k.bfloat16(), v.detach().bfloat16(), inv_freq, DCAConfig(32, 16, 4))
    ref, _ = bruteforce_dca(q_raw.detach(), k_raw.detach(), v.detach(), inv_freq, 16, 4, 32)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, ref) <= BF16_TOL


def test_registered_with_aliases():
    method = get_method("dca")
    assert get_method("chunkllama") is method and get_method("dual_chunk_attn") is method
    assert method.layout is None and method.hf_attention is not None


def test_math_backend_agrees():
    q_raw, k_raw, v, _, inv_freq = _inputs(3, q_len=90, kv_len=90)
    pos = torch.arange(90)
    q, k = rope64(q_raw, pos, inv_freq).detach(), rope64(k_raw, pos, inv_freq).detach()
    cfg = DCAConfig(40, 20, 6)
    a, _ = dual_chunk_attention(q, k, v.detach(), inv_freq, cfg)
    b, _ = dual_chunk_attention(q, k, v.detach(), inv_freq, cfg, backend="math")
    assert rel_err(a, b) <= FP32_TOL


# ----------------------------------------------------------------------------------------------------------------------
# transformers models: Llama, Mistral, Qwen2 (tiny configs), rope scaling, KV cache, generate
# ----------------------------------------------------------------------------------------------------------------------
L_TINY = 64  # pretraining length of the tiny models: s = 48, w = 8


def tiny_model(family="llama", rope_parameters=None, seed=0, **extra):
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config
    from transformers import Qwen2ForCausalLM

    classes = {"llama": (LlamaConfig, LlamaForCausalLM), "mistral": (MistralConfig, MistralForCausalLM),
               "qwen2": (Qwen2Config, Qwen2ForCausalLM)}
    config_cls, model_cls = classes[family]
    kwargs = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=L_TINY, attn_implementation="sdpa")
    if family == "mistral":
        kwargs["sliding_window"] = None
    if rope_parameters is not None:
        kwargs.update(rope_config_kwargs(rope_parameters))
    kwargs.update(extra)
    torch.manual_seed(seed)
    return model_cls(config_cls(**kwargs)).eval()


def _register_reference_attention(model, s, w, c):
    """An attention implementation computing DCA by brute force (float64) from the model's own rotated q/k."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    rotary = model.model.rotary_emb

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        kv_len, q_len = key.shape[2], query.shape[2]
        inv = rotary.inv_freq
        q_raw = rope64(query.double(), -torch.arange(kv_len - q_len, kv_len), inv)  # undo the true-position rotation
        k_raw = rope64(key.double(), -torch.arange(kv_len), inv)
        out, _ = bruteforce_dca(q_raw, k_raw, value, inv, s, w, c, scale=scaling)
        return out.to(query.dtype).transpose(1, 2).contiguous(), None

    AttentionInterface.register("dca_bruteforce", attention)
    AttentionMaskInterface.register("dca_bruteforce", lambda *a, **k: None)
    return "dca_bruteforce"


FAMILIES = ["llama", "mistral", "qwen2"]
ROPES = {
    "default": None,
    "theta": {"rope_type": "default", "rope_theta": 500.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
    "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0, "original_max_position_embeddings": L_TINY},
    "llama3": {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 4.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": L_TINY},
}


def _max_positions(rope):
    """Scaled RoPE types declare the extended length, above the original one."""
    return L_TINY * int(ROPES[rope].get("factor", 1)) if rope in ("yarn", "llama3") else L_TINY


def _ids(n, seed=1):
    return torch.randint(1, 128, (1, n), generator=torch.Generator().manual_seed(seed))  # 0 is the pad token


@pytest.mark.parametrize("family", FAMILIES)
def test_model_short_sequence_equals_plain(family):
    model = tiny_model(family)
    ids = torch.randint(0, 128, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = model(ids).logits
        apply_seq_parallel_monkey_patch("dca", model, pretraining_length=L_TINY)
        dca = model(ids).logits
    assert rel_err(dca, plain) <= FP32_TOL


def _check_model_against_bruteforce(model, n=150):
    cfg = DCAConfig.create(L_TINY)
    ids = _ids(n)
    ref_name = _register_reference_attention(model, cfg.chunk_size, cfg.local_window, cfg.pretraining_length)
    model.set_attn_implementation(ref_name)
    ref_logits = model(ids).logits
    ref_loss = F.cross_entropy(ref_logits[0, :-1], ids[0, 1:])
    ref_grads = torch.autograd.grad(ref_loss, list(model.parameters()))
    apply_seq_parallel_monkey_patch("dca", model, pretraining_length=L_TINY)
    logits = model(ids).logits
    loss = F.cross_entropy(logits[0, :-1], ids[0, 1:])
    grads = torch.autograd.grad(loss, list(model.parameters()))
    assert rel_err(logits, ref_logits) <= MODEL_TOL
    worst = max(rel_err(a, b) for a, b in zip(grads, ref_grads))
    assert worst <= MODEL_TOL
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        assert rel_err(model(ids).logits, ref_logits) > DIFFERS  # DCA is not plain attention at this length


@pytest.mark.parametrize("family", FAMILIES)
def test_model_matches_bruteforce_forward_and_backward(family):
    _check_model_against_bruteforce(tiny_model(family))


@pytest.mark.parametrize("rope", ["theta", "linear", "yarn", "llama3"])
def test_rope_scaling_matches_bruteforce(rope):
    model = tiny_model("llama", ROPES[rope], max_position_embeddings=_max_positions(rope))
    ids = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = model(ids).logits
        apply_seq_parallel_monkey_patch("dca", model, pretraining_length=L_TINY)
        assert rel_err(model(ids).logits, plain) <= FP32_TOL
    _check_model_against_bruteforce(model)


def _decode_errors(model, ids, prefill, step_sizes):
    """Max |logit difference| between incremental decoding (prefill, then steps of the given sizes) and one pass."""
    from transformers import DynamicCache

    with torch.no_grad():
        full = model(ids).logits
        cache = DynamicCache(config=model.config)
        out = model(ids[:, :prefill], past_key_values=cache, use_cache=True)
        errs = [(out.logits - full[:, :prefill]).abs().max().item()]
        pos, sizes = prefill, iter(step_sizes)
        while pos < ids.shape[1]:
            n = min(next(sizes, 1), ids.shape[1] - pos)
            out = model(ids[:, pos : pos + n], past_key_values=cache, use_cache=True)
            errs.append((out.logits - full[:, pos : pos + n]).abs().max().item())
            pos += n
    return errs


@pytest.mark.parametrize("family", FAMILIES)
def test_kv_cache_decode_equals_prefill(family):
    model = tiny_model(family)
    apply_seq_parallel_monkey_patch("dca", model, pretraining_length=L_TINY)
    ids = _ids(220, seed=2)
    # 1 token at a time across two chunk boundaries (48, 96), then chunks of 13 and 30 tokens
    errs = _decode_errors(model, ids, 20, [1] * 90 + [13, 30, 13, 30, 13, 30])
    assert len(errs) > 90
    assert max(errs) <= MODEL_TOL


@pytest.mark.parametrize("rope", ["linear", "yarn"])
def test_kv_cache_decode_with_rope_scaling(rope):
    model = tiny_model("llama", ROPES[rope], max_position_embeddings=_max_positions(rope))
    apply_seq_parallel_monkey_patch("dca", model, pretraining_length=L_TINY)
    assert max(_decode_errors(model, _ids(160, seed=3), 40, [1] * 30 + [17] * 10)) <= MODEL_TOL


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_matches_full_forward(family):
    model = tiny_model(family)
    model.generation_config.pad_token_id = 0
    apply_seq_parallel_monkey_patch("dca", model, pretraining_length=L_TINY)
    prompt = _ids(130, seed=4)
    with torch.no_grad():
        gen = model.generate(prompt, max_new_tokens=25, do_sample=False, output_scores=True,
                             return_dict_in_generate=True)
        full = model(gen.sequences).logits[0]
    n = prompt.shape[1]
    for t, scores in enumerate(gen.scores):
        assert (scores[0] - full[n - 1 + t]).abs().max().item() <= MODEL_TOL
        assert int(gen.sequences[0, n + t]) == int(full[n - 1 + t].argmax())


# Decoding with the rotated keys kept in per-layer state (cache_rotated_keys=True, the default) against the path that
# re-rotates every cached key at every step (cache_rotated_keys=False).
FAST_DECODE_CASES = [("llama", "default"), ("mistral", "default"), ("qwen2", "default"), ("llama", "linear"),
                     ("llama", "yarn"), ("llama", "llama3"), ("qwen2", "yarn")]
SMALL_CHUNKS = dict(pretraining_length=L_TINY, chunk_size=16, local_window=4)  # boundaries every 16 tokens


def _generate(model, prompt, reuse, new_tokens=40, **options):
    from transformers import DynamicCache

    apply_seq_parallel_monkey_patch("dca", model, cache_rotated_keys=reuse, **{**SMALL_CHUNKS, **options})
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        gen = model.generate(prompt, max_new_tokens=new_tokens, do_sample=False, output_scores=True,
                             return_dict_in_generate=True, past_key_values=cache)
    return gen, cache


@pytest.mark.parametrize("family,rope", FAST_DECODE_CASES)
def test_fast_decode_equals_rerotating_path(family, rope):
    model = tiny_model(family, ROPES[rope], max_position_embeddings=_max_positions(rope))
    model.generation_config.pad_token_id = 0
    prompt = _ids(30, seed=6)  # 30 prompt + 40 new tokens: chunk boundaries at 32, 48 and 64
    slow, slow_cache = _generate(model, prompt, reuse=False)
    fast, fast_cache = _generate(model, prompt, reuse=True)
    assert rotated_key_bytes(slow_cache) == 0  # the re-rotating path keeps nothing
    key_bytes = sum(layer.keys.numel() * layer.keys.element_size() for layer in fast_cache.layers)
    assert key_bytes <= rotated_key_bytes(fast_cache) <= key_bytes * 17 // 16 + 2 * 16 * 2 * 16 * 4  # + headroom
    assert torch.equal(fast.sequences, slow.sequences)
    worst = max((a - b).abs().max().item() for a, b in zip(fast.scores, slow.scores))
    assert worst <= 1e-6, worst
    # and both equal one full forward over the generated sequence
    with torch.no_grad():
        full = model(fast.sequences).logits[0]
    n = prompt.shape[1]
    assert max((sc[0] - full[n - 1 + t]).abs().max().item() for t, sc in enumerate(fast.scores)) <= MODEL_TOL


def test_fast_decode_state_is_recomputed_after_crop_and_new_caches():
    """A cropped cache, a second cache and a second model never reuse rotated keys that are not theirs."""
    from transformers import DynamicCache

    model, other = tiny_model("llama"), tiny_model("llama", seed=1)
    for m in (model, other):
        apply_seq_parallel_monkey_patch("dca", m, **SMALL_CHUNKS)
    ids, ids2 = _ids(80, seed=7), _ids(80, seed=8)
    with torch.no_grad():
        full, full2, full_other = model(ids).logits, model(ids2).logits, other(ids).logits
        cache, cache2, cache_other = (DynamicCache(config=model.config) for _ in range(3))
        model(ids[:, :30], past_key_values=cache, use_cache=True)
        model(ids2[:, :20], past_key_values=cache2, use_cache=True)
        other(ids[:, :25], past_key_values=cache_other, use_cache=True)
        errs = []
        for pos in range(30, 60):  # interleave three caches and two models step by step
            errs.append((model(ids[:, pos:pos + 1], past_key_values=cache, use_cache=True).logits[0, -1]
                         - full[0, pos]).abs().max().item())
            p2 = pos - 10
            errs.append((model(ids2[:, p2:p2 + 1], past_key_values=cache2, use_cache=True).logits[0, -1]
                         - full2[0, p2]).abs().max().item())
            p3 = pos - 5
            errs.append((other(ids[:, p3:p3 + 1], past_key_values=cache_other, use_cache=True).logits[0, -1]
                         - full_other[0, p3]).abs().max().item())
        assert rotated_key_bytes(cache) > 0 and rotated_key_bytes(cache2) > 0
        # back to 35 tokens (speculative decoding does this), then other tokens, a block past the old length first
        cache.crop(-25)
        spliced = torch.cat([ids[:, :35], ids2[:, 35:]], dim=1)
        full_spliced = model(spliced).logits
        out = model(spliced[:, 35:65], past_key_values=cache, use_cache=True).logits
        errs.append((out - full_spliced[:, 35:65]).abs().max().item())
        for pos in range(65, 80):
            errs.append((model(spliced[:, pos:pos + 1], past_key_values=cache, use_cache=True).logits[0, -1]
                         - full_spliced[0, pos]).abs().max().item())
    assert max(errs) <= MODEL_TOL


def test_fast_decode_with_family_name_patch():
    """A family-name patch (no model instance at patch time) hooks each layer at its first call and keeps keys too."""
    from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

    instance = tiny_model("llama")
    instance.generation_config.pad_token_id = 0
    prompt = _ids(30, seed=10)
    slow, _ = _generate(instance, prompt, reuse=False)
    apply_seq_parallel_monkey_patch("dca", "llama", **SMALL_CHUNKS)
    try:
        config = LlamaConfig(**{**instance.config.to_dict(), "attn_implementation": "sdpa"})
        by_family = LlamaForCausalLM(config).eval()
        by_family.load_state_dict(instance.state_dict())
        by_family.generation_config.pad_token_id = 0
        cache = DynamicCache(config=by_family.config)
        with torch.no_grad():
            fast = by_family.generate(prompt, max_new_tokens=40, do_sample=False, output_scores=True,
                                      return_dict_in_generate=True, past_key_values=cache)
    finally:
        apply_seq_parallel_monkey_patch("data_parallel", "llama")
    assert rotated_key_bytes(cache) > 0
    assert torch.equal(fast.sequences, slow.sequences)
    assert max((a - b).abs().max().item() for a, b in zip(fast.scores, slow.scores)) <= 1e-6


def test_fast_decode_beam_search_matches_rerotating_path():
    """Beam search reorders the cache at every step; the rotated keys are recomputed then, so beams stay right."""
    model = tiny_model("qwen2")
    model.generation_config.pad_token_id = 0
    prompt = _ids(30, seed=9)
    outs = []
    for reuse in (False, True):
        apply_seq_parallel_monkey_patch("dca", model, cache_rotated_keys=reuse, **SMALL_CHUNKS)
        with torch.no_grad():
            outs.append(model.generate(prompt, max_new_tokens=25, do_sample=False, num_beams=3, num_return_sequences=3,
                                       output_scores=True, return_dict_in_generate=True))
    assert torch.equal(outs[0].sequences, outs[1].sequences)
    assert torch.allclose(outs[0].sequences_scores, outs[1].sequences_scores, atol=1e-6, rtol=0)


def test_family_name_patch_and_chunkllama_alias():
    from transformers import LlamaConfig, LlamaForCausalLM

    instance = tiny_model("llama")
    replace_with_chunkllama(pretraining_length=L_TINY, model=instance)
    name = apply_seq_parallel_monkey_patch("dca", "llama", pretraining_length=L_TINY)
    assert name == "dca"
    try:
        config = LlamaConfig(**{**instance.config.to_dict(), "attn_implementation": "sdpa"})
        torch.manual_seed(0)
        by_family = LlamaForCausalLM(config).eval()
        assert by_family.config._attn_implementation == "dca"
    finally:
        apply_seq_parallel_monkey_patch("data_parallel", "llama")
    by_family.load_state_dict(instance.state_dict())
    ids = _ids(150, seed=5)
    with torch.no_grad():
        a, b = instance(ids).logits, by_family(ids).logits
    assert rel_err(a, b) <= FP32_TOL
    # a second model patched with other options keeps its own; the first one is unaffected
    other = tiny_model("llama", seed=0)
    apply_seq_parallel_monkey_patch("dca", other, pretraining_length=L_TINY, chunk_size=16, local_window=4)
    with torch.no_grad():
        assert rel_err(instance(ids).logits, a) == 0.0
        assert rel_err(other(ids).logits, a) > DIFFERS


# ----------------------------------------------------------------------------------------------------------------------
# Errors for what DCA cannot do
# ----------------------------------------------------------------------------------------------------------------------
def test_error_padding_mask():
    model = tiny_model("llama")
    apply_seq_parallel_monkey_patch("dca", model, pretraining_length=L_TINY)
    ids = _ids(20)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with pytest.raises(ValueError, match="padding"):
        model(ids, attention_mask=mask)
    model(ids, attention_mask=torch.ones_like(ids))  # an all-ones mask is fine


def test_error_sliding_window():
    model = tiny_model("mistral", sliding_window=16)
    with pytest.raises(ValueError, match="dca .*sliding-window attention.*sliding_window=None"):
        apply_seq_parallel_monkey_patch("dca", model, pretraining_length=L_TINY)


def test_error_sequence_parallel_shard():
    model = tiny_model("llama")
    apply_seq_parallel_monkey_patch("dca", model, pretraining_length=L_TINY)
    with pytest.raises(ValueError, match="sequence-parallel"):
        model(_ids(50), position_ids=torch.arange(50, 100)[None])
    with pytest.raises(ValueError, match="does not compose with sequence parallelism"):
        get_method("dca").check(num_heads=4, num_kv_heads=2, world_size=2)


def test_error_dynamic_rope():
    model = tiny_model("llama", {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0})
    with pytest.raises(ValueError, match="dynamic"):
        apply_seq_parallel_monkey_patch("dca", model, pretraining_length=L_TINY)


# ----------------------------------------------------------------------------------------------------------------------
# The real model on real text
# ----------------------------------------------------------------------------------------------------------------------
def _have_assets():
    try:
        from easy_context.assets import have_assets

        return have_assets()
    except ImportError:
        return False


@pytest.mark.real_model
@pytest.mark.slow
@pytest.mark.skipif(not _have_assets(), reason="SmolLM2-135M / Austen assets missing: run bash scripts/setup.sh")
def test_real_model_perplexity_past_trained_length():
    """SmolLM2-135M (trained at 8K) on Austen, one 11K-token window, one forward each with plain attention and DCA.

    Token losses at position t depend only on tokens <= t, so one forward gives the perplexity of every prefix window:

    * the first 6K tokens (< s = 6144): DCA is plain attention there, so both forwards agree;
    * DCA's perplexity over the whole 11K window stays within 15% of its 4K-window perplexity;
    * over the last 2K tokens (positions 9K-11K, past the trained length) DCA is better than plain attention.
    """
    from easy_context.assets import austen_text, load_smollm2

    torch.set_num_threads(min(2, torch.get_num_threads()))
    model, tokenizer = load_smollm2(torch.float32, attn_implementation="sdpa")
    ids = tokenizer(austen_text()[:80_000], return_tensors="pt").input_ids[:, :11264]
    assert ids.shape[1] == 11264
    targets = ids[0, 1:]

    def token_losses():
        with torch.no_grad():
            hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state[0, :-1]
        return _per_token_nll(hidden, model, targets)

    t0 = time.perf_counter()
    plain = token_losses()
    apply_seq_parallel_monkey_patch("dca", model, pretraining_length=8192)
    dca = token_losses()
    ppl = lambda nll: math.exp(nll.mean().item())  # noqa: E731
    print(f"ppl: first 6K plain {ppl(plain[:6143]):.4f} / DCA {ppl(dca[:6143]):.4f}; 4K window {ppl(dca[:4095]):.3f}; "
          f"11K window DCA {ppl(dca):.3f}, plain {ppl(plain):.3f}; last 2K DCA {ppl(dca[-2048:]):.3f}, plain "
          f"{ppl(plain[-2048:]):.3f} ({time.perf_counter() - t0:.0f} s)")
    assert abs(ppl(dca[:6143]) / ppl(plain[:6143]) - 1) <= MODEL_TOL
    assert ppl(dca) <= 1.15 * ppl(dca[:4095])
    assert ppl(plain[-2048:]) > ppl(dca[-2048:])


def _per_token_nll(hidden, model, targets, chunk=2048):
    """Per-token negative log-likelihoods, logits built ``chunk`` tokens at a time."""
    out = []
    for start in range(0, hidden.shape[0], chunk):
        logits = F.linear(hidden[start : start + chunk], model.lm_head.weight).float()
        out.append(F.cross_entropy(logits, targets[start : start + chunk], reduction="none"))
    return torch.cat(out)
