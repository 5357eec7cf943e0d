"""Generic check that a registered sequence-parallel method equals single-process attention.

Every rank builds the same full random q, k, v and output gradient, takes its shard through the method's layout, runs
the method's schedule forward and backward over real gloo processes, and returns its local out, lse, dq, dk and dv.
The parent puts the shards back together with the layout and compares them with a float64 reference.
"""

from __future__ import annotations

from typing import List, NamedTuple

import torch

from distributed import run_distributed
from reference import BF16_TOL, FP32_TOL, random_qkv, reference_attention, rel_err


class Case(NamedTuple):
    dtype: torch.dtype
    batch: int
    heads: int
    kv_heads: int
    seq_len: int
    causal: bool
    head_dim: int = 64
    seed: int = 0


DEFAULT_CASES = [
    Case(torch.float32, 2, 8, 2, 128, True),  # GQA
    Case(torch.float32, 1, 4, 4, 384, True, seed=1),  # MHA, longer
    Case(torch.float32, 1, 8, 2, 256, False, seed=2),  # non-causal
    Case(torch.bfloat16, 1, 4, 2, 64, True, seed=3),
]


def run_cases(rank: int, world_size: int, method_name: str, cases: List[Case], options: dict = None):
    from easy_context.methods import get_method

    method = get_method(method_name)
    results = []
    for c in cases:
        q, k, v, dout = random_qkv(c.batch, c.heads, c.kv_heads, c.seq_len, c.head_dim, c.dtype, c.seed)
        shard = lambda x: method.layout.shard(x, rank, world_size, dim=2)  # noqa: E731
        ql, kl, vl = (shard(x).requires_grad_() for x in (q, k, v))
        out, lse = method.attention(ql, kl, vl, causal=c.causal, scale=None, group=None, **(options or {}))
        out.backward(shard(dout))
        results.append([t.detach() for t in (out, lse, ql.grad, kl.grad, vl.grad)])
    return results


def check_method(method_name: str, world_size: int, cases: List[Case] = None, options: dict = None) -> None:
    """Assert that ``method_name`` on ``world_size`` gloo ranks matches the reference on every case."""
    from easy_context.methods import get_method

    cases = DEFAULT_CASES if cases is None else cases
    method = get_method(method_name)
    if world_size == 1:
        per_rank = [run_cases(0, 1, method_name, cases, options)]
    else:
        per_rank = run_distributed(run_cases, world_size, method_name, cases, options)
    for i, c in enumerate(cases):
        got = [method.layout.unshard([per_rank[r][i][j] for r in range(world_size)], dim=2) for j in range(5)]
        q, k, v, dout = random_qkv(c.batch, c.heads, c.kv_heads, c.seq_len, c.head_dim, c.dtype, c.seed)
        q, k, v = (x.double().requires_grad_() for x in (q, k, v))
        ref_out, ref_lse = reference_attention(q, k, v, c.causal)
        ref_out.backward(dout.double())
        tol = FP32_TOL if c.dtype == torch.float32 else BF16_TOL
        for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, (ref_out, ref_lse, q.grad, k.grad, v.grad)):
            assert a.shape == b.shape, f"{name} shape {tuple(a.shape)} != {tuple(b.shape)}"
            err = rel_err(a, b)
            assert err <= tol, f"{method_name} P={world_size} {c}: {name} relative error {err:.2e} > {tol:.0e}"
