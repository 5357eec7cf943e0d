"""Ulysses and USP (Ulysses × zigzag ring) equal single-process attention (out, lse, dq, dk, dv), and their errors.

Every configuration of one world size runs in a single set of gloo processes (process start-up dominates the cost of
these tiny cases); each result is compared with a float64 reference in the parent.
"""

import pytest
import torch

from distributed import run_distributed
from reference import BF16_TOL, FP32_TOL, random_qkv, reference_attention, rel_err
from schedule_check import DEFAULT_CASES, Case, run_cases

F32 = torch.float32

# Head layouts beyond the default cases (GQA 8/2, MHA 4/4, non-causal GQA, bf16 GQA 4/2).
EXTRA_CASES = [
    Case(F32, 1, 8, 1, 64, True, head_dim=32, seed=11),  # MQA: the one KV head is replicated to every rank
    Case(F32, 1, 8, 8, 64, False, head_dim=32, seed=12),  # MHA, non-causal
]
# USP with an explicit Ulysses degree on 4 ranks: U=1 is zigzag ring, U=2 is 2×2, U=4 is Ulysses over zigzag shards.
DEGREE_CASES = [
    Case(F32, 1, 4, 4, 64, True, head_dim=32, seed=21),  # MHA
    Case(F32, 2, 8, 2, 48, True, head_dim=32, seed=22),  # GQA; U=4 replicates the KV heads
    Case(F32, 1, 4, 1, 32, False, head_dim=32, seed=23),  # MQA, non-causal
]


def _jobs(world_size):
    jobs = [("ulysses_attn", DEFAULT_CASES, None), ("usp_attn", DEFAULT_CASES, None)]
    if world_size == 4:
        jobs.append(("ulysses_attn", EXTRA_CASES, None))
        jobs += [("usp_attn", DEGREE_CASES, {"ulysses_degree": u}) for u in (1, 2, 4)]
    return jobs


def _run_jobs(rank, world_size):
    return [run_cases(rank, world_size, name, cases, options) for name, cases, options in _jobs(world_size)]


def _errors(method_name, world_size, case, per_rank):
    """Relative errors of (out, lse, dq, dk, dv) put back together from ``per_rank`` vs the float64 reference."""
    from easy_context.methods import get_method

    layout = get_method(method_name).layout
    got = [layout.unshard([per_rank[r][j] for r in range(world_size)], dim=2) for j in range(5)]
    q, k, v, dout = random_qkv(case.batch, case.heads, case.kv_heads, case.seq_len, case.head_dim, case.dtype,
                               case.seed)
    q, k, v = (x.double().requires_grad_() for x in (q, k, v))
    ref_out, ref_lse = reference_attention(q, k, v, case.causal)
    ref_out.backward(dout.double())
    errors = {}
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, (ref_out, ref_lse, q.grad, k.grad, v.grad)):
        assert a.shape == b.shape, f"{method_name} {name}: shape {tuple(a.shape)} != {tuple(b.shape)}"
        errors[name] = rel_err(a, b)
    return errors


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_ulysses_and_usp_match_single_process(world_size):
    if world_size == 1:
        results = _run_jobs(0, 1)
        per_rank = [results]
    else:
        per_rank = run_distributed(_run_jobs, world_size)
    for j, (name, cases, options) in enumerate(_jobs(world_size)):
        for i, case in enumerate(cases):
            errors = _errors(name, world_size, case, [per_rank[r][j][i] for r in range(world_size)])
            tol = FP32_TOL if case.dtype == torch.float32 else BF16_TOL
            worst = max(errors, key=errors.get)
            assert errors[worst] <= tol, (
                f"{name} {options or ''} P={world_size} {case}: {worst} relative error {errors[worst]:.2e} > {tol:.0e}"
            )


# ----------------------------------------------------------------------------------------------------------------------
# Configuration errors (checked before any communication, so a single process shows them)
# ----------------------------------------------------------------------------------------------------------------------
def test_ulysses_query_heads_must_divide():
    from easy_context.methods import get_method

    with pytest.raises(ValueError, match=r"the 6 query heads do not divide by 4.*Valid sizes .*: 1, 2, 3, 6"):
        get_method("ulysses_attn").validate(num_heads=6, num_kv_heads=6, world_size=4)


def test_ulysses_kv_heads_that_cannot_split_or_replicate():
    from easy_context.methods import get_method

    # 12 query / 4 KV heads over 6 ranks: 4 % 6 != 0 and 6 % 4 != 0
    with pytest.raises(ValueError, match=r"4 key/value heads neither divide by 6 nor divide 6.*: 1, 2, 4, 12"):
        get_method("ulysses_attn").validate(num_heads=12, num_kv_heads=4, world_size=6)
    # the valid ones pass: split (4 % 2), replicate (4 | 12 ranks... 12 % 4) and MQA
    for heads, kv, world in [(12, 4, 2), (12, 4, 12), (8, 1, 8), (8, 2, 4)]:
        get_method("ulysses_attn").validate(num_heads=heads, num_kv_heads=kv, world_size=world)


def test_usp_degree_errors():
    from easy_context.methods import get_method
    from easy_context.methods.usp import resolve_ulysses_degree

    with pytest.raises(ValueError, match=r"ulysses_degree=3 does not divide the sequence-parallel size 4.*: 1, 2, 4"):
        resolve_ulysses_degree(8, 2, 4, 3)
    with pytest.raises(ValueError, match=r"ulysses_degree=4 splits heads over 4 ranks: the 6 query heads"):
        resolve_ulysses_degree(6, 6, 8, 4)
    assert resolve_ulysses_degree(8, 2, 4) == 2  # default: gcd(P, H_kv)
    assert resolve_ulysses_degree(8, 8, 4) == 4
    assert resolve_ulysses_degree(9, 3, 4) == 1  # pure ring when no degree fits
    get_method("usp_attn").validate(num_heads=9, num_kv_heads=3, world_size=4)


def test_usp_option_through_the_patch():
    import easy_context as ec
    from tiny_models import tiny_model

    model = tiny_model("llama")  # 4 query / 2 KV heads
    with pytest.raises(ValueError, match=r"ulysses_degree=2 does not divide the sequence-parallel size 1"):
        ec.apply_seq_parallel_monkey_patch("usp_attn", model, ulysses_degree=2)
    with pytest.raises(TypeError, match="only the option ulysses_degree"):
        ec.apply_seq_parallel_monkey_patch("usp_attn", model, ulysess_degree=1)
    assert ec.apply_seq_parallel_monkey_patch("usp_attn", model, ulysses_degree=1) == "usp_attn"
