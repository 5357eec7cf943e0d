"""Corpora of any size: documents of token ids on disk, and the samples of a step read when the step needs them.

``train.py`` never holds the corpus in memory:

* **Pre-tokenized datasets** (an ``input_ids`` column: a ``save_to_disk`` folder, an ``.arrow`` file) are read in
  place, zero-copy: the Arrow files are memory-mapped and only the list offsets (one integer per document) are
  read up front. A ``.parquet`` file or a HuggingFace hub name goes through ``datasets``' own Arrow cache first.
* **Text** (``austen``, ``.txt``, ``.jsonl``, a ``text`` column) is tokenized once into a *token store* in the cache
  (``$EASY_CONTEXT_CACHE``, else ``$XDG_CACHE_HOME/easy_context`` or ``~/.cache/easy_context``), keyed by the
  tokenizer and the source's content: a changed source or another tokenizer is tokenized again, an unchanged one
  is opened at once. ``python -m easy_context.training prepare`` writes a store ahead of training (see :func:`main`).
* :class:`PackedSamples` cuts the documents into fixed-length samples exactly as
  :func:`~easy_context.training.documents.pack_documents` does, but locates a sample's tokens from the document
  offsets (binary search) and reads them from the memory-mapped tokens only when the sample is asked for.

A token store is a folder of three files, written into a temporary folder and renamed into place, so a reader
sees a whole store or none:

* ``tokens.bin``: the tokens of every non-empty document back to back, ``uint16`` (vocabularies up to 65,536) or
  ``uint32``;
* ``offsets.npy``: ``int64``, one more than the documents: document ``d`` is ``tokens[offsets[d]:offsets[d + 1]]``;
* ``meta.json``: the format, dtype, counts, and what the store was made from (source and tokenizer fingerprints).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from array import array
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence

import numpy as np
import torch

from .. import cli
from ..assets import austen_texts
from ..loss import IGNORE_INDEX
from .model import model_path

__all__ = ["TokenDocuments", "PackedSamples", "open_documents", "open_samples", "open_store", "write_store",
           "tokenizer_fingerprint", "cache_root", "is_store", "check_dataset", "STORE_FORMAT"]

STORE_FORMAT = "easy_context.token_store"
STORE_VERSION = 1
_LOCAL_SUFFIXES = (".txt", ".jsonl", ".json", ".arrow", ".parquet")
_TEXT_BATCH = 256  # documents per tokenizer call


# ---------------------------------------------------------------------------------------------------- documents


class TokenDocuments:
    """Non-empty documents of token ids, read in place.

    ``segments`` are flat token arrays (memory-mapped: nothing is read until indexed); document ``d`` is
    ``lengths[d]`` tokens starting at ``starts[d]`` in the concatenation of the segments. ``fingerprint`` identifies
    the content (source and tokenizer), not the place it is read from.
    """

    def __init__(self, segments: Sequence[np.ndarray], lengths: np.ndarray, starts: np.ndarray, fingerprint: str,
                 description: str = ""):
        keep = lengths > 0  # empty documents are dropped, as pack_documents drops them
        self.segments = list(segments)
        self.lengths = np.ascontiguousarray(lengths[keep], dtype=np.int64)
        self.starts = np.ascontiguousarray(starts[keep], dtype=np.int64)
        self.bounds = np.cumsum([0] + [len(s) for s in self.segments], dtype=np.int64)
        self.fingerprint = fingerprint
        self.description = description

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())

    def take(self, index: np.ndarray) -> np.ndarray:
        """The tokens at flat positions ``index`` (int64), reading only those."""
        if len(self.segments) == 1:
            return np.asarray(self.segments[0][index], dtype=np.int64)
        out = np.empty(len(index), dtype=np.int64)
        seg = np.searchsorted(self.bounds, index, side="right") - 1
        for s in np.unique(seg):
            mask = seg == s
            out[mask] = self.segments[s][index[mask] - self.bounds[s]]
        return out

    def document(self, d: int) -> np.ndarray:
        return self.take(self.starts[d] + np.arange(self.lengths[d]))


# ---------------------------------------------------------------------------------------------------- samples


class _Column:
    """``samples[key]``: ``len()`` and ``[rows]`` as on a ``(num_samples, seq_length)`` tensor, read on demand."""

    def __init__(self, samples: "PackedSamples", key: str):
        self.samples, self.key = samples, key

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, rows):
        return self.samples.rows(rows)[self.key]


class PackedSamples:
    """The samples :func:`~easy_context.training.documents.pack_documents` would make from ``docs``, read lazily.

    ``samples["input_ids"][rows]`` (also ``target_ids``, ``position_ids``, ``doc_start``) reads just ``rows``;
    ``samples.rows(rows)`` gives all four. Up front it holds a few integers per document (the offsets), never the
    tokens. ``fingerprint`` changes with the content and with every option that changes a sample.
    """

    KEYS = ("input_ids", "target_ids", "position_ids", "doc_start")

    def __init__(self, docs: TokenDocuments, seq_length: int, eos_id: int, pad_id: int = 0, *, pack: bool = True,
                 reset_position_ids: bool = False):
        if seq_length < 1:
            raise ValueError(f"seq_length must be positive, got {seq_length}")
        if len(docs) == 0:
            raise ValueError("the dataset has no tokens: every document is empty")
        self.docs, self.seq_length, self.eos_id, self.pad_id = docs, seq_length, eos_id, pad_id
        self.pack, self.reset_position_ids = pack, reset_position_ids
        with_eos = docs.lengths + 1  # every document is followed by the end-of-document token
        self.num_real_tokens = int(with_eos.sum())
        if pack:  # one stream; document d starts at stream_starts[d]
            self.stream_starts = np.concatenate([[0], np.cumsum(with_eos)[:-1]]).astype(np.int64)
            self._num = -(-self.num_real_tokens // seq_length)
        else:  # each document its own stream; its samples start at sample_starts[d]
            self.sample_starts = np.concatenate([[0], np.cumsum(-(-with_eos // seq_length))]).astype(np.int64)
            self._num = int(self.sample_starts[-1])
        options = dict(docs=docs.fingerprint, seq_length=seq_length, eos=eos_id, pad=pad_id, pack=pack,
                       reset_position_ids=reset_position_ids)
        self.fingerprint = _digest(json.dumps(options, sort_keys=True).encode())
        self._last = (None, None)

    def __len__(self) -> int:
        return self._num

    def __getitem__(self, key: str) -> _Column:
        if key not in self.KEYS:
            raise KeyError(key)
        return _Column(self, key)

    def keys(self):
        return self.KEYS

    def rows(self, rows) -> Dict[str, torch.Tensor]:
        """The samples ``rows`` (an index, a slice, or a sequence/tensor of indices) as tensors."""
        single = isinstance(rows, (int, np.integer)) or (torch.is_tensor(rows) and rows.dim() == 0)
        if isinstance(rows, slice):
            index = np.arange(self._num)[rows]
        else:
            index = np.atleast_1d(np.asarray(rows.cpu() if torch.is_tensor(rows) else rows, dtype=np.int64))
        key = index.tobytes()
        if self._last[0] != key:  # the step count and each micro-step read the same rows
            index = np.where(index < 0, index + self._num, index)
            if len(index) and (index.min() < 0 or index.max() >= self._num):
                raise IndexError(f"sample index out of range (there are {self._num} samples)")
            parts = [self._sample(int(r)) for r in index]
            out = {k: torch.from_numpy(np.stack([p[i] for p in parts]) if parts else
                                       np.zeros((0, self.seq_length), np.bool_ if k == "doc_start" else np.int64))
                   for i, k in enumerate(self.KEYS)}
            self._last = (key, out)
        out = self._last[1]  # copies: a caller may change what it is given
        return {k: (v[0] if single else v).clone() for k, v in out.items()}

    def _sample(self, r: int):
        S = self.seq_length
        if self.pack:
            p0, starts, lengths, raw = r * S, self.stream_starts, self.docs.lengths, self.docs.starts
            total = self.num_real_tokens
        else:  # document d alone, from its c-th sample on
            d = int(np.searchsorted(self.sample_starts, r, side="right")) - 1
            p0 = (r - int(self.sample_starts[d])) * S
            starts, lengths, raw = np.zeros(1, np.int64), self.docs.lengths[d:d + 1], self.docs.starts[d:d + 1]
            total = int(lengths[0]) + 1
        p = p0 + np.arange(S + 1, dtype=np.int64)  # the sample's stream positions and the one after
        d = np.searchsorted(starts, p, side="right") - 1
        j = p - starts[d]  # position within the document
        valid = p < total
        eos = valid & (j == lengths[d])
        real = valid & ~eos
        tokens = np.full(S + 1, self.pad_id, dtype=np.int64)
        tokens[eos] = self.eos_id
        tokens[real] = self.docs.take(raw[d[real]] + j[real])
        start = valid & (j == 0)
        targets = np.where(valid[1:] & ~start[1:], tokens[1:], IGNORE_INDEX)
        if self.reset_position_ids:  # restart at each document start; a sample starting inside one starts at 0
            positions = p[:S] - np.maximum(starts[d[:S]], p0)
        else:
            positions = np.arange(S, dtype=np.int64)
        return tokens[:S], targets, positions, start[:S]

    def to_dict(self) -> Dict[str, torch.Tensor]:
        """Every sample in memory (small corpora and tests only)."""
        return self.rows(slice(None))


# ---------------------------------------------------------------------------------------------------- fingerprints


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def cache_root() -> Path:
    """``$EASY_CONTEXT_CACHE``, else ``$XDG_CACHE_HOME/easy_context``, else ``~/.cache/easy_context``."""
    if os.environ.get("EASY_CONTEXT_CACHE"):
        return Path(os.environ["EASY_CONTEXT_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "easy_context"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _file_digests(paths: Sequence[Path]) -> List[str]:
    """SHA-256 of each file's content. Digests are remembered in the cache by (path, size, mtime, inode), so an
    unchanged file is hashed once; processes that start together hash it once between them (a file lock)."""
    memo_path = cache_root() / "file_digests.json"

    def keys():
        out = []
        for path in paths:
            st = os.stat(path)
            out.append(f"{os.path.realpath(path)}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}")
        return out

    def load():
        try:
            return json.loads(memo_path.read_text())
        except (OSError, ValueError):
            return {}

    memo, names = load(), keys()
    if all(k in memo for k in names):
        return [memo[k] for k in names]
    with contextlib.ExitStack() as stack:
        with contextlib.suppress(OSError):  # a read-only cache: hash without remembering
            stack.enter_context(_locked(memo_path.with_name("file_digests.lock")))
        memo = load()  # another process may have hashed them meanwhile
        changed = False
        for path, key in zip(paths, names):
            if key not in memo:
                h = hashlib.sha256()
                with open(path, "rb") as f:
                    for block in iter(lambda: f.read(1 << 24), b""):
                        h.update(block)
                memo[key], changed = h.hexdigest(), True
        if changed:
            with contextlib.suppress(OSError):
                _write_atomic(memo_path, json.dumps(memo))
    return [memo[k] for k in names]


def _files_fingerprint(files: Sequence[Path], root: Optional[Path], *extra) -> str:
    names = [str(f.relative_to(root)) if root is not None else "" for f in files]  # a moved corpus is the same
    return _digest(json.dumps([list(zip(names, _file_digests(files))), *extra]).encode())


def tokenizer_fingerprint(tokenizer) -> str:
    """What decides the token ids: the tokenizer's class and its whole definition (vocabulary, merges,
    normalisation), without the padding and truncation settings a call may leave on it."""
    parts = [type(tokenizer).__name__]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        spec.pop("padding", None)
        spec.pop("truncation", None)
        parts.append(json.dumps(spec, sort_keys=True))
    else:
        parts.append(json.dumps(sorted(tokenizer.get_vocab().items())))
    parts.append(json.dumps([str(t) for t in getattr(tokenizer, "all_special_tokens", [])]))
    return _digest("\n".join(parts).encode())


# ---------------------------------------------------------------------------------------------------- stores


def is_store(path) -> bool:
    meta = Path(path) / "meta.json"
    if not meta.is_file():
        return False
    try:
        return json.loads(meta.read_text()).get("format") == STORE_FORMAT
    except ValueError:
        return False


def open_store(path) -> TokenDocuments:
    """A token store's documents, memory-mapped."""
    path = Path(path)
    meta = json.loads((path / "meta.json").read_text())
    if meta.get("format") != STORE_FORMAT or meta.get("version") != STORE_VERSION:
        raise ValueError(f"{path} is not a token store of version {STORE_VERSION}: prepare it again with "
                         "python -m easy_context.training prepare")
    offsets = np.load(path / "offsets.npy", mmap_mode="r")
    count = int(offsets[-1])
    tokens = (np.memmap(path / "tokens.bin", dtype=meta["dtype"], mode="r", shape=(count,)) if count else
              np.zeros(0, dtype=meta["dtype"]))
    docs = TokenDocuments([tokens], np.diff(offsets), np.asarray(offsets[:-1]), meta["content"], str(path))
    docs.meta = meta
    return docs


