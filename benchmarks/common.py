"""What the real-model benchmark scripts share: start-up checks and resumable result files (one CSV row per
finished measurement)."""

from __future__ import annotations

import csv
import sys
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import torch

from easy_context.assets import SETUP_HINT, have_assets


def start_run(args, name: str, fields: Sequence[str]) -> Tuple[Path, List[Dict[str, str]]]:
    """Check the assets, set the thread count and open ``<args.out>/<name>.csv``.

    Returns the CSV path and, with ``args.resume``, the rows already measured (otherwise the file starts afresh with
    its header). Exits with status 2 and the setup command when the model or the text is missing.
    """
    if not have_assets():
        print(f"assets missing: {SETUP_HINT}", file=sys.stderr)
        raise SystemExit(2)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{name}.csv"
    if args.resume and path.exists():
        with path.open() as f:
            return path, list(csv.DictReader(f))
    with path.open("w", newline="") as f:
        csv.DictWriter(f, fields).writeheader()
    return path, []


def append_result(path: Path, fields: Sequence[str], row: Dict[str, object]) -> None:
    """Add one finished measurement, so an interrupted run keeps everything measured so far."""
    with path.open("a", newline="") as f:
        csv.DictWriter(f, fields).writerow(row)


def proc_status(field: str) -> int:
    """A byte count from ``/proc/self/status`` (``VmRSS``: resident now, ``VmHWM``: peak resident); 0 if absent."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _rank_main(rank, world, port, threads, timeout, fn, args, results):
    import datetime
    import os
    import traceback

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    if threads:
        torch.set_num_threads(threads)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout))
        results.put((rank, True, fn(rank, world, *args)))
    except BaseException:  # noqa: BLE001 - every failure goes back to the parent
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_on_ranks(fn, world: int, *args, threads: int = 0, timeout: float = 3600.0, what: str = "") -> list:
    """``[fn(0, world, *args), ..., fn(world - 1, world, *args)]``, each in a fresh process of one gloo group.

    ``fn`` must be a module-level function (the processes are spawned). ``threads`` sets each process's torch
    threads (0: torch's default). A failure on any rank raises here with that rank's traceback; no result within
    ``timeout`` seconds raises ``TimeoutError``. ``what`` names the measurement in those errors.
    """
    import queue
    import socket
    import time

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_rank_main, args=(r, world, port, threads, timeout, fn, args, results), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    out, deadline = {}, time.monotonic() + timeout
    try:
        while len(out) < world:
            try:
                rank, ok, value = results.get(timeout=max(1.0, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(f"{what or fn.__name__}: no result from {world} ranks in {timeout:.0f} s") from None
            if not ok:
                raise RuntimeError(f"{what or fn.__name__}: rank {rank} of {world} failed:\n{value}")
            out[rank] = value
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()
    return [out[r] for r in range(world)]
