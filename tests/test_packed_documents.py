"""Packed documents at the attention level: a query attends only to earlier keys of its own document.

Document ids come from the full sequence's restarting ``position_ids``. Every method that takes packed documents
(ring, zigzag ring, stripe, DistFlashAttn, Ulysses, USP at several Ulysses degrees) over real gloo ranks is compared
with a float64 reference under a block-diagonal causal mask: out, lse, dq, dk, dv. Every method and case of one world
size runs in a single set of processes (process start-up dominates the cost of these small cases); each
(method, world size) is checked by its own test.
"""

import functools
import math
import traceback
from typing import List, NamedTuple, Optional

import pytest
import torch

from distributed import run_distributed
from reference import FP32_TOL, random_qkv, rel_err

SEQ = 64  # divisible by 2P for P = 1, 2, 4


def positions(lengths: List[int]) -> torch.Tensor:
    """Restarting position_ids of documents of ``lengths``, packed into one row."""
    return torch.cat([torch.arange(n) for n in lengths])


def many_short(seed: int) -> List[int]:
    g = torch.Generator().manual_seed(seed)
    lengths, total = [], 0
    while total < SEQ:
        n = min(int(torch.randint(1, 6, (), generator=g)), SEQ - total)
        lengths.append(n)
        total += n
    return lengths


class Case(NamedTuple):
    position_ids: torch.Tensor  # (S,) shared by the batch, or (B, S)
    batch: int = 1
    heads: int = 4  # query and KV heads divide as every method needs on up to 4 ranks (Ulysses: H % P == 0)
    kv_heads: int = 2
    causal: bool = True
    head_dim: int = 32
    seed: int = 0


CASES = [
    # documents crossing every shard and zigzag chunk boundary, two of one token
    Case(positions([5, 1, 20, 13, 1, 24])),
    # a row of many short documents
    Case(positions(many_short(1)), seed=1),
    # one document: plain causal attention
    Case(torch.arange(SEQ), heads=4, kv_heads=4, seed=2),
    # rows of a batch packed differently, MHA
    Case(torch.stack([positions([1, 31, 32]), positions(many_short(2))]), batch=2, heads=4, kv_heads=4, seed=3),
    # non-causal: every key of the query's own document
    Case(positions([9, 30, 1, 24]), causal=False, seed=4),
]
assert all(c.position_ids.shape[-1] == SEQ for c in CASES)

METHODS = ["ring_attn", "zigzag_ring_attn", "stripe_attn", "dist_flash_attn", "ulysses_attn", "usp_attn"]
# USP's Ulysses degree U on P ranks: U = 1 is the zigzag ring alone, U = P Ulysses alone over zigzag shards, U = 2 on
# 4 ranks both (2 Ulysses groups of 2, a ring of 2 across them).
USP_DEGREES = {1: [None], 2: [1, 2], 4: [1, 2, 4]}


def jobs(world_size: int) -> List[tuple]:
    """``(label, method, options)`` of every run on ``world_size`` ranks."""
    found = [(m, m, {}) for m in METHODS if m != "usp_attn"]
    for u in USP_DEGREES[world_size]:
        found.append(("usp_attn" if u is None else f"usp_attn-U{u}", "usp_attn", {} if u is None else
                      {"ulysses_degree": u}))
    return found


JOB_IDS = [(label, p) for p in (1, 2, 4) for label, _, _ in jobs(p)]


def packed_reference(q, k, v, doc_ids, causal: bool):
    """float64 attention with a block-diagonal (causal) mask; rows of ``doc_ids`` per batch row. Differentiable."""
    groups = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(groups, dim=1)
    v = v.double().repeat_interleave(groups, dim=1)
    s = q.double() @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    docs = doc_ids.expand(q.shape[0], -1)
    allowed = docs[:, :, None] == docs[:, None, :]
    if causal:
        allowed = allowed & torch.ones(s.shape[-1], s.shape[-1], dtype=torch.bool).tril()
    s = s.masked_fill(~allowed[:, None], -math.inf)
    return torch.softmax(s, dim=-1) @ v, torch.logsumexp(s, dim=-1)


