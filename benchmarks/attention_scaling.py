"""Sequence-parallel attention vs single-process attention, measured side by side in one run.

Run under torchrun (any backend; gloo on CPU, NCCL on GPUs):

    torchrun --nproc_per_node 2 benchmarks/attention_scaling.py --lengths 4096 8192
    torchrun --nproc_per_node 4 benchmarks/attention_scaling.py --device cuda ...   # one GPU per rank

For every method and sequence length it times forward+backward of causal attention on the whole sequence in one
process (rank 0, while the others wait) and of the method over all ranks, and reports the speed-up, the per-rank
load balance (max/mean of attention work counted by ``easy_context.kernels.count_block_work``) and the peak
activation memory per rank of the parallel run relative to the single process (CUDA only).

Option names are shared with the other scripts (docs/cli.md); ``--seq-lens`` and ``--output`` are older spellings.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
import statistics
import time

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from easy_context import cli  # noqa: E402
from easy_context.cli import int_range  # noqa: E402


def parse_args(argv=None):
    p = cli.Parser(description=__doc__)
    p.add_argument("--methods", nargs="+", default=None, help="methods to run (unset: every sequence-parallel one)")
    p.add_argument("--lengths", "--seq-lens", nargs="+", type=int_range(1), default=[4096, 8192],
                   help="sequence lengths")
    p.add_argument("--heads", type=int_range(1), default=8, help="query heads")
    p.add_argument("--kv-heads", type=int_range(1), default=2, help="key/value heads")
    p.add_argument("--head-dim", type=int_range(1), default=64, help="head dimension")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--repeats", type=int_range(1), default=3, help="timed repetitions (the median is reported)")
    p.add_argument("--threads", type=int_range(1), default=1, help="CPU threads per process (reference uses the same)")
    p.add_argument("--output-file", "--output", default=None, help="also write the table as markdown to this file")
    return p.parse_args(argv)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time(fn, repeats, device, group=None):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if group is not None:
            dist.barrier(group)
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    backend = "nccl" if args.device == "cuda" else "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    device = torch.device(args.device, torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    dtype = getattr(torch, args.dtype)

    from easy_context.kernels import count_block_work
    from easy_context.methods import available_methods, get_method

    methods = args.methods or [m for m in available_methods() if get_method(m).is_sequence_parallel]
    rows = []
    for seq_len in args.lengths:
        g = torch.Generator().manual_seed(seq_len)
        shape = lambda h: (1, h, seq_len, args.head_dim)  # noqa: E731
        q, k, v, dout = (torch.randn(shape(h), generator=g).to(device, dtype)
                         for h in (args.heads, args.kv_heads, args.kv_heads, args.heads))

        # Single process: PyTorch's own fused causal attention on the whole sequence.
        single = None
        if rank == 0:

            def run_single():
                qs, ks, vs = (x.clone().requires_grad_() for x in (q, k, v))
                out = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True)
                out.backward(dout)

            single = _time(run_single, args.repeats, device)
        dist.barrier()

        for name in methods:
            method = get_method(name)
            try:
                method.validate(num_heads=args.heads, num_kv_heads=args.kv_heads, world_size=world)
                method.layout.check_length(seq_len, world, name)
            except ValueError as err:
                if rank == 0:
                    print(f"skip {name} at {seq_len}: {err}")
                continue
            shard = lambda x: method.layout.shard(x, rank, world, dim=2).contiguous()  # noqa: E731
            ql, kl, vl, dl = shard(q), shard(k), shard(v), shard(dout)

            def run_parallel():
                qs, ks, vs = (x.clone().requires_grad_() for x in (ql, kl, vl))
                out, _ = method.attention(qs, ks, vs, causal=True, scale=None, group=None)
                out.backward(dl)

            parallel = _time(run_parallel, args.repeats, device, group=None)
            with count_block_work() as work:
                run_parallel()
            works = [None] * world
            dist.all_gather_object(works, work.pairs)
            seconds = [None] * world
            dist.all_gather_object(seconds, parallel)
            if rank == 0:
                slowest = max(seconds)
                rows.append((name, world, seq_len, single, slowest, single / slowest,
                             max(works) / (sum(works) / world)))
    if rank == 0:
        header = ("| method | ranks | seq len | 1 process fwd+bwd (s) | parallel fwd+bwd (s) | speed-up "
                  "| work max/mean |")
        lines = [header, "|" + "---|" * 7]
        for name, world_, seq_len, single, parallel, speedup, balance in rows:
            lines.append(f"| {name} | {world_} | {seq_len} | {single:.3f} | {parallel:.3f} | {speedup:.2f}x | "
                         f"{balance:.2f} |")
        table = "\n".join(lines)
        print(f"\n{args.device}, {args.dtype}, heads {args.heads}/{args.kv_heads}, head dim {args.head_dim}, "
              f"{args.threads} thread(s) per process\n{table}")
        if args.output_file:
            with open(args.output_file, "w") as f:
                f.write(table + "\n")
    dist.destroy_process_group()

if __name__ == "__main__":
    main()
