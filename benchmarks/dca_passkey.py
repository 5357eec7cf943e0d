"""Passkey retrieval with SmolLM2-135M-Instruct in Jane Austen's text: plain attention vs Dual Chunk Attention.

One trial: the sentence ``The pass key is NNNNN. Remember it. NNNNN is the pass key.`` is inserted at a relative
depth (at a paragraph or sentence boundary) into Austen text of the requested total length (chat template included),
followed by the question ``What is the pass key?``. The model answers greedily (``--new-tokens`` tokens; every digit is
its own token, so keep at least 24) and the trial succeeds when the 5-digit key appears in the answer. The key is
drawn from a fixed seed per (length, depth), so plain and DCA see exactly the same prompts. Nothing is tuned to make
retrieval succeed.

Writes ``<out>/dca_passkey.csv`` (appended per trial; ``--resume`` skips finished trials), ``<out>/dca_passkey.md``
and ``<out>/dca_passkey.png``.

Example (the README table)::

    nice -n 10 python benchmarks/dca_passkey.py --lengths 4096 16384 --depths 0.1 0.5 0.9
"""

from __future__ import annotations

import random
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from easy_context import apply_seq_parallel_monkey_patch  # noqa: E402
from common import append_result, start_run  # noqa: E402
from easy_context import cli  # noqa: E402
from easy_context.cli import float_range, int_range  # noqa: E402
from easy_context.assets import austen_text, load_smollm2  # noqa: E402

FIELDS = ["method", "length", "depth", "prompt_tokens", "passkey", "found", "answer", "seconds"]
INSTRUCTION = ("There is a pass key hidden inside a long text. Find it and memorize it. I will ask you about the pass "
               "key afterwards.\n\n")
QUESTION = "\n\nWhat is the pass key?"


def parse_args(argv=None):
    p = cli.Parser(description=__doc__.split("\n\n")[0] + " Option names: docs/cli.md (--new-tokens and --out "
                   "are older spellings).")
    p.add_argument("--lengths", type=int_range(2), nargs="+", default=[4096, 16384, 32768],
                   help="prompt lengths (tokens)")
    p.add_argument("--depths", type=float_range(0, 1), nargs="+", default=[0.1, 0.5, 0.9], help="needle depths")
    p.add_argument("--methods", nargs="+", default=["plain", "dca"], choices=["plain", "dca"])
    p.add_argument("--pretraining-length", type=int_range(1), default=8192, help="DCA pretraining length L")
    p.add_argument("--max-new-tokens", "--new-tokens", type=int_range(1), default=24,
                   help="tokens generated per answer")
    p.add_argument("--seed", type=int_range(0), default=0)
    p.add_argument("--threads", type=int_range(1), default=2, help="torch threads")
    p.add_argument("--output-dir", "--out", dest="out", metavar="DIR", type=Path, default=Path("benchmarks/results"),
                   help="output folder")
    p.add_argument("--resume", action="store_true", help="skip (method, length, depth) trials already in the CSV")
    return p.parse_args(argv)


def passkey_for(seed: int, length: int, depth: float) -> str:
    return str(random.Random(f"{seed}-{length}-{depth}").randint(10000, 99999))


def build_prompt(tokenizer, haystack_ids, length: int, depth: float, key: str) -> torch.Tensor:
    """Chat-formatted prompt of ``length`` tokens (within a few) with the needle at ``depth`` of the haystack."""
    needle = f" The pass key is {key}. Remember it. {key} is the pass key. "

    def render(n_hay: int) -> torch.Tensor:
        text = tokenizer.decode(haystack_ids[:n_hay])
        cut = int(depth * len(text))
        # insert at the next sentence end so the needle does not split a word or a sentence
        match = re.search(r"[.!?][\"']?\s", text[cut:])
        cut = cut + match.end() if match else cut
        body = INSTRUCTION + text[:cut] + needle + text[cut:] + QUESTION
        messages = [{"role": "user", "content": body}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)["input_ids"]
        return ids

    n_hay = length - 120
    ids = render(n_hay)
    n_hay -= ids.shape[1] - length  # one correction for the template and needle overhead
    ids = render(n_hay)
    return ids[:, -length:] if ids.shape[1] > length else ids