def _dtype_for(vocab_size: int):
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


def write_store(out: Path, documents: Iterable[Sequence[int]], *, vocab_size: int, meta: dict,
                total: Optional[int] = None, desc: str = "tokenize", progress: bool = True) -> Path:
    """Write ``documents`` (token-id sequences, streamed) as a token store at ``out``, atomically: into a temporary
    sibling folder, renamed into place once complete. Returns ``out``."""
    from tqdm import tqdm

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    dtype = _dtype_for(vocab_size)
    try:
        offsets = array("q", [0])
        bar = tqdm(documents, total=total, desc=desc, unit=" docs", disable=not progress, delay=1.0,
                   file=sys.stderr, dynamic_ncols=True)
        with open(tmp / "tokens.bin", "wb") as f:
            for doc in bar:
                ids = np.asarray(doc, dtype=np.int64)
                if not len(ids):
                    continue
                if ids.min() < 0 or ids.max() >= np.iinfo(dtype).max + 1:
                    raise ValueError(f"token id {int(ids.max())} does not fit a vocabulary of {vocab_size}: pass "
                                     "the tokenizer the data was made with")
                f.write(ids.astype(dtype).tobytes())
                offsets.append(offsets[-1] + len(ids))
            f.flush()
            os.fsync(f.fileno())
        bar.close()
        np.save(tmp / "offsets.npy", np.frombuffer(offsets, dtype=np.int64))
        meta = dict(format=STORE_FORMAT, version=STORE_VERSION, dtype=np.dtype(dtype).name,
                    num_documents=len(offsets) - 1, num_tokens=int(offsets[-1]), **meta)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
        os.chmod(tmp, 0o777 & ~_umask())
        if out.exists():  # another process finished the same store first: keep its copy
            shutil.rmtree(tmp)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive ``flock`` on ``path`` (processes building the same store wait for the first)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ---------------------------------------------------------------------------------------------------- sources


