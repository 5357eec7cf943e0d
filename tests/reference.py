"""Independent references the parallel code is checked against, and the error measure the thresholds use."""

from __future__ import annotations

import math

import torch

# The tolerances every test uses, as relative errors (rel_err below).
FP32_TOL = 1e-5   # a parallel schedule vs one process, float32: the project's standard of exact
BF16_TOL = 2e-2   # the same in bfloat16
MODEL_TOL = 1e-4  # whole models in float32 whose arithmetic differs in order: decoding vs one forward, a merged adapter
#                   vs the tuned weights, the real 30-layer model, perplexities computed over other shardings
DIFFERS = 1e-3    # "this changes the result": well above MODEL_TOL, so a no-op can never pass for a change


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||`` in float64."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def reference_attention(q, k, v, causal: bool, scale=None):
    """Softmax attention in float64 with explicit GQA repetition. Returns ``(out, lse)``; differentiable."""
    groups = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(groups, dim=1)
    v = v.double().repeat_interleave(groups, dim=1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = q.double() @ k.transpose(-1, -2) * scale
    if causal:
        sq, sk = s.shape[-2:]
        s = s.masked_fill(torch.ones(sq, sk, dtype=torch.bool).triu(1), -math.inf)
    lse = torch.logsumexp(s, dim=-1)
    return torch.softmax(s, dim=-1) @ v, lse


def random_qkv(batch, heads, kv_heads, seq_len, head_dim, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    shape = lambda h: (batch, h, seq_len, head_dim)  # noqa: E731
    q, k, v, dout = (torch.randn(shape(h), generator=g).to(dtype) for h in (heads, kv_heads, kv_heads, heads))
    return q, k, v, dout
