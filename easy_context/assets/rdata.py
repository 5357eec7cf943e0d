"""A minimal reader for R's serialization format (the subset used by data in R packages), and for R lazy-load
databases (``.rdb`` with its ``.rdx`` index), which is how the Debian package ``r-cran-janeaustenr`` ships the
novels."""

from __future__ import annotations

import gzip
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# An R-serialized stream ("XDR binary", the default of saveRDS/save and of lazy-load databases) is:
#   b"X\n", int32 format version (2 or 3), int32 writer R version, int32 minimal reader R version,
#   [version 3 only: int32 n, then n bytes naming the writer's native encoding], then one item.
# An item starts with an int32 "flags": SEXP type in bits 0-7, is-object bit 8, has-attributes bit 9, has-tag
# bit 10, and "levels" in bits 12-31 (for CHARSXP these carry the string's encoding). All integers are
# big-endian. Vectors store an int32 length (-1 means a 64-bit length follows as two int32s) and their
# elements; attributes, when flagged, follow the vector as a pairlist. Pairlist nodes store attributes, tag,
# CAR and then CDR. Symbols are stored once and referred to later through a reference table.

# SEXP types.
NILSXP, SYMSXP, LISTSXP = 0, 1, 2
CHARSXP, LGLSXP, INTSXP, REALSXP, CPLXSXP, STRSXP = 9, 10, 13, 14, 15, 16
VECSXP, EXPRSXP, RAWSXP = 19, 20, 24
# Pseudo-types that appear only in serialized streams.
REFSXP, NILVALUE_SXP, GLOBALENV_SXP, EMPTYENV_SXP, BASEENV_SXP = 255, 254, 253, 242, 241
MISSINGARG_SXP, UNBOUNDVALUE_SXP = 251, 252

_HAS_ATTR, _HAS_TAG = 1 << 9, 1 << 10
# CHARSXP encoding bits within "levels".
_BYTES_MASK, _LATIN1_MASK, _UTF8_MASK, _ASCII_MASK = 1 << 1, 1 << 2, 1 << 3, 1 << 6
_NA_INTEGER = -(2**31)


class RFormatError(ValueError):
    """The bytes are not an R serialization this reader understands."""


class RSymbol(str):
    """An R symbol (e.g. an attribute tag); a ``str`` subclass so it compares with plain strings."""


class RVector(list):
    """An R vector as a Python list, with its R attributes (``names``, ``class``, ...) in ``attrs``.

    NA elements are ``None``. ``rtype`` is the SEXP type code (``STRSXP`` = 16, ``VECSXP`` = 19, ...).
    """

    def __init__(self, items=(), rtype: int = VECSXP, attrs: dict[str, Any] | None = None):
        super().__init__(items)
        self.rtype = rtype
        self.attrs: dict[str, Any] = attrs or {}

    def named(self) -> dict[str, Any]:
        """``{name: element}`` using the ``names`` attribute."""
        names = self.attrs.get("names")
        if names is None or len(names) != len(self):
            raise RFormatError("vector has no usable 'names' attribute")
        return dict(zip(names, self))