def _is_local(spec: str) -> bool:
    return spec.startswith((".", "/", "~")) or spec.endswith(_LOCAL_SUFFIXES) or os.path.exists(spec)


def check_dataset(spec: str) -> None:
    """Fail fast on a ``--dataset`` that names a local path that does not exist."""
    if spec != "austen" and _is_local(spec) and not Path(spec).expanduser().exists():
        raise FileNotFoundError(f"dataset path {spec} does not exist: pass an existing .txt/.jsonl/.arrow/"
                                ".parquet file or folder, a prepared corpus, a HuggingFace dataset name, or 'austen'")


class _Source:
    """Where documents come from: ``tokens()`` builds zero-copy :class:`TokenDocuments` (an ``input_ids`` column)
    or ``texts()`` yields strings; ``fingerprint`` identifies the content."""

    def __init__(self, fingerprint: str, *, dataset=None, texts: Optional[Callable[[], Iterator[str]]] = None,
                 count: Optional[int] = None):
        self.fingerprint, self.dataset, self._texts, self.count = fingerprint, dataset, texts, count

    @property
    def pretokenized(self) -> bool:
        return self.dataset is not None and "input_ids" in self.dataset.column_names

    def texts(self) -> Iterator[str]:
        return self._texts()


def _dataset_source(ds, text_field: str, fingerprint: str) -> _Source:
    if "input_ids" in ds.column_names:  # already tokenized (as EasyContext's SlimPajama upsamples are)
        return _Source(_digest(f"{fingerprint}|input_ids".encode()), dataset=ds)
    if text_field not in ds.column_names:
        raise ValueError(f"the dataset has no {text_field!r} column (columns: {ds.column_names}): pass --text-field")

    def texts():
        for batch in ds.select_columns([text_field]).iter(batch_size=1000):
            yield from batch[text_field]

    return _Source(_digest(f"{fingerprint}|{text_field}".encode()), dataset=ds, texts=texts, count=len(ds))


