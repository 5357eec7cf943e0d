"""Whole training steps of SmolLM2-135M's shape at P = 1, 2 and 4 gloo ranks, one thread per process: tokens per
second per rank and parallel efficiency, for each sequence-parallel method.

Every measurement starts ``P`` fresh processes with one torch thread each. Each builds a Llama from SmolLM2-135M's
config (``assets/smollm2-135m/config.json``; random float32 weights, ``--layers`` of them, all 30 by default),
switches it to the method (``apply_seq_parallel_monkey_patch``; the same method at P = 1), turns on activation
checkpointing and AdamW, shards one random ``--seq-length`` sequence with ``prepare_seq_parallel_inputs`` and runs
the step train.py runs: forward, the chunked loss (``ChunkedLossModel``), backward, one all-reduce of the gradients
over the group (what DDP does) and the optimizer step. ``--warmup`` steps are run first, then ``--steps`` are timed.

Two measures of each step:

* **wall**: seconds from a barrier to the slowest rank's end of the step. ``efficiency = T(1) / (P · T(P))`` is the
  usual parallel efficiency (1.0: P ranks are P times as fast). It is printed only where every rank has a core of its
  own (P ≤ the cores of the machine); beyond, the ranks take turns on the cores and the wall time says nothing.
* **cpu**: each rank's process CPU seconds in the step (its computation and the work of sending and receiving).
  ``cpu efficiency = C(1) / (P · mean C(P))`` says how much work the split adds: 1.0 when the P ranks together do
  exactly the one-process work. It holds whatever the cores, so it is given at every P.

Tokens per second per rank are ``seq_length / (P · wall)``. ``--json PATH`` writes one row per (method, P);
``--output-file`` writes the markdown table.

    python benchmarks/step_scaling.py --quick
    python benchmarks/step_scaling.py --seq-length 8192 --ranks 1 2 4 --json benchmarks/results/step_scaling.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common import run_on_ranks  # noqa: E402
from easy_context.cli import int_range  # noqa: E402

CONFIG = ROOT / "assets" / "smollm2-135m" / "config.json"
METHODS = ["ring_attn", "zigzag_ring_attn", "stripe_attn", "dist_flash_attn", "ulysses_attn", "usp_attn"]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=METHODS, metavar="METHOD",
                        help=f"methods to measure (default: all of {', '.join(METHODS)})")
    parser.add_argument("--ranks", nargs="+", type=int_range(1), default=[1, 2, 4], help="P values (default 1 2 4)")
    parser.add_argument("--seq-length", type=int_range(8), default=None, help="tokens per step (default 4096)")
    parser.add_argument("--layers", type=int_range(1), default=None, help="decoder layers (default: all 30)")
    parser.add_argument("--steps", type=int_range(1), default=None, help="timed steps (default 2; the median is kept)")
    parser.add_argument("--warmup", type=int_range(0), default=1, help="untimed steps first (default 1)")
    parser.add_argument("--checkpointing", choices=["full", "remat", "none"], default="full")
    parser.add_argument("--quick", action="store_true",
                        help="4 layers, 2048 tokens, 1 timed step: a few minutes on 2 cores")
    parser.add_argument("--json", type=Path, default=None, help="write one row per (method, P) here")
    parser.add_argument("--output-file", type=Path, default=None, help="write the markdown table here")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds for one measurement (default 3600)")
    args = parser.parse_args(argv)
    quick = args.quick
    args.layers = args.layers or (4 if quick else None)
    args.seq_length = args.seq_length or (2048 if quick else 4096)
    args.steps = args.steps or (1 if quick else 2)
    for p in args.ranks:
        if args.seq_length % (2 * p):
            parser.error(f"--seq-length {args.seq_length} is not divisible by 2 x {p} (zigzag and usp need it)")
    if not CONFIG.exists():
        print(f"{CONFIG} is missing: run bash scripts/setup.sh", file=sys.stderr)
        raise SystemExit(2)
    return args


def measure_rank(rank: int, world: int, method: str, args) -> dict:
    import torch.distributed as dist
    from transformers import AutoConfig, AutoModelForCausalLM

    import easy_context as ec
    from easy_context.training import ChunkedLossModel, enable_checkpointing

    config = AutoConfig.from_pretrained(CONFIG.parent)
    if args.layers is not None:
        config.num_hidden_layers = args.layers
    config.max_position_embeddings = max(config.max_position_embeddings, args.seq_length)
    config.use_cache = False
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    ec.apply_seq_parallel_monkey_patch(method, model)
    enable_checkpointing(model, args.checkpointing)
    model.train()
    step_model = ChunkedLossModel(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    params = [p for p in model.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, config.vocab_size, (1, args.seq_length + 1), generator=g)
    local = ec.prepare_seq_parallel_inputs(method, tokens[:, :-1], None, tokens[:, 1:], rank, world, "cpu")

    def step():
        loss_sum, count = step_model(local["local_input_ids"], local["local_position_ids"], local["local_target_ids"])
        total = count.detach().clone().float()
        dist.all_reduce(total)
        (loss_sum / total).backward()
        flat = torch.cat([p.grad.reshape(-1) for p in params])  # one bucket, as DDP all-reduces them
        dist.all_reduce(flat)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    walls, cpus = [], []
    for i in range(args.warmup + args.steps):
        dist.barrier()
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        cpu = time.process_time() - c0
        dist.barrier()
        if i >= args.warmup:
            walls.append(time.perf_counter() - t0)
            cpus.append(cpu)
    return {"wall": statistics.median(walls), "cpu": statistics.median(cpus)}


def refusal(method: str, world: int, args) -> str:
    """Why ``method`` cannot run this model's heads on ``world`` ranks (empty when it can)."""
    from easy_context.methods import get_method

    config = json.loads(CONFIG.read_text())
    try:
        get_method(method).validate(num_heads=config["num_attention_heads"],
                                    num_kv_heads=config["num_key_value_heads"], world_size=world)
    except ValueError as err:
        return str(err).split(": ", 1)[-1].split(". ")[0]
    return ""