class _RReader:
    """Decodes one XDR-format R serialization stream held in memory."""

    def __init__(self, data: bytes):
        self.data = memoryview(data)
        self.pos = 0
        self.refs: list[Any] = []  # symbols (and other reference objects) in order of first appearance
        self.native_encoding = "utf-8"

    # -- primitives --------------------------------------------------------------------------------------------
    def _take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > len(self.data):
            raise RFormatError(f"truncated R stream: need {n} bytes at offset {self.pos} of {len(self.data)}")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def int(self) -> int:
        return struct.unpack(">i", self._take(4))[0]

    def length(self) -> int:
        n = self.int()
        if n == -1:  # long vector: upper and lower 32 bits follow
            hi, lo = struct.unpack(">II", self._take(8))
            n = (hi << 32) | lo
        elif n < 0:
            raise RFormatError(f"negative vector length {n}")
        return n

    # -- header ------------------------------------------------------------------------------------------------
    def header(self) -> int:
        magic = bytes(self._take(2))
        if magic != b"X\n":
            raise RFormatError(f"not an XDR binary R serialization (header {magic!r}; only 'X\\n' is supported)")
        version = self.int()
        self.int()  # R version that wrote the stream
        self.int()  # minimal R version able to read it
        if version == 3:
            enc = bytes(self._take(self.int())).decode("ascii", "replace")
            self.native_encoding = _python_encoding(enc)
        elif version != 2:
            raise RFormatError(f"unsupported R serialization format version {version}")
        return version

    # -- items -------------------------------------------------------------------------------------------------
    def item(self) -> Any:
        flags = self.int()
        sexptype = flags & 0xFF
        has_attr = bool(flags & _HAS_ATTR)

        if sexptype in (NILVALUE_SXP, NILSXP):
            return None
        if sexptype in (GLOBALENV_SXP, EMPTYENV_SXP, BASEENV_SXP, MISSINGARG_SXP, UNBOUNDVALUE_SXP):
            return RSymbol(f"<special {sexptype}>")
        if sexptype == REFSXP:
            index = flags >> 8 or self.int()
            if not 1 <= index <= len(self.refs):
                raise RFormatError(f"bad reference index {index}")
            return self.refs[index - 1]
        if sexptype == SYMSXP:
            symbol = RSymbol(self.item())  # the symbol's name is a CHARSXP
            self.refs.append(symbol)
            return symbol
        if sexptype == LISTSXP:
            return self._pairlist(flags)
        if sexptype == CHARSXP:
            return self._charsxp(flags)

        if sexptype == STRSXP:
            value = RVector((self.item() for _ in range(self.length())), STRSXP)
        elif sexptype in (VECSXP, EXPRSXP):
            value = RVector((self.item() for _ in range(self.length())), sexptype)
        elif sexptype in (LGLSXP, INTSXP):
            n = self.length()
            raw = struct.unpack(f">{n}i", self._take(4 * n))
            if sexptype == LGLSXP:
                value = RVector((None if v == _NA_INTEGER else bool(v) for v in raw), sexptype)
            else:
                value = RVector((None if v == _NA_INTEGER else v for v in raw), sexptype)
        elif sexptype == REALSXP:
            n = self.length()
            value = RVector(struct.unpack(f">{n}d", self._take(8 * n)), sexptype)
        elif sexptype == CPLXSXP:
            n = self.length()
            parts = struct.unpack(f">{2 * n}d", self._take(16 * n))
            value = RVector((complex(parts[2 * i], parts[2 * i + 1]) for i in range(n)), sexptype)
        elif sexptype == RAWSXP:
            value = RVector(bytes(self._take(self.length())), sexptype)
        else:
            raise RFormatError(f"unsupported SEXP type {sexptype} at offset {self.pos - 4}")

        if has_attr:
            value.attrs = self._attributes()
        return value

    def _charsxp(self, flags: int) -> str | None:
        n = self.int()
        if n == -1:
            return None  # NA_character_
        raw = bytes(self._take(n))
        levels = flags >> 12
        if levels & _UTF8_MASK:
            return raw.decode("utf-8", "replace")
        if levels & (_LATIN1_MASK | _BYTES_MASK):  # "bytes" strings: keep every byte, one char each
            return raw.decode("latin-1")
        if levels & _ASCII_MASK:
            return raw.decode("ascii", "replace")
        return raw.decode(self.native_encoding, "replace")

    def _pairlist(self, flags: int) -> dict[str, Any]:
        """A pairlist as ``{tag: value}`` (untagged nodes get keys ``"[i]"``); node attributes are dropped."""
        out: dict[str, Any] = {}
        while True:
            if flags & _HAS_ATTR:
                self._attributes()
            tag = self.item() if flags & _HAS_TAG else None
            out[str(tag) if tag is not None else f"[{len(out)}]"] = self.item()
            flags = self.int()  # the CDR: either another LISTSXP node or the terminating NULL
            if flags & 0xFF != LISTSXP:
                if flags & 0xFF not in (NILVALUE_SXP, NILSXP):
                    raise RFormatError(f"pairlist ends in SEXP type {flags & 0xFF}, expected NULL")
                return out

    def _attributes(self) -> dict[str, Any]:
        attrs = self.item()
        if not isinstance(attrs, dict):
            raise RFormatError("attributes are not a pairlist")
        return attrs


def _python_encoding(r_encoding: str) -> str:
    name = r_encoding.strip().lower()
    if name in ("latin1", "iso-8859-1", "iso8859-1"):
        return "latin-1"
    try:
        "".encode(name)
        return name
    except LookupError:
        return "utf-8"


def unserialize(data: bytes) -> Any:
    """Decode one uncompressed XDR R serialization stream (``b"X\\n"`` ...) into Python objects.

    Vectors become :class:`RVector` lists with ``attrs``; NA becomes ``None``; NULL becomes ``None``;
    pairlists become dicts keyed by tag; symbols become :class:`RSymbol`. Environments, closures,
    language objects and ALTREP objects are not supported and raise :class:`RFormatError`.
    """
    reader = _RReader(data)
    reader.header()
    value = reader.item()
    if reader.pos != len(reader.data):
        raise RFormatError(f"{len(reader.data) - reader.pos} trailing bytes after the serialized object")
    return value


def iter_rdb_records(data: bytes) -> Iterator[tuple[int, bytes]]:
    """Split an R lazy-load database (``.rdb``) into ``(offset, uncompressed payload)`` records.

    Each record is a 4-byte big-endian length **of the uncompressed payload** followed by a zlib stream; the
    stream's own end marks where the next record starts.
    """
    pos = 0
    while pos < len(data):
        if pos + 4 > len(data):
            raise RFormatError(f"truncated record header at offset {pos}")
        (expected,) = struct.unpack(">I", data[pos : pos + 4])
        inflater = zlib.decompressobj()
        try:
            payload = inflater.decompress(data[pos + 4 :])
        except zlib.error as err:
            raise RFormatError(f"record at offset {pos} is not a zlib stream ({err})") from err
        if not inflater.eof:
            raise RFormatError(f"record at offset {pos} has a truncated zlib stream")
        if len(payload) != expected:
            raise RFormatError(f"record at offset {pos}: {len(payload)} bytes, header says {expected}")
        yield pos, payload
        pos = len(data) - len(inflater.unused_data)


def read_lazyload_db(rdb_path: Path) -> dict[str, Any]:
    """All objects of an R lazy-load database as ``{name: object}``.

    Names come from the ``.rdx`` index next to the ``.rdb`` (a gzip-compressed serialized list whose
    ``variables`` element maps each name to its record's byte offset); without an index, records are named
    ``"record<i>"``.
    """
    rdb_path = Path(rdb_path)
    data = rdb_path.read_bytes()
    objects = {offset: unserialize(payload) for offset, payload in iter_rdb_records(data)}
    rdx_path = rdb_path.with_suffix(".rdx")
    if not rdx_path.is_file():
        return {f"record{i}": obj for i, obj in enumerate(objects.values())}
    raw = rdx_path.read_bytes()
    index = unserialize(gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else zlib.decompress(raw[4:]))
    named = {}
    for name, (offset, _length) in index.named()["variables"].named().items():
        if offset not in objects:
            raise RFormatError(f"index names {name!r} at offset {offset}, where no record starts")
        named[name] = objects[offset]
    return named