def run_cases(rank: int, world_size: int, method_name: str, options: dict, cases: List[Case]):
    from easy_context.kernels import document_ids
    from easy_context.methods import get_method

    method = get_method(method_name)
    attention = functools.partial(method.attention, **options)
    results = []
    for c in cases:
        q, k, v, dout = random_qkv(c.batch, c.heads, c.kv_heads, SEQ, c.head_dim, torch.float32, c.seed)
        shard = lambda x: method.layout.shard(x, rank, world_size, dim=2)  # noqa: E731
        ql, kl, vl = (shard(x).requires_grad_() for x in (q, k, v))
        out, lse = attention(ql, kl, vl, causal=c.causal, scale=None, group=None,
                             doc_ids=document_ids(c.position_ids))
        out.backward(shard(dout))
        results.append([t.detach() for t in (out, lse, ql.grad, kl.grad, vl.grad)])
    return results


def run_jobs(rank: int, world_size: int, cases: List[Case]):
    """Every job of ``world_size`` on this rank: its results, or the traceback of its failure."""
    found = {}
    for label, method_name, options in jobs(world_size):
        try:
            found[label] = run_cases(rank, world_size, method_name, options, cases)
        except Exception:  # noqa: BLE001 - reported by the job's own test
            found[label] = traceback.format_exc()
    if world_size > 1:
        found["work"] = count_work(rank, world_size)
    return found


@functools.lru_cache(maxsize=None)
def results(world_size: int) -> dict:
    """``{label: per-rank results}`` of every job on ``world_size`` ranks (one set of processes), and the work
    counts of :func:`count_work` under ``"work"``."""
    per_rank = [run_jobs(0, 1, CASES)] if world_size == 1 else run_distributed(run_jobs, world_size, CASES)
    return {label: [per_rank[r][label] for r in range(world_size)] for label in per_rank[0]}


@functools.lru_cache(maxsize=None)
def reference(i: int):
    from easy_context.kernels import document_ids

    c = CASES[i]
    q, k, v, dout = random_qkv(c.batch, c.heads, c.kv_heads, SEQ, c.head_dim, torch.float32, c.seed)
    q, k, v = (x.double().requires_grad_() for x in (q, k, v))
    ref_out, ref_lse = packed_reference(q, k, v, document_ids(c.position_ids), c.causal)
    ref_out.backward(dout.double())
    return ref_out.detach(), ref_lse.detach(), q.grad, k.grad, v.grad


def errors(method_name: str, world_size: int, per_rank: list) -> List[dict]:
    from easy_context.methods import get_method

    layout = get_method(method_name).layout
    found = []
    for i in range(len(CASES)):
        got = [layout.unshard([per_rank[r][i][j] for r in range(world_size)], dim=2) for j in range(5)]
        errs = {}
        for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, reference(i)):
            assert a.shape == b.shape, f"{name} shape {tuple(a.shape)} != {tuple(b.shape)}"
            errs[name] = rel_err(a, b)
        found.append(errs)
    return found


@pytest.mark.parametrize("label, world_size", JOB_IDS, ids=[f"{label}-P{p}" for label, p in JOB_IDS])
def test_packed_documents_match_reference(label, world_size):
    per_rank = results(world_size)[label]
    failed = [r for r in per_rank if isinstance(r, str)]
    assert not failed, f"{label} on {world_size} ranks failed:\n{failed[0]}"
    method_name = label.split("-")[0]
    for c, errs in zip(CASES, errors(method_name, world_size, per_rank)):
        worst = max(errs, key=errs.get)
        assert errs[worst] <= FP32_TOL, (f"{label} P={world_size} documents at {c.position_ids.tolist()}: "
                                         f"{worst} relative error {errs[worst]:.2e} > {FP32_TOL:.0e}")


@pytest.mark.parametrize("method", ["dist_flash_attn", "ulysses_attn", "usp_attn"])
def test_doc_ids_of_the_wrong_length_are_refused(method):
    from easy_context.methods import get_method

    q, k, v, _ = random_qkv(1, 4, 2, 8, 16, torch.float32, seed=9)
    with pytest.raises(ValueError, match=rf"{method}: doc_ids must hold the document ids of the full sequence.*"
                                         r"= 8 and B = 1; got \(2, 8\)"):
        get_method(method).attention(q, k, v, doc_ids=torch.zeros(2, 8, dtype=torch.long))
    with pytest.raises(ValueError, match=r"S = world_size \* local length = 1 \* 8 = 8 .*got \(16,\)"):
        get_method(method).attention(q, k, v, doc_ids=torch.zeros(16, dtype=torch.long))


def test_document_ids_from_restarting_positions():
    from easy_context.kernels import document_ids

    assert document_ids(torch.tensor([0, 1, 2, 0, 0, 1])).tolist() == [0, 0, 0, 1, 2, 2]
    assert document_ids(torch.tensor([[5, 6, 0, 1], [0, 1, 2, 3]])).tolist() == [[0, 0, 1, 1], [0, 0, 0, 0]]