def measure(method: str, world: int, args) -> dict:
    why = refusal(method, world, args)
    if why:
        return {"method": method, "ranks": world, "seq_len": args.seq_length, "layers": args.layers or 30,
                "refused": why}
    ranks = run_on_ranks(measure_rank, world, method, args, threads=1, timeout=args.timeout,
                         what=f"{method} at P={world}")
    return {"method": method, "ranks": world, "seq_len": args.seq_length, "layers": args.layers or 30,
            "wall_s": max(r["wall"] for r in ranks), "cpu_s": statistics.mean(r["cpu"] for r in ranks)}


def add_efficiency(rows: list, cores: int) -> list:
    """Tokens/s per rank and both efficiencies, each relative to the same method at P = 1."""
    base = {r["method"]: r for r in rows if r["ranks"] == 1 and "refused" not in r}
    for r in rows:
        if "refused" in r:
            continue
        p, one = r["ranks"], base.get(r["method"])
        r["tokens_per_s_per_rank"] = r["seq_len"] / (p * r["wall_s"])
        r["efficiency"] = one["wall_s"] / (p * r["wall_s"]) if one is not None and p <= cores else None
        r["cpu_efficiency"] = one["cpu_s"] / (p * r["cpu_s"]) if one is not None else None
    return rows


def table(rows: list, cores: int) -> str:
    fmt = lambda x: "n/a" if x is None else f"{x:.2f}"  # noqa: E731
    lines = ["| method | P | step wall (s) | tokens/s per rank | efficiency | cpu s per rank | cpu efficiency |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if "refused" in r:
            lines.append(f"| `{r['method']}` | {r['ranks']} | refused: {r['refused']} | | | | |")
            continue
        lines.append(f"| `{r['method']}` | {r['ranks']} | {r['wall_s']:.2f} | {r['tokens_per_s_per_rank']:.0f} | "
                     f"{fmt(r['efficiency'])} | {r['cpu_s']:.2f} | {fmt(r['cpu_efficiency'])} |")
    first = rows[0]
    lines.append(f"\n{first['seq_len']} tokens, {first['layers']} layers of SmolLM2-135M's shape, float32, one thread "
                 f"per process, {cores} cores: efficiency is n/a where P exceeds the cores.")
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    cores = len(os.sched_getaffinity(0))
    rows = []
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    jobs = [(m, p) for m in args.methods for p in sorted(args.ranks)]
    bar = tqdm(jobs, desc="steps", unit="run") if tqdm is not None else jobs
    for method, world in bar:
        rows.append(measure(method, world, args))
    text = table(add_efficiency(rows, cores), cores)
    print(text)
    if args.output_file is not None:
        args.output_file.parent.mkdir(parents=True, exist_ok=True)
        args.output_file.write_text(text + "\n")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.json.with_suffix(".tmp")
        tmp.write_text(json.dumps(rows, indent=1) + "\n")
        tmp.replace(args.json)


if __name__ == "__main__":
    main()
