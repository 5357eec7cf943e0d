"""Context-extension adapters on SmolLM2-135M: extract LoRAs of several ranks from a long-context fine-tune, merge
each into the original model, and compare with the fine-tune.

For every rank: ``extract_lora(base, tuned)`` in a fresh process (its time, adapter size and peak RSS above the
process's RSS before it), ``apply_adapter(base, adapter)``, then one forward pass of ``--length`` tokens of Austen
through base, tuned and every merged model. Reported per model: perplexity over the window (and over its last 2,048
tokens), and the logits' error against the tuned model's (relative Frobenius norm over the whole window, and the
largest absolute difference), computed from the final hidden states chunk by chunk so that ``length × vocab``
logits never exist at once.

Two more rows show what the long-context config is worth: ``base+rope`` is the original weights with the tuned
config (RoPE base raised, no training), and ``merged-r<max>-naive`` is the highest-rank merge with the *base's*
config, as a merge that forgets the config would leave it.

The window is taken from the token stream train.py trains on (the six novels in publication order, each followed by
the end-of-text token, cut into ``--train-seq-length`` samples) at the first sample index at or after
``--start-sample`` where ``ceil(length / train_seq_length) + 1`` consecutive samples were not among those the
training run drew (``--train-steps`` steps of one sample with ``--train-seed``). So the evaluation text is held out.

Writes ``<out>/adapters_smollm2.csv`` (one row per model; ``--resume`` keeps finished rows) and
``<out>/adapters_smollm2.md``.

Example (the README table)::

    nice -n 10 python benchmarks/adapters_smollm2.py --tuned outputs/adapters-tuned-smollm2 --ranks 8 16 64
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import append_result, proc_status, start_run  # noqa: E402
from easy_context.adapters import apply_adapter, extract_lora  # noqa: E402
from easy_context.assets import load_tokenizer, smollm2_path  # noqa: E402

FIELDS = ["model", "rank", "adapter_mib", "extract_s", "extract_peak_rss_mib", "largest_tensor_mib", "energy",
          "ppl", "ppl_last2k", "logit_rel_err", "logit_max_abs_err", "rope_theta", "max_position_embeddings", "length",
          "start_token", "forward_s"]
CHUNK = 2048


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--base", type=Path, default=None, help="original model folder (default: the SmolLM2 asset)")
    p.add_argument("--tuned", type=Path, required=True, help="the long-context fine-tune (train.py output folder)")
    p.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 64])
    p.add_argument("--length", type=int, default=16384, help="evaluation window in tokens")
    p.add_argument("--start-sample", type=int, default=0, help="first training-sample index to consider")
    p.add_argument("--train-seq-length", type=int, default=8192)
    p.add_argument("--train-steps", type=int, default=10)
    p.add_argument("--train-seed", type=int, default=0)
    p.add_argument("--work", type=Path, default=Path("outputs/adapters-bench"), help="adapters and merged models")
    p.add_argument("--no-extra", action="store_true", help="skip the base+rope and naive-merge rows")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="output folder")
    p.add_argument("--resume", action="store_true", help="keep rows already in the CSV")
    return p.parse_args(argv)


def peak_rss_of(fn):
    """``(fn(), peak RSS during fn minus RSS before it)``; the peak is reset through /proc/self/clear_refs."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return fn(), float("nan")
    before = proc_status("VmRSS")
    result = fn()
    return result, proc_status("VmHWM") - before


def probe(base, tuned, adapter, rank) -> None:
    """Extract in this (fresh) process and print the figures of the extraction as JSON."""
    import peft  # noqa: F401  (loaded before the measurement, as the extraction imports it)
    import tqdm.auto  # noqa: F401
    from transformers import AutoConfig

    from easy_context.adapters.plan import meta_model

    meta_model(AutoConfig.from_pretrained(tuned))
    t0 = time.perf_counter()
    report, peak = peak_rss_of(lambda: extract_lora(base, tuned, adapter, rank, overwrite=True, progress=False,
                                                    log=None))
    largest = max(4 * math.prod(s) for m in report["modules"] for s in m["shapes"].values())
    print(json.dumps({"adapter_mib": round(report["adapter_bytes"] / 2**20, 2),
                      "extract_s": round(time.perf_counter() - t0, 1), "extract_peak_rss_mib": round(peak / 2**20, 1),
                      "largest_tensor_mib": round(largest / 2**20, 1),
                      "energy": round(report["retained_energy_overall"], 4)}))


def eval_window(args, tokenizer):
    """The held-out window: ``(token ids of length+1, start token)``."""
    from easy_context import training as T

    docs = T.tokenize_documents(T.load_documents("austen"), tokenizer)
    data = T.pack_documents(docs, args.train_seq_length, tokenizer.eos_token_id, tokenizer.pad_token_id or 0)
    stream = data["input_ids"].reshape(-1)
    n = data["input_ids"].shape[0]
    trained = {int(T.global_batch_indices(s, n, 1, args.train_seed)[0]) for s in range(args.train_steps)}
    span = math.ceil((args.length + 1) / args.train_seq_length)
    for k in range(args.start_sample, n - span + 1):
        if not any(k + i in trained for i in range(span)):
            start = k * args.train_seq_length
            return stream[start:start + args.length + 1].clone(), start, sorted(trained)
    raise SystemExit(f"no {span} consecutive untrained samples from sample {args.start_sample}")