def _block(q_docs, k_docs, causal=False, backend: Optional[str] = None):
    from easy_context.kernels import block_attention, count_block_work

    q, k, v, _ = random_qkv(1, 2, 1, len(q_docs), 16, torch.float32, seed=7)
    if len(k_docs) != len(q_docs):
        k, v = k[:, :, : len(k_docs)], v[:, :, : len(k_docs)]
    with count_block_work() as work:
        out, lse = block_attention(q, k, v, causal, q_docs=torch.tensor(q_docs), k_docs=torch.tensor(k_docs),
                                   backend=backend)
    return work, out, lse


def test_block_without_shared_document_calls_no_kernel():
    work, out, lse = _block([0, 0, 1, 1], [2, 2, 3])
    assert work.calls == 0 and work.pairs == 0
    assert torch.equal(out, torch.zeros_like(out)) and bool(torch.isneginf(lse).all())


def test_block_costs_only_shared_documents():
    work, out, lse = _block([0, 0, 1, 1, 1, 3], [1, 1, 2, 3, 3, 3])  # documents 1 (3x2) and 3 (1x3) meet
    assert work.calls == 2 and work.pairs == 3 * 2 + 1 * 3
    assert bool(torch.isneginf(lse[..., :2]).all()) and not bool(torch.isneginf(lse[..., 2:]).any())
    work, _, _ = _block([0, 0, 0, 1, 2, 2], [0, 0, 0, 1, 2, 2], causal=True)  # diagonal: one causal square each
    assert work.calls == 3 and work.pairs == 0.5 * (9 + 1 + 4)


@pytest.mark.parametrize("backend", ["torch_cpu", "math"])
def test_block_matches_masked_reference(backend):
    from easy_context.kernels import block_attention, block_attention_backward

    q_docs, k_docs = torch.tensor([0, 1, 1, 1, 2, 2, 4, 4]), torch.tensor([1, 1, 2, 2, 2, 3, 4, 4])
    q, k, v, dout = random_qkv(1, 4, 2, 8, 16, torch.float32, seed=8)
    out, lse = block_attention(q, k, v, q_docs=q_docs, k_docs=k_docs, backend=backend)
    dq, dk, dv = block_attention_backward(dout, q, k, v, out, lse, q_docs=q_docs, k_docs=k_docs, backend=backend)
    qd, kd, vd = (x.double().requires_grad_() for x in (q, k, v))
    groups = 2
    s = qd @ kd.repeat_interleave(groups, 1).transpose(-1, -2) * 16 ** -0.5
    s = s.masked_fill(~(q_docs[:, None] == k_docs[None, :]), -math.inf)
    ref_lse = torch.logsumexp(s, -1)
    ref_out = (torch.softmax(s, -1).nan_to_num(0.0)) @ vd.repeat_interleave(groups, 1)
    ref_out.backward(dout.double())
    assert bool(torch.isneginf(lse[..., 0]).all()) and torch.equal(out[..., 0, :], torch.zeros_like(out[..., 0, :]))
    seen = ~torch.isneginf(ref_lse)
    assert rel_err(lse[seen], ref_lse[seen]) <= FP32_TOL
    for a, b in ((out, ref_out), (dq, qd.grad), (dk, kd.grad), (dv, vd.grad)):
        assert rel_err(a, b) <= FP32_TOL


@pytest.mark.parametrize("backend", ["torch_cpu", "math"])
def test_causal_block_with_different_documents_matches_masked_reference(backend):
    """A causal block whose key rows are other tokens than its query rows (stripe's off-diagonal blocks)."""
    from easy_context.kernels import block_attention, block_attention_backward, count_block_work

    q_docs, k_docs = torch.tensor([0, 0, 1, 1, 1, 2, 2, 2, 2]), torch.tensor([0, 1, 1, 1, 1, 1, 2, 3, 3])
    q, k, v, dout = random_qkv(1, 2, 1, 9, 16, torch.float32, seed=9)
    with count_block_work() as work:
        out, lse = block_attention(q, k, v, True, q_docs=q_docs, k_docs=k_docs, backend=backend)
    assert work.pairs < 9 * 9 / 2
    dq, dk, dv = block_attention_backward(dout, q, k, v, out, lse, True, q_docs=q_docs, k_docs=k_docs,
                                          backend=backend)
    qd, kd, vd = (x.double().requires_grad_() for x in (q, k, v))
    s = qd @ kd.repeat_interleave(2, 1).transpose(-1, -2) * 16 ** -0.5
    allowed = (q_docs[:, None] == k_docs[None, :]) & torch.ones(9, 9, dtype=torch.bool).tril()
    s = s.masked_fill(~allowed, -math.inf)
    ref_lse = torch.logsumexp(s, -1)
    ref_out = torch.softmax(s, -1).nan_to_num(0.0) @ vd.repeat_interleave(2, 1)
    ref_out.backward(dout.double())
    seen = ~torch.isneginf(ref_lse)
    assert torch.equal(torch.isneginf(lse), ~seen)
    assert rel_err(lse[seen], ref_lse[seen]) <= FP32_TOL
    for a, b in ((out, ref_out), (dq, qd.grad), (dk, kd.grad), (dv, vd.grad)):
        assert rel_err(a, b) <= FP32_TOL


