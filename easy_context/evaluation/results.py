"""Results keyed on content: fingerprints of what a result depends on (config, weights, tokenizer, tokens), result
keys and labels, and the JSONL records results are kept in."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..cli import UserError

__all__ = ["file_sha256", "config_fingerprint", "weights_fingerprint", "tokenizer_fingerprint", "tokens_fingerprint",
           "result_key", "unique_labels", "read_trials", "sha256_text"]

_WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.gguf", "*.h5", "*.msgpack")
_VOLATILE_CONFIG = ("_name_or_path", "transformers_version", "_commit_hash", "torch_dtype", "dtype",
                    "_attn_implementation_autoset", "_attn_implementation", "attn_implementation")


def sha256_text(text: str) -> str:
    """SHA-256 of a text (UTF-8), as hex."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _cache_path() -> Path:
    root = os.environ.get("EASY_CONTEXT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "easy_context")
    return Path(root) / "file_sha256.json"


def file_sha256(path) -> str:
    """SHA-256 of a file's content, remembered (by path, size, modification time and inode) in
    ``~/.cache/easy_context`` so large weights are read once."""
    path = Path(path).resolve()
    st = path.stat()
    stamp = f"{path}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"
    cache_file = _cache_path()
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    if stamp in cache:
        return cache[stamp]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 23), b""):
            h.update(block)
    cache[stamp] = h.hexdigest()
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_name(f".{cache_file.name}.{os.getpid()}")
        tmp.write_text(json.dumps(cache))
        os.replace(tmp, cache_file)
    except OSError:
        pass  # the cache is an optimisation only
    return cache[stamp]


def config_fingerprint(config) -> str:
    """SHA-256 of a model config's content, without its name, path and versions (a copy of a model in another
    folder has the same fingerprint)."""
    data = config.to_dict()
    for key in _VOLATILE_CONFIG:
        data.pop(key, None)
    return sha256_text(json.dumps(data, sort_keys=True, default=str))


def weights_fingerprint(path: str, model=None) -> str:
    """SHA-256 over the weight files of a model folder (names within the folder and contents); for a model that is
    not a local folder, over the loaded ``model``'s tensors."""
    folder = Path(path)
    files = sorted({p for pattern in _WEIGHT_FILES for p in folder.glob(pattern)}) if folder.is_dir() else []
    h = hashlib.sha256()
    if files:
        for f in files:
            h.update(f"{f.name}|{file_sha256(f)}\n".encode())
        return h.hexdigest()
    if model is None:
        raise UserError(f"{path}: no weight files ({', '.join(_WEIGHT_FILES)}) to fingerprint")
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """SHA-256 of a tokenizer's vocabulary, merges and special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        text = backend.to_str()
    else:
        text = json.dumps(sorted(tokenizer.get_vocab().items()))
    extra = json.dumps([str(tokenizer.bos_token), str(tokenizer.eos_token), getattr(tokenizer, "chat_template", None)])
    return sha256_text(text + extra)


def tokens_fingerprint(samples: Sequence[torch.Tensor], length: Optional[int] = None) -> str:
    """SHA-256 (16 hex digits) of token ids: the first ``length`` tokens of every sample (all when ``None``)."""
    h = hashlib.sha256()
    for sample in samples:
        ids = sample[:length] if length is not None else sample
        h.update(ids.to(torch.int64).contiguous().numpy().tobytes())
        h.update(b"|")
    return h.hexdigest()[:16]



def result_key(*parts) -> str:
    """A 12-hex-digit key of JSON-serialisable parts."""
    return sha256_text(json.dumps(parts, sort_keys=True, default=str))[:12]


def unique_labels(entries: Sequence[Tuple[str, str]]) -> Dict[str, str]:
    """``{key: label}`` for ``(key, base label)`` pairs: the base label, with ``#<key>`` appended where two keys
    share one."""
    by_label: Dict[str, set] = {}
    for key, label in entries:
        by_label.setdefault(label, set()).add(key)
    return {key: label if len(by_label[label]) == 1 else f"{label}#{key[:6]}" for key, label in entries}


def read_trials(path) -> List[dict]:
    """Records of a JSONL trials file (empty if missing); a truncated last line (interrupted run) is ignored."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records