def final_hidden(path, ids, config_from=None):
    """Final hidden states (after the last norm) and the LM head weight of the model in ``path``; with
    ``config_from``, the weights of ``path`` under that folder's config."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if config_from is None:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, config=AutoConfig.from_pretrained(config_from),
                                                     dtype=torch.float32)
    model.eval()
    cfg = model.config
    t0 = time.perf_counter()
    with torch.no_grad():
        hidden = model.model(ids[None, :-1]).last_hidden_state[0]
    seconds = time.perf_counter() - t0
    head = model.lm_head.weight.detach().clone()
    from easy_context.training import get_rope_theta

    info = {"rope_theta": get_rope_theta(cfg), "max_position_embeddings": cfg.max_position_embeddings,
            "forward_s": round(seconds, 1)}
    del model
    return hidden, head, info


def perplexity(hidden, head, targets, last=None):
    """exp(mean token loss) over the window, or over its last ``last`` tokens."""
    first = 0 if last is None else hidden.shape[0] - last
    nll = 0.0
    for i in range(first, hidden.shape[0], CHUNK):
        logits = hidden[i:i + CHUNK] @ head.t()
        nll += float(torch.nn.functional.cross_entropy(logits, targets[i:i + CHUNK], reduction="sum"))
    return math.exp(nll / (hidden.shape[0] - first))


def logit_error(hidden, head, ref_hidden, ref_head):
    diff_sq, ref_sq, worst = 0.0, 0.0, 0.0
    for i in range(0, hidden.shape[0], CHUNK):
        a = hidden[i:i + CHUNK] @ head.t()
        b = ref_hidden[i:i + CHUNK] @ ref_head.t()
        d = (a - b).double()
        diff_sq += float((d * d).sum())
        ref_sq += float((b.double() ** 2).sum())
        worst = max(worst, float(d.abs().max()))
    return math.sqrt(diff_sq / ref_sq), worst


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--probe":
        torch.set_num_threads(int(argv[argv.index("--threads") + 1]))
        probe(argv[1], argv[2], argv[3], int(argv[4]))
        return 0
    args = parse_args(argv)
    path, done = start_run(args, "adapters_smollm2", FIELDS)
    finished = {row["model"]: row for row in done}
    base = args.base or smollm2_path()
    args.work.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer()
    ids, start, trained = eval_window(args, tokenizer)
    print(f"evaluation window: tokens {start}..{start + args.length} of the training stream "
          f"(training drew samples {trained})", file=sys.stderr)

    # 1. Extraction (each in a fresh process, so that its peak RSS is measured cleanly) and merging.
    extraction = {}
    for rank in args.ranks:
        adapter, merged = args.work / f"adapter-r{rank}", args.work / f"merged-r{rank}"
        if (merged / "config.json").is_file() and (adapter / "bench.json").is_file():
            extraction[rank] = json.loads((adapter / "bench.json").read_text())
            continue
        proc = subprocess.run([sys.executable, __file__, "--probe", str(base), str(args.tuned), str(adapter),
                               str(rank), "--tuned", str(args.tuned), "--threads", str(args.threads)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"extraction at rank {rank} failed:\n{proc.stderr[-3000:]}")
        extraction[rank] = json.loads(proc.stdout.strip().splitlines()[-1])
        apply_adapter(base, adapter, merged, overwrite=True, progress=False, log=None)
        (adapter / "bench.json").write_text(json.dumps(extraction[rank]))
        print(f"rank {rank}: {json.dumps(extraction[rank])}", file=sys.stderr)

    # 2. One forward pass per model over the window.
    targets = ids[1:]
    models = [("tuned", args.tuned, None, None), ("base", base, None, None)]
    models += [(f"merged-r{r}", args.work / f"merged-r{r}", None, r) for r in args.ranks]
    if not args.no_extra:
        top = max(args.ranks)
        models += [("base+rope", base, args.tuned, None), (f"merged-r{top}-naive", args.work / f"merged-r{top}", base,
                                                            top)]
    if all(m[0] in finished for m in models):
        ref_hidden = None
    else:
        ref_hidden, ref_head, ref_info = final_hidden(args.tuned, ids)
    for name, folder, config_from, rank in models:
        if name in finished:
            continue
        if name == "tuned":
            hidden, head, info = ref_hidden, ref_head, ref_info
        else:
            hidden, head, info = final_hidden(folder, ids, config_from)
        rel, worst = logit_error(hidden, head, ref_hidden, ref_head)
        row = {"model": name, "rank": rank or "", "ppl": round(perplexity(hidden, head, targets), 3),
               "ppl_last2k": round(perplexity(hidden, head, targets, last=min(2048, args.length)), 3),
               "logit_rel_err": f"{rel:.3e}", "logit_max_abs_err": f"{worst:.3e}", "length": args.length,
               "start_token": start, **info, **(extraction.get(rank, {}) if name == f"merged-r{rank}" else {})}
        append_result(path, FIELDS, row)
        finished[name] = row
        print(json.dumps(row), file=sys.stderr)

    rows = [finished[m[0]] for m in models if m[0] in finished]
    lines = [f"SmolLM2-135M, {args.length:,} tokens of Austen (held out, from token {start:,}); logit error against "
             f"the tuned model over the whole window.", "",
             "| model | rank | adapter size | perplexity | last 2K | logit error (relative) | max abs logit error | "
             "rope_theta | max_position_embeddings |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        size = f"{float(r['adapter_mib']):.1f} MiB" if r.get("adapter_mib") not in (None, "") else ""
        lines.append(f"| {r['model']} | {r['rank']} | {size} | {float(r['ppl']):.2f} | {float(r['ppl_last2k']):.2f} "
                     f"| {float(r['logit_rel_err']):.2e} "
                     f"| {float(r['logit_max_abs_err']):.2e} | {float(r['rope_theta']):g} | "
                     f"{r['max_position_embeddings']} |")
    (args.out / "adapters_smollm2.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