def write_outputs(rows, out: Path) -> None:
    by = {}
    for r in rows:
        by.setdefault((r["method"], int(r["length"])), []).append(r)
    lengths = sorted({k[1] for k in by})
    methods = [m for m in ("plain", "dca") if any(k[0] == m for k in by)]
    lines = ["| method | " + " | ".join(f"{n // 1024}K" for n in lengths) + " |",
             "| --- |" + " --- |" * len(lengths)]
    for m in methods:
        cells = []
        for n in lengths:
            trials = by.get((m, n), [])
            hits = sum(r["found"] in ("1", 1, True, "True") for r in trials)
            cells.append(f"{hits}/{len(trials)}" if trials else "–")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += ["", "| method | length | depth | pass key | answer |", "| --- | --- | --- | --- | --- |"]
    for r in rows:
        answer = str(r["answer"]).replace("|", "/").replace("\n", " ")
        lines.append(f"| {r['method']} | {r['length']} | {r['depth']} | {r['passkey']} | {answer} |")
    (out / "dca_passkey.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    width = 0.8 / max(1, len(methods))
    for idx, m in enumerate(methods):
        acc = []
        for n in lengths:
            trials = by.get((m, n), [])
            acc.append(sum(r["found"] in ("1", 1, True, "True") for r in trials) / len(trials) if trials else 0)
        ax.bar([i + idx * width for i in range(len(lengths))], acc, width, label=m)
    ax.set_xticks([i + width * (len(methods) - 1) / 2 for i in range(len(lengths))],
                  [f"{n // 1024}K" for n in lengths])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("retrieval accuracy")
    ax.set_xlabel("prompt length (tokens)")
    ax.set_title("Passkey retrieval, SmolLM2-135M-Instruct (trained at 8K)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "dca_passkey.png", dpi=120)


def main(argv=None) -> int:
    args = parse_args(argv)
    csv_path, rows = start_run(args, "dca_passkey", FIELDS)
    from tqdm import tqdm

    done = {(r["method"], int(r["length"]), float(r["depth"])) for r in rows}

    model, tokenizer = load_smollm2(torch.float32, attn_implementation="sdpa")
    model.generation_config.pad_token_id = tokenizer.eos_token_id
    haystack = tokenizer(austen_text()[: 6 * max(args.lengths)], return_tensors="pt").input_ids[0]
    # plain and DCA alternate on the same prompt, so an interrupted run still compares like with like
    jobs = [(m, n, d) for n in sorted(args.lengths) for d in args.depths for m in args.methods
            if (m, n, float(d)) not in done]
    patched = False
    for method, n, depth in tqdm(jobs, desc="trials", unit="trial"):
        if method == "dca" and not patched:
            apply_seq_parallel_monkey_patch("dca", model, pretraining_length=args.pretraining_length)
            patched = True
        elif method == "plain" and patched:
            model.set_attn_implementation("sdpa")
            patched = False
        key = passkey_for(args.seed, n, depth)
        ids = build_prompt(tokenizer, haystack, n, depth, key)
        t0 = time.perf_counter()
        with torch.no_grad():
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_new_tokens,
                                 do_sample=False)
        answer = tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True).strip()
        row = {"method": method, "length": n, "depth": depth, "prompt_tokens": ids.shape[1], "passkey": key,
               "found": int(key in answer), "answer": answer, "seconds": f"{time.perf_counter() - t0:.1f}"}
        tqdm.write(f"{method:5s} {n:6d} depth {depth:.2f}: key {key} -> {answer!r} ({row['seconds']} s)")
        append_result(csv_path, FIELDS, row)
        rows.append(row)
        write_outputs(rows, args.out)
    write_outputs(rows, args.out)
    print((args.out / "dca_passkey.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
