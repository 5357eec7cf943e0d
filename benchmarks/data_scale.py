"""train.py on a corpus far larger than memory: time to the first step and peak resident memory, against the Austen
novels.

Writes a pre-tokenized dataset of ``--tokens`` random token ids (an ``input_ids`` column of documents of 1 to 8,191
tokens, int32, written with ``datasets`` ``save_to_disk`` in chunks, so making it needs little memory either), then
runs ``python train.py --model tiny --seq-length 2048 --steps 2`` (one process) on it and on ``--dataset austen``,
each twice: the first run on a corpus computes its content fingerprint (the six novels are also tokenized into the
cache then), the second finds both remembered. Prints a markdown table; the dataset is deleted afterwards unless
``--keep``::

    nice python benchmarks/data_scale.py                  # 500M tokens (about 2 GB in /tmp)
    nice python benchmarks/data_scale.py --quick          # 20M tokens
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
CHUNK_TOKENS = 25_000_000  # tokens generated and written at a time


def make_dataset(out: Path, tokens: int, vocab: int = 49152, seed: int = 0) -> int:
    """A ``save_to_disk`` folder of about ``tokens`` random token ids; returns the exact count."""
    import datasets
    import pyarrow as pa

    rng = np.random.default_rng(seed)
    stream = out.with_name(out.name + ".stream.arrow")
    schema = pa.schema({"input_ids": pa.list_(pa.int32())})
    written = 0
    with pa.OSFile(str(stream), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        while written < tokens:
            want = min(CHUNK_TOKENS, tokens - written)
            lengths = rng.integers(1, 8192, size=max(1, want // 4096 + 1))
            lengths = lengths[np.cumsum(lengths) <= want] if lengths.sum() > want else lengths
            if not len(lengths):
                lengths = np.array([want])
            offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
            values = pa.array(rng.integers(0, vocab, size=int(offsets[-1]), dtype=np.int32))
            writer.write_table(pa.table({"input_ids": pa.ListArray.from_arrays(pa.array(offsets), values)}))
            written += int(offsets[-1])
    datasets.Dataset.from_file(str(stream)).save_to_disk(str(out), max_shard_size="500MB")
    stream.unlink()
    return written


def measure(dataset: str, work: Path, name: str, env: dict, seq_length: int, steps: int) -> dict:
    """Seconds from launch to the start of the first step, and the peak resident memory of ``train.py``."""
    out = work / name
    log = out / "log.jsonl"
    cmd = [sys.executable, "train.py", "--model", "tiny", "--seq-length", str(seq_length), "--steps", str(steps),
           "--dataset", dataset, "--output-dir", str(out)]
    rss_file = work / f"{name}.rss"
    if shutil.which("time") or Path("/usr/bin/time").exists():  # its child's own peak RSS, as the kernel counts it
        cmd = ["/usr/bin/time", "-f", "%M", "-o", str(rss_file)] + cmd
    started = time.perf_counter()
    with open(work / f"{name}.out", "w") as sink:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT, text=True)
    first_step, hwm = None, 0
    while proc.poll() is None:
        if first_step is None and log.exists() and log.read_text().strip():
            seen = time.perf_counter() - started  # the first step ended about now; it began its length earlier
            first_step = seen - json.loads(log.read_text().splitlines()[0])["seconds"]
        hwm = max(hwm, _vm_hwm(proc.pid))
        time.sleep(0.05)
    output = (work / f"{name}.out").read_text()
    if proc.returncode:
        raise SystemExit(f"train.py failed on {dataset}:\n{output[-3000:]}")
    if first_step is None:  # it finished between two looks at the log
        first_step = time.perf_counter() - started - json.loads(log.read_text().splitlines()[0])["seconds"]
    samples = next((line for line in output.splitlines() if line.startswith("data: ")), "")
    return dict(name=name, first_step_s=first_step, total_s=time.perf_counter() - started, samples=samples,
                peak_rss=int(rss_file.read_text().split()[-1]) * 1024 if rss_file.exists() else hwm)


def _vm_hwm(pid: int) -> int:
    """Peak resident bytes of ``pid`` and its children so far (VmHWM), 0 once gone."""
    total = 0
    try:
        import psutil

        procs = [psutil.Process(pid)] + psutil.Process(pid).children(recursive=True)
    except Exception:  # noqa: BLE001 - no psutil, or the process is gone
        return 0
    for p in procs:
        try:
            with open(f"/proc/{p.pid}/status") as f:
                total = max(total, next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM")))
        except (OSError, StopIteration):
            pass
    return total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=500_000_000, help="size of the synthetic corpus")
    parser.add_argument("--quick", action="store_true", help="20M tokens")
    parser.add_argument("--dir", default=None, help="where the corpus is written (default: a new folder in /tmp)")
    parser.add_argument("--seq-length", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--keep", action="store_true", help="keep the corpus")
    parser.add_argument("--output-file", default=None, help="also write the table here")
    args = parser.parse_args()
    tokens = 20_000_000 if args.quick else args.tokens
    work = Path(args.dir or tempfile.mkdtemp(prefix="easy_context_data_scale_"))
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore",
               EASY_CONTEXT_CACHE=str(work / "cache"))  # a cache of its own: the first runs are cold
    env.pop("ACCELERATE_USE_CPU", None)
    try:
        corpus = work / "corpus"
        t0 = time.perf_counter()
        count = make_dataset(corpus, tokens)
        size = sum(f.stat().st_size for f in corpus.iterdir())
        print(f"wrote {count:,} tokens ({size / 2**30:.2f} GiB) to {corpus} in {time.perf_counter() - t0:.0f} s",
              flush=True)
        rows = []
        for label, spec, tok in (("Austen novels", "austen", 995_507), ("synthetic, pre-tokenized", str(corpus),
                                                                           count)):
            for run in ("first", "again"):
                result = measure(spec, work, f"{spec == 'austen' and 'austen' or 'big'}-{run}", env,
                                 args.seq_length, args.steps)
                rows.append((label, tok, run, result))
                print(f"{label} ({run}): first step at {result['first_step_s']:.1f} s, peak RSS "
                      f"{result['peak_rss'] / 2**20:.0f} MiB; {result['samples']}", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    base = {run: r["peak_rss"] for label, _, run, r in rows if label == "Austen novels"}
    lines = ["| corpus | tokens | run | time to first step | peak RSS | RSS above Austen |",
             "| --- | ---: | --- | ---: | ---: | ---: |"]
    for label, tok, run, r in rows:
        lines.append(f"| {label} | {tok / 1e6:,.1f}M | {run} | {r['first_step_s']:.1f} s | "
                     f"{r['peak_rss'] / 2**20:,.0f} MiB | {(r['peak_rss'] - base[run]) / 2**20:+,.0f} MiB |")
    table = "\n".join(lines)
    print("\n" + table)
    if args.output_file:
        Path(args.output_file).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output_file).write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