def _dataset_files_fingerprint(ds, fallback: str) -> str:
    files = [Path(f["filename"]) for f in ds.cache_files]
    return _files_fingerprint(files, None) if files else fallback


def _open_source(spec: str, text_field: str, split: str) -> _Source:
    if spec == "austen":
        texts = list(austen_texts().values())
        return _Source(_digest(json.dumps(["austen", texts]).encode()), texts=lambda: iter(texts), count=len(texts))
    check_dataset(spec)
    if not _is_local(spec):
        import datasets

        try:
            ds = datasets.load_dataset(spec, split=split)
        except Exception as err:  # noqa: BLE001 - re-raised with the options that would have worked
            raise FileNotFoundError(f"cannot load dataset {spec!r}: it is neither a local path nor a loadable "
                                    f"HuggingFace dataset ({type(err).__name__}: {err})") from err
        return _dataset_source(ds, text_field, _dataset_files_fingerprint(ds, ds._fingerprint))
    path = Path(spec).expanduser()
    if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
        import datasets

        ds = datasets.load_from_disk(str(path))  # memory-mapped
        ds = ds[split] if isinstance(ds, datasets.DatasetDict) else ds
        return _dataset_source(ds, text_field, _dataset_files_fingerprint(ds, ds._fingerprint))
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise FileNotFoundError(f"dataset folder {spec} holds no .txt files and is not a saved dataset or a "
                                    "prepared corpus")
        return _Source(_files_fingerprint(files, path, "txt"), texts=lambda: (f.read_text(encoding="utf-8")
                                                                             for f in files), count=len(files))
    if path.suffix == ".txt":
        return _Source(_files_fingerprint([path], None, "txt"), texts=lambda: iter([path.read_text("utf-8")]),
                       count=1)
    if path.suffix in (".jsonl", ".json"):
        def records():
            with open(path, encoding="utf-8") as f:
                for number, line in enumerate(f, 1):
                    if line.strip():
                        record = json.loads(line)
                        if text_field not in record:
                            raise ValueError(f"every record of {spec} needs a {text_field!r} field (line {number} "
                                             "has none; or pass --text-field)")
                        yield record[text_field]

        return _Source(_files_fingerprint([path], None, "jsonl", text_field), texts=records)
    import datasets

    if path.suffix == ".arrow":
        try:
            ds = datasets.Dataset.from_file(str(path))  # memory-mapped in place
        except Exception:  # noqa: BLE001 - an Arrow IPC *file* rather than a stream: through datasets' cache
            ds = datasets.load_dataset("arrow", data_files=str(path), split="train")
    else:  # parquet cannot be memory-mapped as arrays: datasets converts it into its Arrow cache once
        ds = datasets.load_dataset("parquet", data_files=str(path), split="train")
    return _dataset_source(ds, text_field, _files_fingerprint([path], None, path.suffix))


