"""What the shard guard costs: a training step with and without it, side by side in one run.

    torchrun --nproc_per_node 2 benchmarks/guard_overhead.py --lengths 2048 4096

The guard (:func:`easy_context.checks.check_shards`) runs once per forward, at the first attention layer: every rank
compares its ``position_ids`` with its shard of the layout and the ranks all-gather four integers. This script builds
a model of SmolLM2-135M's shape (random weights, ``--layers`` decoder layers), and for each sequence length times
forward+backward of a zigzag step with the guard and with it replaced by a no-op, alternating, and also times the
guard call alone. It prints a markdown table (and writes it to ``--output-file``). Option names are shared with the
other scripts (docs/cli.md).
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from easy_context import cli  # noqa: E402
from easy_context.cli import int_range  # noqa: E402


def parse_args():
    p = cli.Parser(description=__doc__)
    p.add_argument("--lengths", "--seq-lens", nargs="+", type=int_range(1), default=[2048, 4096],
                   help="tokens per step")
    p.add_argument("--layers", type=int_range(1), default=2, help="decoder layers")
    p.add_argument("--repeats", type=int_range(1), default=3, help="timed steps per variant")
    p.add_argument("--threads", type=int_range(1), default=1, help="CPU threads per process")
    p.add_argument("--output-file", "--output", default=None, help="also write the table as markdown to this file")
    return p.parse_args()


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    from transformers import LlamaConfig, LlamaForCausalLM

    import easy_context as ec
    from easy_context import checks, hf_attention

    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=args.layers,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=65536,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    method = "zigzag_ring_attn"
    ec.apply_seq_parallel_monkey_patch(method, model)
    real_guard = hf_attention.check_shards
    rows = []
    for seq_len in args.lengths:
        ids = torch.randint(0, config.vocab_size, (1, seq_len + 1), generator=torch.Generator().manual_seed(1))
        local = ec.prepare_seq_parallel_inputs(method, ids[:, :-1], None, ids[:, 1:], rank, world, "cpu")

        def step():
            dist.barrier()
            t0 = time.perf_counter()
            logits = model(local["local_input_ids"], position_ids=local["local_position_ids"]).logits
            ec.seq_parallel_cross_entropy(logits, local["local_target_ids"]).backward()
            dist.barrier()
            return time.perf_counter() - t0

        step()  # warm-up
        times = {"guard": [], "none": []}
        for _ in range(args.repeats):
            for variant in ("guard", "none"):
                hf_attention.check_shards = real_guard if variant == "guard" else (lambda *a, **k: None)
                times[variant].append(step())
                model.zero_grad(set_to_none=True)
        hf_attention.check_shards = real_guard
        q = torch.empty(1, 9, local["local_input_ids"].shape[1], 64)
        dist.barrier()
        n = 200
        t0 = time.perf_counter()
        for _ in range(n):
            checks.check_shards(method, ec.get_method(method).layout, None, rank, world, q, local["local_position_ids"])
        guard_alone = (time.perf_counter() - t0) / n
        with_guard, without = statistics.median(times["guard"]), statistics.median(times["none"])
        rows.append((seq_len, with_guard, without, guard_alone))
    if rank == 0:
        lines = ["| tokens | step with guard (s) | step without (s) | with / without | guard call (ms) | "
                 "guard call / step |", "| --- | --- | --- | --- | --- | --- |"]
        for seq_len, g, n_, alone in rows:
            lines.append(f"| {seq_len} | {g:.3f} | {n_:.3f} | {g / n_:.3f} | {alone * 1e3:.3f} | "
                         f"{alone / n_ * 100:.3f}% |")
        table = "\n".join(lines)
        print(f"zigzag_ring_attn, {world} ranks, {args.layers}-layer SmolLM2-135M shape, {args.threads} thread(s) per "
              f"process, medians of {args.repeats} forward+backward steps\n{table}")
        if args.output_file:
            os.makedirs(os.path.dirname(os.path.abspath(args.output_file)), exist_ok=True)
            with open(args.output_file, "w") as f:
                f.write(table + "\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
