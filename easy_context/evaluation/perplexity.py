"""Perplexity by context length.

:func:`local_nll` computes this rank's NLL sum and token count from the decoder's hidden states in chunks (no ``tokens
× vocab`` logits); the callers all-reduce sums and counts, so the perplexity is the token-weighted mean over every
token of every sample, exactly as one process computes it. :class:`PplResults` keeps results keyed on content, and
:func:`plot_perplexity` draws them.
"""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..comm import all_reduce_sum
from ..data import prepare_seq_parallel_inputs
from ..loss import chunked_cross_entropy_sum
from .common import ModelSpec, Runtime, decoder_and_head, pyplot
from .results import read_trials, unique_labels

__all__ = ["local_nll", "perplexity_by_length", "read_ppl_csv", "write_ppl_csv", "PplResults", "plot_perplexity"]

@torch.no_grad()
def local_nll(model, spec: ModelSpec, input_ids: torch.Tensor, target_ids: torch.Tensor, runtime: Runtime,
              chunk_size: int = 4096) -> Tuple[torch.Tensor, torch.Tensor]:
    """This rank's ``(NLL sum, valid target count)`` for one ``(1, S)`` sequence, both float64.

    Under a sequence-parallel method every rank must call it with the same sequence and holds a shard of the
    tokens; otherwise the whole sequence runs here. Logits exist for ``chunk_size`` tokens at a time. Sum the results
    over ranks (:func:`easy_context.comm.all_reduce_sum`) for the exact token-weighted total.
    """
    decoder, head = decoder_and_head(model)
    if spec.sequence_parallel:
        local = prepare_seq_parallel_inputs(spec.method, input_ids, None, target_ids, runtime.rank,
                                            runtime.world_size, runtime.device, pad=True)
        ids, pos, targets = local["local_input_ids"], local["local_position_ids"], local["local_target_ids"]
    else:
        ids, targets = input_ids.to(runtime.device), target_ids.to(runtime.device)
        pos = torch.arange(ids.shape[1], device=runtime.device).unsqueeze(0)
    hidden = decoder(input_ids=ids, position_ids=pos, use_cache=False).last_hidden_state
    total, count = chunked_cross_entropy_sum(hidden, head.weight, targets, bias=getattr(head, "bias", None),
                                             chunk_size=chunk_size)
    return total.double(), count.double()


def perplexity_by_length(model, spec: ModelSpec, samples: Sequence[torch.Tensor], lengths: Sequence[int],
                         runtime: Runtime, chunk_size: int = 4096, progress=None,
                         on_result=None) -> Dict[int, float]:
    """``{length: perplexity}``: for each length L, every sample's first L tokens predict their next token.

    Each sample contributes L predictions (inputs ``x[:L]``, targets ``x[1:L+1]``), so samples must hold at least
    ``max(lengths) + 1`` tokens. Sequence-parallel models run every sample on all ranks; other models spread the
    samples over the ranks. Either way NLL sums and counts are all-reduced before dividing. ``on_result(length,
    ppl)`` is called as each length finishes (on every rank).
    """
    results = {}
    for length in lengths:
        total = torch.zeros(2, dtype=torch.float64)
        for i, sample in enumerate(samples):
            if sample.numel() < length + 1:
                raise ValueError(f"sample {i} has {sample.numel()} tokens; length {length} needs {length + 1}")
            if spec.sequence_parallel or i % runtime.world_size == runtime.rank:
                x = sample[: length + 1].unsqueeze(0)
                nll, count = local_nll(model, spec, x[:, :-1], x[:, 1:], runtime, chunk_size)
                total += torch.stack([nll.cpu(), count.cpu()])
            if progress is not None:
                progress.update(1)
        nll, count = all_reduce_sum(total.to(runtime.device)).tolist() if runtime.world_size > 1 else total.tolist()
        results[length] = math.exp(nll / count)
        if on_result is not None:
            on_result(length, results[length])
    return results