def _arrow_documents(ds, fingerprint: str, description: str) -> TokenDocuments:
    """The ``input_ids`` column of a memory-mapped dataset, zero-copy: only the list offsets are read."""
    import pyarrow as pa

    if getattr(ds, "_indices", None) is not None:  # a selection or shuffle: make its rows contiguous once
        ds = ds.flatten_indices()
    column = ds.data.table.column("input_ids")
    segments, lengths, starts, base = [], [], [], 0
    for chunk in column.chunks:
        if pa.types.is_fixed_size_list(chunk.type):
            size = chunk.type.list_size
            offsets = (np.arange(len(chunk) + 1, dtype=np.int64) + chunk.offset) * size
        else:
            offsets = np.asarray(chunk.offsets.to_numpy(), dtype=np.int64)
        values = chunk.values
        if values.null_count or not (pa.types.is_integer(values.type)):
            raise ValueError(f"the input_ids column of {description} must hold integer token ids without nulls "
                             f"(it holds {chunk.type})")
        segments.append(values.to_numpy(zero_copy_only=True))
        lengths.append(np.diff(offsets))
        starts.append(base + offsets[:-1])
        base += len(values)
    empty = np.zeros(0, np.int64)
    return TokenDocuments(segments, np.concatenate(lengths or [empty]), np.concatenate(starts or [empty]),
                          fingerprint, description)


