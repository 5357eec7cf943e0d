"""Packed documents vs one document: attention time of every method that takes packed documents, side by side.

    python benchmarks/packed_documents.py                       # 16K tokens, 16 documents, 2 gloo ranks
    python benchmarks/packed_documents.py --quick               # 2K tokens: a check in seconds
    python benchmarks/packed_documents.py --json benchmarks/results/packed_documents.json

The script starts ``--ranks`` gloo processes itself (``--threads`` CPU threads each). For every method registered
with ``documents=True`` it shards one random ``(1, H, S, D)`` q, k, v with the method's layout and times forward and
backward of the attention over the ranks on the same tensors twice, alternating, ``--repeats`` times after a warm-up:

* ``documents``: a row of ``--documents`` documents of equal length (``position_ids`` restarting at 0 at each one;
  ``doc_ids`` from :func:`easy_context.kernels.document_ids`), so a query attends only to its own document;
* ``one document``: the same tokens as one causal sequence.

A measurement is the slowest rank's time (every rank starts after a barrier); the table gives the medians and their
ratio, which is about ``1 / documents`` plus what does not shrink with the documents (the communication of the ring
methods, the all-to-alls of Ulysses, the per-document kernel calls). ``work ratio`` is the ratio of the query-key
pairs the two runs compute, summed over ranks (:func:`easy_context.kernels.count_block_work`, forward). Heads, head
dimension and dtype default to those of ``benchmarks/attention_scaling.py``. ``--json PATH`` writes one row per
method.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import run_on_ranks  # noqa: E402
from easy_context import cli  # noqa: E402
from easy_context.cli import int_range  # noqa: E402

QUICK_LENGTH = 2048
ORDER = ["ring_attn", "zigzag_ring_attn", "stripe_attn", "dist_flash_attn", "ulysses_attn", "usp_attn"]


def parse_args(argv=None):
    p = cli.Parser(description=__doc__)
    p.add_argument("--length", type=int_range(2), default=16384, help="tokens in the row")
    p.add_argument("--quick", action="store_true", help=f"--length {QUICK_LENGTH} and --repeats 1")
    p.add_argument("--documents", type=int_range(1), default=16, help="equal documents packed into the row")
    p.add_argument("--ranks", type=int_range(1, 8), default=2, help="gloo processes P")
    p.add_argument("--methods", nargs="+", default=None,
                   help="methods to time (unset: every method that takes packed documents)")
    p.add_argument("--heads", type=int_range(1), default=8, help="query heads")
    p.add_argument("--kv-heads", type=int_range(1), default=2, help="key/value heads")
    p.add_argument("--head-dim", type=int_range(1), default=64, help="head dimension")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--repeats", type=int_range(1), default=3, help="timed pairs of runs (the medians are reported)")
    p.add_argument("--threads", type=int_range(1), default=1, help="CPU threads per process")
    p.add_argument("--timeout", type=int_range(1), default=7200, help="seconds before the run is abandoned")
    p.add_argument("--json", type=Path, default=None, help="write one row per method here")
    p.add_argument("--output-file", "--output", default=None, help="also write the table as markdown to this file")
    args = p.parse_args(argv)
    if args.quick:
        args.length, args.repeats = QUICK_LENGTH, 1
    multiple = 2 * args.ranks * args.documents  # every layout's length multiple, with equal documents
    if args.length % multiple:
        p.error(f"--length {args.length} must be a multiple of 2 * ranks * documents = {multiple}")
    return args


def _measure(rank: int, world: int, args) -> list:
    """This rank's rows: per method, the times of both runs and the work they count."""
    import torch.distributed as dist

    from easy_context.kernels import count_block_work, document_ids
    from easy_context.methods import available_methods, get_method

    names = args.methods or sorted((m for m in available_methods() if get_method(m).documents),
                                   key=lambda m: (ORDER.index(m) if m in ORDER else len(ORDER), m))
    g = torch.Generator().manual_seed(0)
    dtype = getattr(torch, args.dtype)
    shape = lambda h: (1, h, args.length, args.head_dim)  # noqa: E731
    q, k, v, dout = (torch.randn(shape(h), generator=g).to(dtype)
                     for h in (args.heads, args.kv_heads, args.kv_heads, args.heads))
    doc_len = args.length // args.documents
    runs = {"documents": document_ids(torch.arange(doc_len).repeat(args.documents)), "one document": None}
    rows = []
    for name in names:
        method = get_method(name)
        if not method.documents:
            raise ValueError(f"{name} does not take packed documents")
        method.validate(num_heads=args.heads, num_kv_heads=args.kv_heads, world_size=world)
        shard = lambda x: method.layout.shard(x, rank, world, dim=2).contiguous()  # noqa: E731
        ql, kl, vl, dl = (shard(x) for x in (q, k, v, dout))

        def run(doc_ids):
            qs, ks, vs = (x.clone().requires_grad_() for x in (ql, kl, vl))
            documents = {} if doc_ids is None else {"doc_ids": doc_ids}
            dist.barrier()
            start = time.perf_counter()
            out, _ = method.attention(qs, ks, vs, causal=True, scale=None, group=None, **documents)
            out.backward(dl)
            return time.perf_counter() - start

        work = {}
        for what, doc_ids in runs.items():  # warm-up, counting the work
            with count_block_work() as counter:
                run(doc_ids)
            work[what] = counter.pairs
        times = {what: [] for what in runs}
        for _ in range(args.repeats):
            for what, doc_ids in runs.items():
                times[what].append(run(doc_ids))
        rows.append({"method": name, "times": times, "work": work})
    return rows


