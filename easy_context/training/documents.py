"""The data pipeline of ``train.py``: documents -> tokens -> fixed-length samples -> the samples of each step."""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import Dict, List, Sequence, Union

import torch

from ..assets import austen_texts
from ..loss import IGNORE_INDEX
from ..methods import get_method

__all__ = ["load_documents", "tokenize_documents", "pack_documents", "global_batch_indices", "padding_fraction",
           "warn_padding", "PADDING_WARNING"]

LOCAL_SUFFIXES = (".txt", ".jsonl", ".json", ".arrow", ".parquet")
Documents = Union[List[str], List[List[int]]]


def _is_local(spec: str) -> bool:
    return spec.startswith((".", "/", "~")) or spec.endswith(LOCAL_SUFFIXES) or os.path.exists(spec)


def _from_dataset(ds, text_field: str) -> Documents:
    if "input_ids" in ds.column_names:  # already tokenized (as EasyContext's SlimPajama upsamples are)
        return [list(x) for x in ds["input_ids"]]
    if text_field not in ds.column_names:
        raise ValueError(f"the dataset has no {text_field!r} column (columns: {ds.column_names}): pass --text-field")
    return list(ds[text_field])


def load_documents(spec: str, text_field: str = "text", split: str = "train") -> Documents:
    """Documents from ``spec``: strings, or token-id lists when the source has an ``input_ids`` column.

    ``spec`` is ``"austen"`` (the six novels fetched by ``scripts/setup.sh``, one document each); a local ``.txt``
    file (one document) or folder of ``.txt`` files (one document each); a ``.jsonl``/``.json`` file (one document per
    record, field ``text_field``); a ``.arrow``/``.parquet`` file or a folder written by ``Dataset.save_to_disk``; or
    else the name of a HuggingFace ``datasets`` dataset.
    """
    if spec == "austen":
        return list(austen_texts().values())
    if _is_local(spec):
        path = Path(spec).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"dataset path {spec} does not exist: pass an existing .txt/.jsonl/.arrow/"
                                    "/.parquet file or folder, a HuggingFace dataset name, or 'austen'")
        if path.is_dir() and (path / "dataset_info.json").exists():
            import datasets

            ds = datasets.load_from_disk(str(path))
            return _from_dataset(ds[split] if isinstance(ds, datasets.DatasetDict) else ds, text_field)
        if path.is_dir():
            files = sorted(path.glob("*.txt"))
            if not files:
                raise FileNotFoundError(f"dataset folder {spec} holds no .txt files and is not a saved dataset")
            return [f.read_text(encoding="utf-8") for f in files]
        if path.suffix == ".txt":
            return [path.read_text(encoding="utf-8")]
        if path.suffix in (".jsonl", ".json"):
            with open(path, encoding="utf-8") as f:
                records = [json.loads(line) for line in f if line.strip()]
            if any(text_field not in r for r in records):
                raise ValueError(f"every record of {spec} needs a {text_field!r} field (or pass --text-field)")
            return [r[text_field] for r in records]
        import datasets

        kind = "arrow" if path.suffix == ".arrow" else "parquet"
        return _from_dataset(datasets.load_dataset(kind, data_files=str(path), split="train"), text_field)
    import datasets

    try:
        ds = datasets.load_dataset(spec, split=split)
    except Exception as err:  # noqa: BLE001 - re-raised with the options that would have worked
        raise FileNotFoundError(f"cannot load dataset {spec!r}: it is neither a local path nor a loadable "
                                f"HuggingFace dataset ({type(err).__name__}: {err})") from err
    return _from_dataset(ds, text_field)


def tokenize_documents(docs: Documents, tokenizer) -> List[List[int]]:
    """Token ids of each document (no special tokens added); token-id documents pass through."""
    if docs and not isinstance(docs[0], str):
        return [list(d) for d in docs]
    return tokenizer(list(docs), add_special_tokens=False)["input_ids"]