def open_documents(spec: str, tokenizer, text_field: str = "text", split: str = "train",
                   progress: bool = True) -> TokenDocuments:
    """The documents of ``--dataset spec`` as token ids on disk (see :func:`load_documents` for what ``spec`` may
    be, plus a folder written by ``prepare``). Text is tokenized once into the cache; later calls open the cache."""
    path = Path(spec).expanduser()
    if spec != "austen" and path.is_dir() and is_store(path):
        docs = open_store(path)
        made_with = docs.meta.get("tokenizer")
        if made_with is not None and made_with != tokenizer_fingerprint(tokenizer):
            raise ValueError(f"{spec} was prepared with the tokenizer {docs.meta.get('tokenizer_name')!r}, which "
                             "differs from this run's: pass that --tokenizer, or prepare the corpus again with this "
                             "one")
        return docs
    source = _open_source(spec, text_field, split)
    if source.pretokenized:
        return _arrow_documents(source.dataset, source.fingerprint, spec)
    tok_fp = tokenizer_fingerprint(tokenizer)
    content = _digest(f"{source.fingerprint}|{tok_fp}".encode())
    out = cache_root() / "tokens" / content
    if not is_store(out):
        with _locked(out.with_name(out.name + ".lock")):
            if not is_store(out):  # not built by another process meanwhile
                write_store(out, _tokenize(source.texts(), tokenizer), vocab_size=len(tokenizer),
                            meta=_store_meta(spec, text_field, source.fingerprint, tokenizer, tok_fp, content),
                            total=source.count, desc=f"tokenizing {spec}", progress=progress)
    return open_store(out)


def _store_meta(spec, text_field, source_fp, tokenizer, tok_fp, content) -> dict:
    return dict(source=spec, text_field=text_field, source_fingerprint=source_fp, tokenizer=tok_fp,
                tokenizer_name=str(getattr(tokenizer, "name_or_path", "")), content=content,
                created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))


def _tokenize(texts: Iterator[str], tokenizer) -> Iterator[List[int]]:
    """Token ids of each text, tokenized in batches (no special tokens, as tokenize_documents)."""
    batch: List[str] = []
    for text in texts:
        batch.append(text)
        if len(batch) == _TEXT_BATCH:
            yield from tokenizer(batch, add_special_tokens=False)["input_ids"]
            batch = []
    if batch:
        yield from tokenizer(batch, add_special_tokens=False)["input_ids"]


def open_samples(spec: str, tokenizer, seq_length: int, pad_id: int, *, text_field: str = "text",
                 pack: bool = True, reset_position_ids: bool = False, progress: bool = True) -> PackedSamples:
    """``train.py``'s samples of ``--dataset spec``: :func:`open_documents` cut by :class:`PackedSamples`."""
    docs = open_documents(spec, tokenizer, text_field, progress=progress)
    return PackedSamples(docs, seq_length, tokenizer.eos_token_id, pad_id, pack=pack,
                         reset_position_ids=reset_position_ids)


# ---------------------------------------------------------------------------------------------------- prepare


