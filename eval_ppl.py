"""Perplexity by context length for one or more models, each with its own attention method.

One process (the default)::

    python eval_ppl.py --min-tokens 2048 --max-tokens 16384 --tokens-step 2048 \
        -m @plain -m @dca:pretraining_length=8192

Several processes; sequence-parallel models shard every sequence over all of them, other models spread the samples::

    accelerate launch --num_processes 2 eval_ppl.py -m @zigzag_ring_attn --lengths 1024 2048
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 eval_ppl.py ...   # on CPU

A model is ``[PATH][@METHOD[:KEY=VALUE,...]]`` (the default PATH is the embedded SmolLM2-135M). Each length L scores
the first L+1 tokens of every sample (L predictions); the perplexity is exp(sum of NLL / number of tokens) over all
samples and ranks. Results go to a CSV (one row per model, one column per length; rows of models not in this run
are kept, so runs add up) and a line plot of every row in the CSV.

Results are keyed on content, not on folder names: a row is a model (its config, a fingerprint of its weights, its
tokenizer), its method and options, the dtype and the dataset; each cell records the fingerprint of the tokens it
scored. ``--resume`` reuses a cell only when all of these match. The keys live in ``<csv stem>.results.jsonl``.
Option names are shared with eval_needle.py, train.py and benchmarks/ (docs/cli.md); EasyContext's spellings
(--output-file, -d/-s/-f, --num_samples, underscores) are accepted.
"""

from __future__ import annotations

import datetime
import sys
import time

from tqdm import tqdm

from easy_context import cli
from easy_context import evaluation as ev
from easy_context.cli import int_range


def parse_args(argv=None):
    parser = cli.Parser(prog="eval_ppl.py", description=__doc__)
    ev.add_common_options(parser, min_tokens=2048, max_tokens=8192, tokens_step=2048)
    parser.add_argument("-d", "--dataset", "--tokenized", default=None,
                        help="folder of .txt files, a datasets save_to_disk folder or a hub dataset name (unset: "
                        "the Austen novels of easy_context.assets)")
    parser.add_argument("-s", "--subset", default=None, help="configuration of a hub dataset")
    parser.add_argument("--split", default="test", help="dataset split for hub datasets")
    parser.add_argument("-f", "--feature", default="input_ids", help="dataset column with token ids or text")
    parser.add_argument("--output-file", "--output", default="outputs/ppl.csv",
                        help="CSV file; its keys go to <stem>.results.jsonl beside it")
    parser.add_argument("--plot", default=None, help="plot file, .png/.pdf/.svg (unset: the CSV path with .png)")
    parser.add_argument("--no-plot", action="store_true", help="write no plot")
    parser.add_argument("--pretraining-length", type=int_range(1), default=None,
                        help="draw the models' trained context length as a vertical line")
    parser.add_argument("--resume", "--skip-done", action="store_true",
                        help="reuse the results already measured for the same model, method, dtype, data and "
                        "length (an interrupted run continues)")
    parser.add_argument("--loss-chunk-size", "--chunk-size", type=int_range(1), default=4096,
                        help="tokens per logits chunk of the NLL computation")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    cli.install_error_handler("eval_ppl.py", dist_timeout=args.dist_timeout)
    from easy_context.assets import smollm2_path

    with cli.user_errors():
        specs = [ev.parse_model_spec(s, smollm2_path()) for s in (args.models or ["@plain"])]
    lengths = ev.check_lengths(args)
    runtime = ev.init_runtime(cpu=True if args.cpu else None, timeout=args.dist_timeout)
    dtype = ev.resolve_dtype(args.dtype, runtime.device)
    results = ev.PplResults(args.output_file, main=runtime.is_main)
    runtime.barrier()  # every rank has read the results before rank 0 adds to them
    for note in results.notes:
        print(f"note: {note}", flush=True)
    samples_cache, seen = {}, set()
    for spec in specs:
        t0 = time.perf_counter()
        tokenizer = ev.load_tokenizer(spec)
        tok_key = ev.tokenizer_fingerprint(tokenizer)
        if tok_key not in samples_cache:  # models sharing a tokenizer score the same tokens
            samples_cache[tok_key] = ev.load_token_samples(args.dataset, tokenizer, args.samples, max(lengths) + 1,
                                                           split=args.split, feature=args.feature,
                                                           subset=args.subset)
        samples = samples_cache[tok_key]
        identity = ev.model_identity(spec, tokenizer, dtype=dtype, rope_theta=args.rope_theta)
        key = ev.result_key(identity, samples.source, len(samples))
        if key in seen:  # the same model twice (same content): measured once
            continue
        seen.add(key)
        data = {n: ev.tokens_fingerprint(samples, n + 1) for n in lengths}
        todo = [n for n in lengths if not (args.resume and results.lookup(key, n, data[n]) is not None)]
        if not todo:
            if runtime.is_main:
                print(f"{spec.label}: every length is already in {results.path} (same model, data and options)",
                      flush=True)
            continue
        model, _ = ev.load_model(spec, runtime.device, dtype, rope_theta=args.rope_theta)
        mode = f"sequence-parallel over {runtime.world_size}" if spec.sequence_parallel else (
            f"samples spread over {runtime.world_size}" if runtime.world_size > 1 else "single process")

        def record(length, ppl, spec=spec, key=key, identity=identity):  # the CSV grows as each length finishes
            results.add({"key": key, "label": spec.label, "length": length, "ppl": ppl, "data": data[length],
                         "path": spec.path, "model": identity, "dataset": samples.source, "samples": len(samples),
                         "time": datetime.datetime.now().isoformat(timespec="seconds")}, write=runtime.is_main)
            if runtime.is_main:
                results.write_csv()

        with tqdm(total=len(todo) * len(samples), desc=spec.label, disable=not runtime.is_main, unit="seq") as bar:
            ppl = ev.perplexity_by_length(model, spec, samples, todo, runtime, args.loss_chunk_size, progress=bar,
                                          on_result=record)
        del model
        if runtime.is_main:
            cells = "  ".join(f"{n}: {p:.4f}" for n, p in ppl.items())
            print(f"{results.labels()[key]} ({mode}, {time.perf_counter() - t0:.1f} s)  {cells}", flush=True)
    if runtime.is_main:
        table = results.write_csv()
        print(f"wrote {args.output_file}")
        if not args.no_plot and table:
            plot = args.plot or str(args.output_file).rsplit(".", 1)[0] + ".png"
            ev.plot_perplexity(table, plot, pretraining_length=args.pretraining_length)
            print(f"wrote {plot}")
    ev.shutdown_runtime()
    return 0


if __name__ == "__main__":
    sys.exit(main())