def read_ppl_csv(path) -> Dict[str, Dict[int, float]]:
    """``{model label: {length: perplexity}}`` from a CSV written by :func:`write_ppl_csv` (empty if missing)."""
    path = Path(path)
    if not path.is_file():
        return {}
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        return {}
    lengths = [int(x) for x in rows[0][1:]]
    table = {}
    for row in rows[1:]:
        if row:
            table[row[0]] = {n: float(v) for n, v in zip(lengths, row[1:]) if v != ""}
    return table


def write_ppl_csv(path, table: Dict[str, Dict[int, float]]) -> None:
    """One row per model, one column per length (EasyContext's layout); a missing length is an empty cell."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lengths = sorted({n for row in table.values() for n in row})
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["model", *lengths])
        for label, row in table.items():
            writer.writerow([label, *[f"{row[n]:.6f}" if n in row else "" for n in lengths]])


class PplResults:
    """Perplexity results keyed on content: ``<csv stem>.results.jsonl`` next to the CSV holds one record per model
    key and length (with the fingerprint of the tokens scored), and the CSV is rendered from it.

    A model key (:func:`~easy_context.evaluation.common.model_identity` + the dataset's source fingerprint + the
    number of samples) decides the row; a cell is reused by ``--resume`` only when the tokens scored at that length are
    the same. Rows sharing a folder name get unique labels (``name#key``). A CSV written before keys existed is kept
    as ``<stem>.legacy.csv``.
    """

    def __init__(self, csv_path, *, main: bool = True):
        self.csv = Path(csv_path)
        self.path = self.csv.with_name(self.csv.stem + ".results.jsonl")
        self.notes: List[str] = []
        if main and self.csv.exists() and not self.path.exists():
            legacy = self.csv.with_name(self.csv.stem + ".legacy.csv")
            os.replace(self.csv, legacy)
            self.notes.append(f"{self.csv} was written without result keys: kept as {legacy}")
        self.records = read_trials(self.path)

    def lookup(self, key: str, length: int, data: str) -> Optional[float]:
        """The perplexity already measured for this model key, length and tokens, if any."""
        found = [r for r in self.records if r.get("key") == key and r.get("length") == length
                 and r.get("data") == data]
        return found[-1]["ppl"] if found else None

    def add(self, record: dict, write: bool = True) -> None:
        """Record one result (every rank keeps it in memory; ``write`` on the main process appends it)."""
        self.records.append(record)
        if write:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def labels(self) -> Dict[str, str]:
        latest = {r["key"]: r.get("label", r["key"]) for r in self.records if "key" in r}
        return unique_labels(list(latest.items()))

    def table(self) -> Dict[str, Dict[int, float]]:
        """``{unique label: {length: perplexity}}``, rows in order of first appearance, latest result per cell."""
        labels, rows = self.labels(), {}
        for r in self.records:
            if "key" in r:
                rows.setdefault(labels[r["key"]], {})[int(r["length"])] = float(r["ppl"])
        return rows

    def write_csv(self) -> Dict[str, Dict[int, float]]:
        table = self.table()
        write_ppl_csv(self.csv, table)
        return table

def plot_perplexity(table: Dict[str, Dict[int, float]], path, title: str = "Perplexity by context length",
                    pretraining_length: Optional[int] = None) -> None:
    """Line plot of perplexity against context length, one line per model (log scale when the values span more
    than 3×); PNG, PDF or SVG by the file suffix."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for label, row in table.items():
        lengths = sorted(row)
        ax.plot(lengths, [row[n] for n in lengths], marker="o", label=label)
    if pretraining_length:
        ax.axvline(pretraining_length, color="grey", linestyle=":", label=f"trained length ({pretraining_length})")
    values = [v for row in table.values() for v in row.values()]
    if values and max(values) > 3 * min(values):  # log scale only when the curves span a wide range
        from matplotlib.ticker import FuncFormatter, NullFormatter

        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}") if max(values) < 10 * min(values)
                                     else NullFormatter())
        ax.set_ylabel("perplexity (log scale)")
    else:
        ax.set_ylabel("perplexity")
    lengths = sorted({n for row in table.values() for n in row})
    if len(lengths) <= 16:
        ax.set_xticks(lengths, [f"{n // 1024}K" if n % 1024 == 0 else str(n) for n in lengths])
    ax.set_xlabel("context length (tokens)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