def _pretokenized_documents(docs: TokenDocuments, batch: int = 256) -> Iterator[np.ndarray]:
    for first in range(0, len(docs), batch):
        lengths, starts = docs.lengths[first:first + batch], docs.starts[first:first + batch]
        flat = docs.take(np.concatenate([s + np.arange(n) for s, n in zip(starts, lengths)]))
        yield from np.split(flat, np.cumsum(lengths)[:-1])


def prepare(spec: str, tokenizer, out, text_field: str = "text", progress: bool = True) -> Path:
    """Write the documents of ``spec`` as a token store at ``out`` (atomically); returns ``out``."""
    out = Path(out).expanduser()
    _check_out(out)
    tok_fp = tokenizer_fingerprint(tokenizer)
    if out.is_dir():
        out.rmdir()  # empty: replaced by the store
    if is_store(Path(spec).expanduser()):
        raise ValueError(f"{spec} is already a prepared corpus: pass it to train.py --dataset")
    source = _open_source(spec, text_field, "train")
    if source.pretokenized:
        docs = _arrow_documents(source.dataset, source.fingerprint, spec)
        meta = dict(source=spec, text_field="input_ids", source_fingerprint=source.fingerprint, tokenizer=None,
                    tokenizer_name=str(getattr(tokenizer, "name_or_path", "")), content=source.fingerprint)
        return write_store(out, _pretokenized_documents(docs), vocab_size=max(len(tokenizer), _max_id(docs) + 1),
                           meta=meta, total=len(docs), desc=f"copying {spec}", progress=progress)
    content = _digest(f"{source.fingerprint}|{tok_fp}".encode())
    return write_store(out, _tokenize(source.texts(), tokenizer), vocab_size=len(tokenizer),
                       meta=_store_meta(spec, text_field, source.fingerprint, tokenizer, tok_fp, content),
                       total=source.count, desc=f"tokenizing {spec}", progress=progress)


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists: pass a new --out folder (nothing is overwritten)")


def _max_id(docs: TokenDocuments) -> int:
    return max((int(s.max()) for s in docs.segments if len(s)), default=0)


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m easy_context.training prepare``: tokenize a corpus into a folder that ``train.py --dataset``
    reads."""
    parser = cli.Parser(prog="python -m easy_context.training prepare",
                        description="Tokenize a corpus once, ahead of training (a CPU machine is enough), into a "
                        "folder that train.py reads with --dataset DIR: the tokens of every document back to back "
                        "(uint16/uint32, memory-mapped in training) and their offsets. Samples are cut from it at "
                        "training time for any --seq-length, --no-pack or --reset-position-ids.")
    parser.add_argument("--dataset", required=True, help="'austen', a .txt/.jsonl/.arrow/.parquet path, a "
                        "save_to_disk folder, or a HF name (text, or an input_ids column)")
    parser.add_argument("--tokenizer", default=None, help="a tokenizer folder or hub name; unset: SmolLM2's (what "
                        "train.py --model tiny uses). Train with the same --tokenizer")
    parser.add_argument("--text-field", default="text", help="the text field of .jsonl and datasets sources")
    parser.add_argument("--out", required=True, help="the folder to write (must not exist; written atomically)")
    args = parser.parse_args(argv)
    cli.install_error_handler(parser.prog)
    from transformers import AutoTokenizer

    started = time.perf_counter()
    with cli.user_errors(ValueError, FileNotFoundError, FileExistsError, OSError):
        check_dataset(args.dataset)  # the user's mistakes first, before the tokenizer loads
        _check_out(Path(args.out).expanduser())
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or model_path("smollm2"))
        out = prepare(args.dataset, tokenizer, args.out, args.text_field)
    meta = json.loads((out / "meta.json").read_text())
    hint = f" --tokenizer {args.tokenizer}" if args.tokenizer else ""
    print(f"prepared {meta['num_documents']} documents, {meta['num_tokens']} tokens ({meta['dtype']}) from "
          f"{args.dataset} into {out} in {time.perf_counter() - started:.1f} s; train with: python train.py "
          f"--dataset {out}{hint}", flush=True)
    return 0