def test_plan_without_document_support_refuses_doc_ids():
    from easy_context.layout import CONTIGUOUS
    from easy_context.methods.ring import contiguous_plan, ring_schedule

    q, k, v, _ = random_qkv(1, 2, 2, 8, 16, torch.float32, seed=9)
    with pytest.raises(NotImplementedError, match="does not support packed documents"):
        ring_schedule(q, k, v, plan=contiguous_plan, layout=CONTIGUOUS, documents=False,
                      doc_ids=torch.zeros(8, dtype=torch.long))


WORK_LENGTHS = {"16 documents": [64] * 16, "one document": [1024]}


def count_work(rank: int, world_size: int) -> dict:
    """Forward attention work (query-key pairs, :func:`count_block_work`) of this rank for every method, with 16
    documents of 64 tokens and with one document of 1024."""
    from easy_context.kernels import count_block_work, document_ids
    from easy_context.methods import get_method

    found = {}
    for name in METHODS:
        method = get_method(name)
        for what, lengths in WORK_LENGTHS.items():
            x = torch.randn(1, 4, sum(lengths), 8, generator=torch.Generator().manual_seed(0))
            local = method.layout.shard(x, rank, world_size, dim=2)
            with count_block_work() as work:
                method.attention(local, local[:, :2], local[:, :2], causal=True,
                                 doc_ids=document_ids(positions(lengths)))
            found[name, what] = work.pairs
    return found


@pytest.mark.parametrize("method", METHODS)
def test_work_is_the_documents_own(method):
    """16 equal documents on 4 ranks cost each rank about 1/16 of the one-document work, evenly split.

    What each layout does with the documents (work counted per forward block call, a causal square of n as n²/2):

    * ring (contiguous chunks): one document is unbalanced, rank r does r full blocks and a causal one (max/mean
      1.75 on 4 ranks); 16 documents that each lie inside one chunk leave every rank its own 4 documents, balanced;
    * zigzag ring and stripe: balanced with one document and with 16 (each rank holds equal parts of every chunk pair
      or of every document);
    * DistFlashAttn: its helpers balance one document; with 16 the schedule keeps only the diagonal blocks;
    * Ulysses: every rank attends the whole sequence on H/P heads, so it is balanced by heads whatever the documents;
    * USP: Ulysses within groups, zigzag ring across them: balanced both ways.
    """
    work = results(4)["work"]
    docs = [w[method, "16 documents"] for w in work]
    one = [w[method, "one document"] for w in work]
    assert min(docs) > 0 and sum(docs) <= 1.02 * sum(one) / 16, (docs, one)
    assert max(docs) <= 1.1 * sum(docs) / 4, docs
    if method == "ring_attn":
        assert max(one) >= 1.7 * sum(one) / 4, one
    else:
        assert max(one) <= 1.1 * sum(one) / 4, one


def test_benchmark_script_at_a_small_size(tmp_path):
    """benchmarks/packed_documents.py at 256 tokens on 2 ranks: one row per method that takes documents, both runs
    timed, and 16 documents computing 1/16 of one document's query-key pairs (stripe a little less: it counts each
    of its causal pieces of n rows as n²/2)."""
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import packed_documents

    path = tmp_path / "rows.json"
    packed_documents.main(["--length", "256", "--repeats", "1", "--json", str(path)])
    rows = json.loads(path.read_text())
    assert [r["method"] for r in rows] == METHODS
    for r in rows:
        assert r["documents_s"] > 0 and r["one_document_s"] > 0, r
        assert 0.05 <= r["work_ratio"] <= 1 / 16, r
