"""Per-token decoding time of SmolLM2-135M with a KV cache: plain attention vs Dual Chunk Attention, side by side.

    nice -n 10 python benchmarks/dca_decode.py                        # cache lengths 2K, 4K, 8K, 16K
    python benchmarks/dca_decode.py --lengths 2048 --steps 4             # a check in seconds
    python benchmarks/dca_decode.py --json benchmarks/results/dca_decode.json

For every cache length ``S`` three ``DynamicCache`` objects of ``S`` tokens are filled with the same random keys and
values (the decoding cost depends on the cache's shape, not its contents, and a real ``S``-token prefill would take
minutes per length on a CPU), one per attention implementation of the same model:

* ``plain``: transformers' ``sdpa`` attention;
* ``DCA re-rotating``: ``dca`` with ``cache_rotated_keys=False``, which re-rotates every cached key of every layer
  at every step;
* ``DCA``: ``dca`` as configured by default, which keeps the rotated keys per layer and rotates only the new key.

After ``--warmup`` untimed steps on each cache (DCA's first step rotates its whole cache once), ``--steps`` tokens
are decoded one at a time, the three implementations taking turns token by token (the order rotating), so that
other load on the machine hits all three alike. The table gives the median time per decoded token and
the ratios to plain attention, and the bytes of the KV cache's keys and of DCA's rotated-key state at the end of a
DCA run. With ``pretraining_length=8192`` (the default) DCA's chunk size is 6144: shorter caches are one chunk, where
DCA computes what plain attention computes; longer ones use all three position schemes.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from easy_context import apply_seq_parallel_monkey_patch, cli  # noqa: E402
from easy_context.cli import int_range  # noqa: E402
from easy_context.methods.dca import DCAConfig, rotated_key_bytes  # noqa: E402

VARIANTS = ["plain", "DCA re-rotating", "DCA"]


def parse_args(argv=None):
    p = cli.Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=int_range(1), nargs="+", default=[2048, 4096, 8192, 16384],
                   help="cached tokens before decoding")
    p.add_argument("--steps", type=int_range(1), default=16, help="timed decoding steps per implementation")
    p.add_argument("--warmup", type=int_range(1), default=3, help="untimed decoding steps first")
    p.add_argument("--pretraining-length", type=int_range(2), default=8192, help="DCA pretraining length L")
    p.add_argument("--threads", type=int_range(1), default=2, help="torch threads")
    p.add_argument("--json", type=Path, default=None, help="write one row per cache length here")
    p.add_argument("--output-file", "--output", default=None, help="also write the table as markdown to this file")
    return p.parse_args(argv)


def _use(model, variant: str, pretraining_length: int) -> None:
    if variant == "plain":
        model.set_attn_implementation("sdpa")
    else:
        apply_seq_parallel_monkey_patch("dca", model, pretraining_length=pretraining_length,
                                        cache_rotated_keys=variant == "DCA")


def _filled_cache(model, length: int):
    from transformers import DynamicCache

    config = model.config
    kv_heads, head_dim = config.num_key_value_heads, config.hidden_size // config.num_attention_heads
    cache = DynamicCache(config=config)
    g = torch.Generator().manual_seed(0)
    for layer in range(config.num_hidden_layers):
        k = torch.randn(1, kv_heads, length, head_dim, generator=g) * 0.5
        v = torch.randn(1, kv_heads, length, head_dim, generator=g)
        cache.update(k, v, layer)
    return cache


@torch.no_grad()
def _step(model, cache, token):
    """Decode one token; returns (seconds, next token)."""
    t0 = time.perf_counter()
    logits = model(token, past_key_values=cache, use_cache=True).logits
    return time.perf_counter() - t0, logits[:, -1:].argmax(-1)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from easy_context.assets import load_smollm2

    model, _ = load_smollm2(attn_implementation="sdpa")
    chunk = DCAConfig.create(args.pretraining_length).chunk_size
    rows = []
    for length in args.lengths:
        caches = {v: _filled_cache(model, length) for v in VARIANTS}
        tokens = {v: torch.tensor([[42]]) for v in VARIANTS}
        times = {v: [] for v in VARIANTS}
        for step in range(args.warmup + args.steps):
            for i in range(len(VARIANTS)):
                variant = VARIANTS[(step + i) % len(VARIANTS)]
                _use(model, variant, args.pretraining_length)
                seconds, tokens[variant] = _step(model, caches[variant], tokens[variant])
                if step >= args.warmup:
                    times[variant].append(seconds)
        cache = caches["DCA"]
        key_bytes = sum(layer.keys.numel() * layer.keys.element_size() for layer in cache.layers)
        med = {v: statistics.median(t) for v, t in times.items()}
        rows.append({"cached_tokens": length, "chunk_size": chunk, "above_chunk": length > chunk,
                     "plain_ms": med["plain"] * 1e3, "dca_rerotating_ms": med["DCA re-rotating"] * 1e3,
                     "dca_ms": med["DCA"] * 1e3, "key_bytes": key_bytes, "rotated_key_bytes": rotated_key_bytes(cache),
                     "steps": args.steps})
        print(f"{length}: {rows[-1]}", flush=True)
        del caches, cache
    lines = ["| cached tokens | plain (ms/token) | DCA re-rotating (ms/token) | DCA (ms/token) | re-rotating / plain | "
             "DCA / plain | cached keys (MiB) | DCA rotated keys (MiB) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        where = "above" if r["above_chunk"] else "below"
        lines.append(f"| {r['cached_tokens']} ({where} s) | {r['plain_ms']:.1f} | {r['dca_rerotating_ms']:.1f} | "
                     f"{r['dca_ms']:.1f} | {r['dca_rerotating_ms'] / r['plain_ms']:.2f} | "
                     f"{r['dca_ms'] / r['plain_ms']:.2f} | {r['key_bytes'] / 2**20:.1f} | "
                     f"{r['rotated_key_bytes'] / 2**20:.1f} |")
    table = "\n".join(lines)
    print(f"SmolLM2-135M float32, batch 1, {args.threads} thread(s), DCA pretraining_length={args.pretraining_length} "
          f"(chunk size s = {chunk}); medians of {args.steps} decoded tokens per cell\n{table}")
    if args.output_file:
        Path(args.output_file).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output_file).write_text(table + "\n")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return rows


if __name__ == "__main__":
    main()
