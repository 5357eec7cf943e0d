"""Needle in a haystack over context lengths × needle depths, for one or more models.

A needle sentence holding a random number ("The special magic number is: 4816023.") is inserted into text from
``--haystack-dir`` (default: the Austen novels) at each depth, on the sentence boundary nearest to it, and the model
is asked for the number. Scoring (``--scoring``, one or both):

* ``forced``: teacher forcing, as EasyContext does. The prompt is followed by the answer prefix and the true answer;
  a trial is correct when the model's argmax at every answer token is that token. The prefill runs
  sequence-parallel over all processes for sequence-parallel methods.
* ``generate``: greedy decoding with a KV cache from the prompt; correct when the answer appears in the output.
  For the plain model and DCA (not for sequence-parallel methods, which have no KV cache).

Examples::

    python eval_needle.py --lengths 2048 4096 8192 16384 --depths 0 0.5 1 -m @plain -m @dca:pretraining_length=8192
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 eval_needle.py -m @zigzag_ring_attn

Every trial is appended to ``<output-dir>/trials.jsonl`` as soon as it is scored; a rerun skips the trials already
there, so an interrupted run resumes. Trials are keyed on content, not on folder names: the model (its config, a
fingerprint of its weights, its tokenizer), its method and options, the dtype, a fingerprint of the haystack text,
the needle settings, and the length, depth and sample. Option names are shared with eval_ppl.py and train.py
(docs/cli.md); EasyContext's spellings (--max_context_length, --depth_interval, --num_samples, --haystack_dir,
--rope_theta, ...) are accepted. The heatmap
(``heatmap.png``: depth × length, accuracy from red to green, one panel per model and scoring) and
``summary.json`` (mean accuracies) cover every matching trial in the file.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from tqdm import tqdm

from easy_context import cli
from easy_context import evaluation as ev
from easy_context.cli import float_range, int_range

MODES = ("forced", "generate")


def parse_args(argv=None):
    defaults = ev.NeedleConfig()
    p = cli.Parser(prog="eval_needle.py", description=__doc__)
    ev.add_common_options(p, min_tokens=1024, max_tokens=8192, tokens_step=1024)
    p.add_argument("--depths", type=float_range(0, 1), nargs="+", help="needle depths in [0, 1] (unset: "
                   "--depth-steps)")
    p.add_argument("--depth-steps", type=int_range(1), default=5, help="evenly spaced depths from 0 to 1")
    p.add_argument("--depth-interval", type=float_range(0, 1, lo_open=True), default=None,
                   help="depths 0, d, 2d, ... 1 (EasyContext's option; overrides --depth-steps)")
    p.add_argument("--haystack-dir", default=None, help="folder of .txt files (unset: the Austen novels)")
    p.add_argument("--needle", default=defaults.needle, help="needle sentence; {answer} is the answer")
    p.add_argument("--question", default=defaults.question, help="question")
    p.add_argument("--answer-prefix", default=defaults.answer_prefix,
                   help="start of the answer, before the answer itself")
    p.add_argument("--intro", default=defaults.intro, help="instruction before the haystack")
    p.add_argument("--answer", default=None,
                   help="fixed expected answer (unset: a random number of --rnd-number-digits digits per trial)")
    p.add_argument("--rnd-number-digits", type=int_range(1, 30), default=defaults.digits,
                   help="digits of the random answer")
    p.add_argument("--distractors", "--num-distractor", type=int_range(0), default=0,
                   help="distractor sentences per prompt")
    p.add_argument("--distractor", default=defaults.distractor,
                   help="distractor sentence with {name} and {number}")
    p.add_argument("--no-chat-template", action="store_true", help="plain text prompt even if the tokenizer has "
                   "a chat template")
    p.add_argument("--seed", type=int_range(0), default=0, help="seed of the random answers and distractor places")
    p.add_argument("--scoring", nargs="+", choices=MODES, default=["forced"],
                   help="forced (teacher-forced exact match) and/or generate (greedy, KV cache)")
    p.add_argument("--max-new-tokens", "--new-tokens", type=int_range(1), default=32,
                   help="generation length for --scoring generate")
    p.add_argument("--output-dir", default="outputs/needle", help="folder of trials.jsonl, heatmap.png and "
                   "summary.json")
    p.add_argument("--heatmap", default=None, help="heatmap file (unset: <output-dir>/heatmap.png)")
    return p.parse_args(argv)


def needle_depths(args):
    if args.depths:
        return args.depths
    if args.depth_interval:
        count = int(round(1 / args.depth_interval))
        return sorted({round(min(1.0, i * args.depth_interval), 6) for i in range(count + 1)} | {1.0})
    return [i / max(1, args.depth_steps - 1) for i in range(args.depth_steps)]


def trial_key(model_key: str, length: int, depth: float, sample: int, config_key: str, haystack: str):
    return (model_key, int(length), round(float(depth), 6), int(sample), config_key, haystack)


def run_trial(model, tokenizer, spec, haystack, length, depth, sample, modes, runtime, max_new_tokens):
    """Score one prompt; returns its record (on every rank that took part)."""
    t0 = time.perf_counter()
    trial = haystack.trial(length, depth, sample)
    record = {"length": length, "depth": depth, "sample": sample, "context_tokens": trial.input_ids.shape[1],
              "needle_depth": round(trial.needle_depth, 4), "answer": trial.answer}
    if "forced" in modes:
        target = trial.input_ids[0, trial.answer_positions]
        pred = ev.forced_answer_predictions(model, spec, trial, runtime, spec.sequence_parallel)
        record["forced_correct"] = int(bool((pred == target).all()))
        record["forced_token_accuracy"] = round(float((pred == target).float().mean()), 4)
        record["forced_prediction"] = tokenizer.decode(pred)
    if "generate" in modes:
        text = ev.generate_answer(model, tokenizer, trial, runtime.device, max_new_tokens)
        record["generate_correct"] = int(trial.answer in text)
        record["generation"] = text
    record["seconds"] = round(time.perf_counter() - t0, 2)
    return record


def main(argv=None) -> int:
    args = parse_args(argv)
    cli.install_error_handler("eval_needle.py", dist_timeout=args.dist_timeout)
    from easy_context.assets import austen_dir, smollm2_path

    with cli.user_errors():
        specs = [ev.parse_model_spec(s, smollm2_path()) for s in (args.models or ["@plain"])]
    if "generate" in args.scoring:
        for spec in specs:
            if spec.sequence_parallel:
                raise cli.UserError(f"{spec.label}: --scoring generate needs a KV cache, which sequence-parallel "
                                    "attention does not have; use --scoring forced, the plain model or dca")
    lengths = ev.check_lengths(args)
    depths = needle_depths(args)
    config = ev.NeedleConfig(needle=args.needle, question=args.question, answer_prefix=args.answer_prefix,
                             intro=args.intro, answer=args.answer, digits=args.rnd_number_digits,
                             distractors=args.distractors, distractor=args.distractor,
                             chat_template=not args.no_chat_template, seed=args.seed)
    if "{answer}" not in config.needle and config.answer is None:
        raise cli.UserError(f"--needle {config.needle!r} has no {{answer}} placeholder, so no trial could be right: "
                            "add one where the random answer goes, or give the expected answer with --answer")
    config_key = config.key()
    out_dir = Path(args.output_dir)
    trials_path = out_dir / "trials.jsonl"
    heatmap_path = Path(args.heatmap) if args.heatmap else out_dir / "heatmap.png"
    with cli.user_errors():
        text = ev.read_text_folder(args.haystack_dir or austen_dir())
    haystack_key = "text:" + ev.result_key(text)

    runtime = ev.init_runtime(cpu=True if args.cpu else None, timeout=args.dist_timeout)
    dtype = ev.resolve_dtype(args.dtype, runtime.device)
    # Every model's key (content, not folder name) and a label unique among the models of this run.
    tokenizers = [ev.load_tokenizer(spec) for spec in specs]
    keys = [ev.result_key(ev.model_identity(spec, tok, dtype=dtype, rope_theta=args.rope_theta))
            for spec, tok in zip(specs, tokenizers)]
    labels = ev.unique_labels([(key, spec.label) for key, spec in zip(keys, specs)])
    previous = ev.read_trials(trials_path)
    done = {trial_key(r.get("key"), r["length"], r["depth"], r["sample"], r.get("config", ""), r.get("haystack"))
            for r in previous if all(f"{m}_correct" in r for m in args.scoring)}
    runtime.barrier()  # every rank has read the file before rank 0 appends to it
    if runtime.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    unique = {}  # the same model twice (same key) runs once
    for spec, key in zip(specs, keys):
        unique.setdefault(key, spec)
    for key, spec in unique.items():
        label = labels[key]
        todo = [(n, d, s) for n in lengths for d in depths for s in range(args.samples)
                if trial_key(key, n, d, s, config_key, haystack_key) not in done]
        skipped = len(lengths) * len(depths) * args.samples - len(todo)
        if runtime.is_main:
            print(f"{label}: {len(todo)} trials to run, {skipped} already in {trials_path}", flush=True)
        if not todo:
            continue
        model, tokenizer = ev.load_model(spec, runtime.device, dtype, rope_theta=args.rope_theta)
        haystack = ev.Haystack(text, tokenizer, config)
        # Sequence-parallel: every rank takes part in every trial. Otherwise: rounds of one trial per rank.
        step = 1 if spec.sequence_parallel else runtime.world_size
        bar = tqdm(total=len(todo), desc=label, unit="trial", disable=not runtime.is_main)
        for start in range(0, len(todo), step):
            mine = start if spec.sequence_parallel else start + runtime.rank
            record = None
            if mine < len(todo):
                record = run_trial(model, tokenizer, spec, haystack, *todo[mine], args.scoring, runtime,
                                   args.max_new_tokens)
                record = {"model": label, "key": key, "path": spec.path, "method": spec.method or "plain",
                          "options": spec.options, "config": config_key, "haystack": haystack_key,
                          "rope_theta": args.rope_theta, **record}
            records = [record] if spec.sequence_parallel else runtime.gather_objects(record)
            if runtime.is_main:
                with trials_path.open("a", encoding="utf-8") as f:
                    for r in filter(None, records):
                        f.write(json.dumps(r) + "\n")
                last = next(r for r in records if r)
                bar.set_postfix(len=last["length"], depth=last["depth"],
                                ok="".join(str(last.get(f"{m}_correct", "-")) for m in args.scoring))
            bar.update(min(step, len(todo) - start))
        bar.close()
        del model
    if runtime.is_main:
        wanted = {key: labels[key] for key in keys}
        records = [dict(r, model=wanted[r["key"]]) for r in ev.read_trials(trials_path)
                   if r.get("key") in wanted and r.get("config") == config_key and r.get("haystack") == haystack_key]
        names = list(dict.fromkeys(wanted.values()))
        means = ev.plot_needle_heatmaps(records, heatmap_path, args.scoring, names)
        summary = {name: {mode: means.get((name, mode)) for mode in args.scoring} for name in names}
        for name, row in summary.items():
            for mode, acc in row.items():
                if acc is not None:
                    print(f"{name} [{mode}] mean accuracy: {acc:.4f}")
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(f"wrote {trials_path}, {heatmap_path} and {out_dir / 'summary.json'}")
    ev.shutdown_runtime()
    return 0


if __name__ == "__main__":
    sys.exit(main())
