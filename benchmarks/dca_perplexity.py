"""Perplexity of SmolLM2-135M on Jane Austen at growing context lengths: plain attention vs Dual Chunk Attention.

For each length N and window k, the window is the N tokens starting at ``--start + k * max(lengths)`` of the six
novels joined in publication order, so every shorter window is a prefix of the longer ones. Perplexity is
``exp(mean token loss)`` over all N-1 predicted tokens of the window, and also over its last 2048 tokens (the
tokens with the longest context). Logits are never materialised for the whole window: the loss is computed from the
final hidden states in chunks (:func:`easy_context.chunked_cross_entropy_sum`).

Writes ``<out>/dca_perplexity.csv`` (appended as results arrive; ``--resume`` skips rows already there),
``<out>/dca_perplexity.md`` and ``<out>/dca_perplexity.png``.

Example (the README table)::

    nice -n 10 python benchmarks/dca_perplexity.py --lengths 4096 8192 16384 32768 --windows 1
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from easy_context import apply_seq_parallel_monkey_patch, chunked_cross_entropy_sum  # noqa: E402
from common import append_result, start_run  # noqa: E402
from easy_context import cli  # noqa: E402
from easy_context.cli import int_range  # noqa: E402
from easy_context.assets import austen_text, load_smollm2  # noqa: E402

FIELDS = ["method", "length", "window", "start_token", "ppl", "ppl_last2k", "tokens", "seconds",
          "pretraining_length", "chunk_size", "local_window"]
LAST = 2048


def parse_args(argv=None):
    p = cli.Parser(description=__doc__.split("\n\n")[0] + " Option names: docs/cli.md (--chunk-size, "
                   "--local-window and --out are older spellings).")
    p.add_argument("--lengths", type=int_range(2), nargs="+", default=[4096, 8192, 16384, 32768],
                   help="context lengths")
    p.add_argument("--methods", nargs="+", default=["plain", "dca"], choices=["plain", "dca"])
    p.add_argument("--windows", type=int_range(1), default=1, help="windows per length")
    p.add_argument("--start", type=int_range(0), default=0, help="first token of the first window")
    p.add_argument("--pretraining-length", type=int_range(1), default=8192, help="DCA pretraining length L")
    p.add_argument("--dca-chunk-size", "--chunk-size", dest="chunk_size", type=int_range(1), default=None,
                   help="DCA chunk size s (unset: 3L/4)")
    p.add_argument("--dca-local-window", "--local-window", dest="local_window", type=int_range(1), default=None,
                   help="DCA local window w (unset: L/8)")
    p.add_argument("--threads", type=int_range(1), default=2, help="torch threads")
    p.add_argument("--output-dir", "--out", dest="out", metavar="DIR", type=Path, default=Path("benchmarks/results"),
                   help="output folder")
    p.add_argument("--resume", action="store_true", help="skip (method, length, window) rows already in the CSV")
    return p.parse_args(argv)


@torch.no_grad()
def window_ppl(model, ids: torch.Tensor):
    """``(ppl over the window, ppl over its last LAST predicted tokens)`` for a ``(1, N)`` window."""
    hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state[0, :-1]
    targets = ids[0, 1:]
    weight = model.lm_head.weight
    total, count = chunked_cross_entropy_sum(hidden, weight, targets)
    last_total, last_count = chunked_cross_entropy_sum(hidden[-LAST:], weight, targets[-LAST:])
    return math.exp(total.item() / count.item()), math.exp(last_total.item() / last_count.item())


def write_outputs(rows, out: Path) -> None:
    """Markdown table (mean over windows) and a plot."""
    by = {}
    for r in rows:
        by.setdefault((r["method"], int(r["length"])), []).append(r)
    lengths = sorted({k[1] for k in by})
    methods = [m for m in ("plain", "dca") if any(k[0] == m for k in by)]

    def mean(method, length, field):
        vals = [float(r[field]) for r in by.get((method, length), [])]
        return sum(vals) / len(vals) if vals else None

    lines = ["| method | " + " | ".join(f"{n // 1024}K" for n in lengths) + " | windows |",
             "| --- |" + " --- |" * (len(lengths) + 1)]
    for m in methods:
        cells = []
        for n in lengths:
            v, last = mean(m, n, "ppl"), mean(m, n, "ppl_last2k")
            cells.append("–" if v is None else f"{v:.2f} (last 2K: {last:.2f})")
        wins = sorted({len(by.get((m, n), [])) for n in lengths if (m, n) in by})
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {'/'.join(map(str, wins))} |")
    (out / "dca_perplexity.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for m in methods:
        xs = [n for n in lengths if (m, n) in by]
        ax.plot(xs, [mean(m, n, "ppl") for n in xs], marker="o", label=f"{m} (window)")
        ax.plot(xs, [mean(m, n, "ppl_last2k") for n in xs], marker="x", linestyle="--", label=f"{m} (last 2K)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(lengths, [f"{n // 1024}K" for n in lengths])
    ax.axvline(8192, color="grey", linestyle=":", label="trained context (8K)")
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("perplexity")
    ax.set_title("SmolLM2-135M on Jane Austen")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "dca_perplexity.png", dpi=120)


def main(argv=None) -> int:
    args = parse_args(argv)
    csv_path, rows = start_run(args, "dca_perplexity", FIELDS)
    from tqdm import tqdm

    done = {(r["method"], int(r["length"]), int(r["window"])) for r in rows}

    model, tokenizer = load_smollm2(torch.float32, attn_implementation="sdpa")
    ids = tokenizer(austen_text(), return_tensors="pt").input_ids
    stride = max(args.lengths)
    need = args.start + args.windows * stride
    if ids.shape[1] < need:
        raise SystemExit(f"the text has {ids.shape[1]} tokens, fewer than the {need} requested")
    jobs = [(m, n, k) for m in args.methods for n in sorted(args.lengths) for k in range(args.windows)
            if (m, n, k) not in done]
    patched = False
    dca_cfg = None
    for method, n, k in tqdm(jobs, desc="windows", unit="window"):
        if method == "dca" and not patched:
            apply_seq_parallel_monkey_patch("dca", model, pretraining_length=args.pretraining_length,
                                            chunk_size=args.chunk_size, local_window=args.local_window)
            from easy_context.methods.dca import _MODEL_STATES

            dca_cfg = _MODEL_STATES[model].config
            patched = True
        elif method == "plain" and patched:
            model.set_attn_implementation("sdpa")
            patched = False
        start = args.start + k * stride
        window = ids[:, start : start + n]
        t0 = time.perf_counter()
        ppl, last = window_ppl(model, window)
        row = {"method": method, "length": n, "window": k, "start_token": start, "ppl": f"{ppl:.4f}",
               "ppl_last2k": f"{last:.4f}", "tokens": n, "seconds": f"{time.perf_counter() - t0:.1f}",
               "pretraining_length": args.pretraining_length if method == "dca" else "",
               "chunk_size": dca_cfg.chunk_size if method == "dca" else "",
               "local_window": dca_cfg.local_window if method == "dca" else ""}
        tqdm.write(f"{method:5s} {n:6d} window {k}: ppl {ppl:.3f} (last 2K {last:.3f}) in {row['seconds']} s")
        append_result(csv_path, FIELDS, row)
        rows.append(row)
        write_outputs(rows, args.out)
    write_outputs(rows, args.out)
    print((args.out / "dca_perplexity.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
