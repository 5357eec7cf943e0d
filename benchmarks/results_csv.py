"""Resumable result files for the benchmark scripts: one CSV row per finished measurement."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Dict, List, Sequence


def open_results(path: Path, fields: Sequence[str], resume: bool) -> List[Dict[str, str]]:
    """The rows already in ``path`` when resuming; otherwise start ``path`` afresh with its header."""
    if resume and path.exists():
        with path.open() as f:
            return list(csv.DictReader(f))
    with path.open("w", newline="") as f:
        csv.DictWriter(f, fields).writeheader()
    return []


def append_result(path: Path, fields: Sequence[str], row: Dict[str, object]) -> None:
    """Add one finished measurement, so an interrupted run keeps everything measured so far."""
    with path.open("a", newline="") as f:
        csv.DictWriter(f, fields).writerow(row)
