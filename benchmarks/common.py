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