def run_ranks(args) -> list:
    """Every rank's rows, from ``args.ranks`` fresh gloo processes."""
    return run_on_ranks(_measure, args.ranks, args, threads=args.threads, timeout=args.timeout,
                        what=f"packed documents on {args.ranks} ranks")


def summarise(per_rank: list, args) -> list:
    """One row per method: median over repeats of the slowest rank's time, for both runs, and their ratios."""
    rows = []
    for i, first in enumerate(per_rank[0]):
        ranks = [r[i] for r in per_rank]
        seconds = {what: statistics.median(max(r["times"][what][j] for r in ranks) for j in range(args.repeats))
                   for what in first["times"]}
        work = {what: sum(r["work"][what] for r in ranks) for what in first["work"]}
        rows.append({"method": first["method"], "ranks": args.ranks, "seq_len": args.length,
                     "documents": args.documents, "heads": args.heads, "kv_heads": args.kv_heads,
                     "head_dim": args.head_dim, "dtype": args.dtype, "threads": args.threads,
                     "repeats": args.repeats, "documents_s": seconds["documents"],
                     "one_document_s": seconds["one document"],
                     "ratio": seconds["documents"] / seconds["one document"],
                     "work_ratio": work["documents"] / work["one document"]})
    return rows


def table(rows: list) -> str:
    first = rows[0]
    lines = [f"| method | {first['documents']} documents of {first['seq_len'] // first['documents']} (s) | "
             f"one document of {first['seq_len']} (s) | ratio | work ratio |", "| --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['documents_s']:.3f} | {r['one_document_s']:.3f} | {r['ratio']:.3f}x | "
                     f"{r['work_ratio']:.4f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    t0 = time.perf_counter()
    rows = summarise(run_ranks(args), args)
    text = table(rows)
    print(f"causal attention forward+backward, {args.length} tokens on {args.ranks} gloo ranks ({args.threads} "
          f"thread(s) each), heads {args.heads}/{args.kv_heads}, head dim {args.head_dim}, {args.dtype}; medians of "
          f"{args.repeats} (slowest rank); {time.perf_counter() - t0:.0f} s in all\n{text}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    if args.output_file:
        os.makedirs(os.path.dirname(os.path.abspath(args.output_file)), exist_ok=True)
        with open(args.output_file, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