def pack_documents(token_docs: Sequence[Sequence[int]], seq_length: int, eos_id: int, pad_id: int = 0, *,
                   pack: bool = True, reset_position_ids: bool = False) -> Dict[str, torch.Tensor]:
    """Cut documents into ``(N, seq_length)`` samples with next-token targets.

    Every document is followed by ``eos_id``. With ``pack`` the documents form one stream, cut every
    ``seq_length`` tokens; without it each document is cut on its own. ``target_ids[j]`` is the token after
    ``input_ids[j]``, so the last target of a sample is the first token of the next one. Targets never cross a
    document boundary (the end-of-document token predicts nothing) and the tail of a stream shorter than
    ``seq_length`` is padded with ``pad_id`` inputs and ``-100`` targets.

    ``position_ids`` count ``0..seq_length-1``, or, with ``reset_position_ids``, restart at each document start
    inside a sample (a sample that starts inside a document also starts at 0). Returns ``input_ids``,
    ``target_ids``, ``position_ids`` (int64) and ``doc_start`` (bool, True at the first token of a document).
    """
    if seq_length < 1:
        raise ValueError(f"seq_length must be positive, got {seq_length}")
    docs = [list(d) + [eos_id] for d in token_docs if len(d)]
    if not docs:
        raise ValueError("the dataset has no tokens: every document is empty")
    lengths = torch.tensor([len(d) for d in docs])
    if pack:  # one stream; documents start at the running offsets
        offsets = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)[:-1]])
        streams = [(torch.tensor([t for d in docs for t in d]), offsets)]
    else:
        streams = [(torch.tensor(d), lengths.new_zeros(1)) for d in docs]
    out: Dict[str, List[torch.Tensor]] = {"input_ids": [], "target_ids": [], "position_ids": [], "doc_start": []}
    for tokens, offsets in streams:
        starts = torch.zeros(len(tokens), dtype=torch.bool)
        starts[offsets] = True
        n = -(-len(tokens) // seq_length)
        total = n * seq_length
        pad = lambda x, value: torch.nn.functional.pad(x, (0, total - len(x)), value=value)  # noqa: E731
        inputs = pad(tokens, pad_id)
        targets = pad(tokens[1:].masked_fill(starts[1:], IGNORE_INDEX), IGNORE_INDEX)
        start_flags = pad(starts, False)
        idx = torch.arange(total)
        if reset_position_ids:
            last_start = torch.where(start_flags, idx, torch.zeros_like(idx)).cummax(0).values
            positions = idx - torch.maximum(last_start, idx // seq_length * seq_length)
        else:
            positions = idx % seq_length
        for key, value in zip(out, (inputs, targets, positions, start_flags)):
            out[key].append(value.view(n, seq_length))
    return {key: torch.cat(value) for key, value in out.items()}


def global_batch_indices(step: int, num_samples: int, global_batch: int, seed: int) -> torch.Tensor:
    """Sample indices of optimizer step ``step`` (0-based): ``global_batch`` consecutive entries of a stream of
    per-epoch permutations of ``range(num_samples)``, seeded by ``seed + epoch``.

    A pure function of the step, so the data position of a checkpoint is just its step number.
    """
    positions = step * global_batch + torch.arange(global_batch)
    epochs, within = positions // num_samples, positions % num_samples
    return torch.stack([_epoch_order(num_samples, seed + int(e))[int(i)] for e, i in zip(epochs, within)])


@functools.lru_cache(maxsize=4)
def _epoch_order(num_samples: int, seed: int) -> torch.Tensor:
    """One epoch's permutation (kept: every step of the epoch reads it; a corpus may hold millions of samples)."""
    return torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed))



PADDING_WARNING = 0.10


def _real_tokens(token_docs) -> int:
    """Tokens of the documents, each followed by its end-of-document token."""
    if hasattr(token_docs, "num_real_tokens"):
        return token_docs.num_real_tokens
    return sum(len(d) + 1 for d in token_docs if len(d))


def padding_fraction(token_docs: Sequence[Sequence[int]], num_samples: int, sample_length: int) -> float:
    """The share of the ``num_samples × sample_length`` training tokens that are padding (documents are followed by
    one end-of-document token each, as :func:`pack_documents` does). ``token_docs`` may be a
    :class:`~easy_context.training.corpus.PackedSamples`."""
    real = _real_tokens(token_docs)
    total = num_samples * sample_length
    return max(0.0, 1.0 - real / total) if total else 0.0


def warn_padding(token_docs, num_samples: int, seq_length: int, method=None, sp_size: int = 1,
                 pad_to_multiple: bool = False, prog: str = "train.py") -> float:
    """Print a warning on stderr (main process) when more than 10% of the training tokens are padding: the
    packing's tail and short documents, plus what ``--pad-to-multiple`` adds. Returns the share."""
    length = seq_length
    if pad_to_multiple and method is not None and get_method(method).layout is not None:
        multiple = get_method(method).layout.multiple(sp_size)
        length = -(-seq_length // multiple) * multiple
    share = padding_fraction(token_docs, num_samples, length)
    if share > PADDING_WARNING and os.environ.get("RANK", "0") == "0":
        real = _real_tokens(token_docs)
        hint = (f"lower --seq-length (the data holds {real} tokens)" if num_samples == 1 else
                "pack documents (drop --no-pack), lower --seq-length, or add data")
        print(f"{prog}: warning: {share:.0%} of the training tokens are padding ({real} real tokens in {num_samples} "
              f"sample(s) of {length}): {hint}", file=sys.stderr, flush=True)
    return share

