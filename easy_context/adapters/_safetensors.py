"""Streaming access to safetensors checkpoints: one tensor (or a block of its rows) at a time.

A safetensors file is an 8-byte little-endian header length, a JSON header (``{name: {"dtype", "shape",
"data_offsets"}}`` plus an optional ``"__metadata__"``) and the raw tensor bytes. Reading with plain ``seek`` and
``readinto`` into a freshly allocated tensor (instead of memory-mapping the file) keeps the process's resident memory
at what it holds in tensors: pages of a mapped shard would stay counted in its RSS until the map is closed.

:class:`Checkpoint` presents the shards of a model folder (``model.safetensors``, or the files named by
``model.safetensors.index.json``) as one name -> tensor store. :class:`ShardWriter` writes a file whose header is
known up front, streaming one tensor at a time.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Tuple

import torch

DTYPES: Dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be read as safetensors weights."""


class TensorInfo:
    __slots__ = ("name", "file", "dtype", "shape", "start", "end")

    def __init__(self, name: str, file: Path, dtype: torch.dtype, shape: Tuple[int, ...], start: int, end: int):
        self.name, self.file, self.dtype, self.shape, self.start, self.end = name, file, dtype, shape, start, end

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


def read_header(path: Path) -> Tuple[dict, int]:
    """``(header dict, byte offset of the data section)`` of one safetensors file."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise CheckpointError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n > 100 * 2**20:
            raise CheckpointError(f"{path}: not a safetensors file (header length {n})")
        header = json.loads(f.read(n))
    return header, 8 + n


def _tensor_infos(path: Path) -> Iterator[TensorInfo]:
    header, data_start = read_header(path)
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if entry["dtype"] not in DTYPES:
            raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {entry['dtype']}")
        begin, end = entry["data_offsets"]
        yield TensorInfo(name, path, DTYPES[entry["dtype"]], tuple(entry["shape"]), data_start + begin,
                         data_start + end)


def _read_into(f, out: torch.Tensor, offset: int, nbytes: int, name: str) -> None:
    view = out.view(-1).view(torch.uint8).numpy() if out.numel() else None
    f.seek(offset)
    got = f.readinto(view) if view is not None else 0
    if got != nbytes:
        raise CheckpointError(f"{name}: truncated file (read {got} of {nbytes} bytes)")


class Checkpoint:
    """The safetensors weights of a model folder, read lazily (one tensor or row block at a time)."""

    def __init__(self, folder: os.PathLike, files: Optional[List[str]] = None):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise CheckpointError(f"{self.folder}: no such model folder")
        index = self.folder / INDEX_FILE
        if files is not None:
            pass
        elif index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        elif (self.folder / SINGLE_FILE).is_file():
            files = [SINGLE_FILE]
        else:
            files = sorted(p.name for p in self.folder.glob("*.safetensors"))
        if not files:
            other = sorted(p.name for p in self.folder.glob("*.bin")) + sorted(p.name for p in self.folder.glob("*.pt"))
            hint = f" (found {', '.join(other[:3])}: re-save it with save_pretrained(safe_serialization=True))" \
                if other else ""
            raise CheckpointError(f"{self.folder}: no safetensors weights{hint}")
        self.files: List[str] = files
        self.tensors: Dict[str, TensorInfo] = {}
        for name in files:
            path = self.folder / name
            if not path.is_file():
                raise CheckpointError(f"{self.folder}: shard {name} named by {INDEX_FILE} is missing")
            for info in _tensor_infos(path):
                self.tensors[info.name] = info
        self._handles: Dict[Path, object] = {}

    # -- lookup ------------------------------------------------------------------------------------------------
    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def names(self) -> List[str]:
        return list(self.tensors)

    def info(self, name: str) -> TensorInfo:
        return self.tensors[name]

    def shard_of(self, name: str) -> str:
        return self.tensors[name].file.name

    def names_in(self, shard: str) -> List[str]:
        """Tensor names of one shard in file order."""
        infos = [i for i in self.tensors.values() if i.file.name == shard]
        return [i.name for i in sorted(infos, key=lambda i: i.start)]

    @property
    def nbytes(self) -> int:
        return sum(i.nbytes for i in self.tensors.values())

    # -- reading -----------------------------------------------------------------------------------------------
    def _handle(self, path: Path):
        f = self._handles.get(path)
        if f is None:
            f = self._handles[path] = open(path, "rb", buffering=0)
        return f

    def read(self, name: str, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The whole tensor, converted to ``dtype`` when given."""
        info = self.tensors[name]
        out = torch.empty(info.shape, dtype=info.dtype)
        _read_into(self._handle(info.file), out, info.start, info.nbytes, name)
        return out if dtype is None or dtype == info.dtype else out.to(dtype)

    def read_rows(self, name: str, start: int, stop: int, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """Rows ``start:stop`` of the tensor's first dimension (a contiguous byte range of the file)."""
        info = self.tensors[name]
        rows = info.shape[0] if info.shape else 1
        start, stop = max(0, start), min(stop, rows)
        row_bytes = info.nbytes // max(rows, 1)
        out = torch.empty((stop - start,) + tuple(info.shape[1:]), dtype=info.dtype)
        _read_into(self._handle(info.file), out, info.start + start * row_bytes, (stop - start) * row_bytes, name)
        return out if dtype is None or dtype == info.dtype else out.to(dtype)

    def close(self) -> None:
        for f in self._handles.values():
            f.close()
        self._handles.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class ShardWriter:
    """Writes one safetensors file whose tensor names, dtypes and shapes are known before any data.

    ``ShardWriter(path, [(name, dtype, shape), ...], metadata)`` writes the header; then :meth:`write` must be called
    once per tensor, in the same order, with a tensor of exactly that dtype and shape.
    """

    def __init__(self, path: os.PathLike, entries: Iterable[Tuple[str, torch.dtype, Tuple[int, ...]]],
                 metadata: Optional[Dict[str, str]] = None):
        self.path = Path(path)
        self.entries = [(n, d, tuple(s)) for n, d, s in entries]
        header: Dict[str, object] = {}
        if metadata:
            header["__metadata__"] = dict(metadata)
        offset = 0
        for name, dtype, shape in self.entries:
            n = 1
            for s in shape:
                n *= s
            size = n * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data section starts 8-byte aligned
        self._f = open(self.path, "wb")
        self._f.write(struct.pack("<Q", len(raw)))
        self._f.write(raw)
        self._next = 0
        self.nbytes = offset

    def write(self, name: str, tensor: torch.Tensor) -> None:
        want_name, dtype, shape = self.entries[self._next]
        if name != want_name or tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise RuntimeError(f"ShardWriter: expected {want_name} {dtype} {shape}, got {name} {tensor.dtype} "
                               f"{tuple(tensor.shape)}")
        t = tensor.detach().contiguous()
        if t.numel():
            self._f.write(memoryview(t.view(-1).view(torch.uint8).numpy()))
        self._next += 1

    def close(self) -> None:
        if self._next != len(self.entries):
            self._f.close()
            raise RuntimeError(f"ShardWriter: {self.path} closed after {self._next} of {len(self.entries)} tensors")
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is None:
            self.close()
        else:
            self._f.close()
