"""What the CPU demo bought: its training loss by step, and the held-out perplexity before and after, as a table and
as one figure (``<demo folder>/demo.png``).

    python train_scripts/demo_summary.py outputs/cpu_demo-YYYYMMDD-HHMMSS

Reads ``model/log.jsonl`` (written by train.py) and ``perplexity.csv`` (written by eval_ppl.py; the first row is the
model before the run, the second after).
"""

import csv
import json
import sys
from pathlib import Path


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if args and args[0] in ("-h", "--help") else 2
    out = Path(args[0])
    steps = [json.loads(line) for line in (out / "model" / "log.jsonl").read_text().splitlines() if line.strip()]
    losses = [s["loss"] for s in steps]
    with open(out / "perplexity.csv", newline="") as f:
        rows = list(csv.reader(f))
    if len(rows) != 3:
        raise SystemExit(f"{out / 'perplexity.csv'} should hold two models (before, after), not {len(rows) - 1}")
    lengths = [int(x) for x in rows[0][1:]]
    before, after = ([float(x) for x in row[1:]] for row in rows[1:3])

    quarter = max(1, len(losses) // 4)
    first, last = sum(losses[:quarter]) / quarter, sum(losses[-quarter:]) / quarter
    print(f"training loss by step: {' '.join(f'{x:.2f}' for x in losses)}")
    print(f"  mean of the first {quarter} steps {first:.3f}, of the last {quarter} steps {last:.3f}")
    print("perplexity on Persuasion (held out), by context length:")
    print(f"  {'tokens':>8s} {'before':>8s} {'after':>8s}")
    for length, b, a in zip(lengths, before, after):
        print(f"  {length:8d} {b:8.2f} {a:8.2f}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_ppl) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax_loss.plot(range(1, len(losses) + 1), losses, marker="o", label="step")
    running = [sum(losses[max(0, i - 3): i + 1]) / len(losses[max(0, i - 3): i + 1]) for i in range(len(losses))]
    ax_loss.plot(range(1, len(losses) + 1), running, label="mean of the last 4 steps")
    ax_loss.legend()
    ax_loss.set(xlabel="step", ylabel="training loss", title="Training (2 processes, zigzag ring)")
    x = range(len(lengths))
    bars_of = ((-0.2, before, "before (RoPE base 1e5)"), (0.2, after, "after (raised base, fine-tuned)"))
    for shift, values, label in bars_of:
        bars = ax_ppl.bar([i + shift for i in x], values, width=0.4, label=label)
        ax_ppl.bar_label(bars, fmt="%.1f")
    ax_ppl.set_xticks(list(x), [f"{n // 1024}K" + (" (past 8K)" if n > 8192 else "") for n in lengths])
    ax_ppl.set(xlabel="context length (tokens)", ylabel="perplexity", title="Persuasion (held out)")
    ax_ppl.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(out / "demo.png", dpi=110)
    print(f"plot: {out / 'demo.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
