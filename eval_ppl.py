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
"""

from __future__ import annotations

import argparse
import sys
import time

from tqdm import tqdm

from easy_context import evaluation as ev


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-m", "--model", action="append", dest="models", metavar="SPEC",
                        help="model spec [PATH][@METHOD[:KEY=VALUE,...]], repeatable; METHOD is plain (default), a "
                        "sequence-parallel method (zigzag_ring_attn, ring_attn, ...) or dca with its options, e.g. "
                        "@dca:pretraining_length=8192. Default: the embedded SmolLM2-135M, plain")
    parser.add_argument("--min-tokens", type=int, default=2048, help="shortest context length (default 2048)")
    parser.add_argument("--max-tokens", type=int, default=8192, help="longest context length (default 8192)")
    parser.add_argument("--tokens-step", type=int, default=2048, help="length step (default 2048)")
    parser.add_argument("--lengths", type=int, nargs="+", help="explicit lengths (overrides min/max/step)")
    parser.add_argument("--samples", type=int, default=1, help="sequences per length (default 1)")
    parser.add_argument("--dataset", default=None,
                        help="folder of .txt files, a datasets save_to_disk folder or a hub dataset name (default: "
                        "the Austen novels of easy_context.assets)")
    parser.add_argument("--split", default="test", help="dataset split for hub datasets (default test)")
    parser.add_argument("--feature", default="input_ids",
                        help="dataset column with token ids or text (default input_ids)")
    parser.add_argument("--output", default="outputs/ppl.csv", help="CSV file (default outputs/ppl.csv)")
    parser.add_argument("--plot", default=None,
                        help="plot file, .png/.pdf/.svg (default: the CSV path with .png)")
    parser.add_argument("--no-plot", action="store_true", help="write no plot")
    parser.add_argument("--pretraining-length", type=int, default=None,
                        help="draw the models' trained context length as a vertical line")
    parser.add_argument("--skip-done", action="store_true",
                        help="skip the lengths a model already has in the CSV (resume an interrupted run)")
    parser.add_argument("--chunk-size", type=int, default=4096,
                        help="tokens per logits chunk of the NLL computation (default 4096)")
    parser.add_argument("--dtype", default="auto", help="auto (float32 on CPU, bfloat16 on GPU), float32, bfloat16")
    parser.add_argument("--cpu", action="store_true", help="run on CPU even when CUDA is available")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from easy_context.assets import smollm2_path

    specs = [ev.parse_model_spec(s, smollm2_path()) for s in (args.models or ["@plain"])]
    lengths = ev.token_lengths(args.min_tokens, args.max_tokens, args.tokens_step, args.lengths)
    runtime = ev.init_runtime(cpu=True if args.cpu else None)
    dtype = ev.resolve_dtype(args.dtype, runtime.device)
    table = ev.read_ppl_csv(args.output)  # every rank reads it before rank 0 rewrites it
    runtime.barrier()
    samples_cache = {}
    try:
        for spec in specs:
            todo = [n for n in lengths if not (args.skip_done and n in table.get(spec.label, {}))]
            if not todo:
                if runtime.is_main:
                    print(f"{spec.label}: every length is already in {args.output}", flush=True)
                continue
            t0 = time.perf_counter()
            model, tokenizer = ev.load_model(spec, runtime.device, dtype)
            key = getattr(tokenizer, "name_or_path", spec.path)
            if key not in samples_cache:  # models sharing a tokenizer score the same tokens
                samples_cache[key] = ev.load_token_samples(args.dataset, tokenizer, args.samples, max(lengths) + 1,
                                                           split=args.split, feature=args.feature)
            samples = samples_cache[key]
            mode = f"sequence-parallel over {runtime.world_size}" if spec.sequence_parallel else (
                f"samples spread over {runtime.world_size}" if runtime.world_size > 1 else "single process")

            def record(length, ppl, label=spec.label):  # the CSV grows as each length finishes
                table.setdefault(label, {})[length] = ppl
                if runtime.is_main:
                    ev.write_ppl_csv(args.output, table)

            with tqdm(total=len(todo) * len(samples), desc=spec.label, disable=not runtime.is_main,
                      unit="seq") as bar:
                ppl = ev.perplexity_by_length(model, spec, samples, todo, runtime, args.chunk_size, progress=bar,
                                              on_result=record)
            del model
            if runtime.is_main:
                cells = "  ".join(f"{n}: {p:.4f}" for n, p in ppl.items())
                print(f"{spec.label} ({mode}, {time.perf_counter() - t0:.1f} s)  {cells}", flush=True)
        if runtime.is_main:
            print(f"wrote {args.output}")
            if not args.no_plot:
                plot = args.plot or str(args.output).rsplit(".", 1)[0] + ".png"
                ev.plot_perplexity(table, plot, pretraining_length=args.pretraining_length)
                print(f"wrote {plot}")
    except BaseException:
        ev.shutdown_runtime(wait=False)
        raise
    ev.shutdown_runtime()
    return 0


if __name__ == "__main__":
    sys.exit(main())
