"""Where the fetched assets live, and whether they are there.

Layout of the assets folder (see :func:`assets_dir`)::

    <dir>/austen/sense_sensibility.txt ... persuasion.txt
    <dir>/smollm2-135m/{config.json, model.safetensors, tokenizer.json, ...}
"""

from __future__ import annotations

import os
from pathlib import Path

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
SMOLLM2_SUBDIR = "smollm2-135m"

SETUP_HINT = "run `bash scripts/setup.sh` (or `python -m easy_context.assets fetch`) to fetch them"


def _repo_root() -> Path | None:
    """The checkout root when this package is used from a source (editable) checkout, else None."""
    root = Path(__file__).resolve().parents[2]  # easy_context/assets/paths.py -> the checkout
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


def austen_files(folder: Path) -> list[Path]:
    """The six novel files of an Austen folder, in publication order."""
    return [folder / f"{slug}.txt" for slug, _, _ in NOVELS]


def austen_complete(folder: Path) -> bool:
    """Whether ``folder`` holds all six novels."""
    return all(p.is_file() for p in austen_files(folder))


def smollm2_complete(folder: Path) -> bool:
    """Whether ``folder`` holds a converted SmolLM2 (config, weights and tokenizer)."""
    return (
        (folder / "config.json").is_file()
        and (folder / "model.safetensors").is_file()
        and (folder / "tokenizer.json").is_file()
    )


def have_assets() -> bool:
    """True when both the Austen text files and the converted SmolLM2 folder are present."""
    return austen_complete(austen_dir()) and smollm2_complete(smollm2_path())



def not_found(what: str, path: Path) -> FileNotFoundError:
    """The error for a missing asset, naming the command that fetches it."""
    return FileNotFoundError(f"{what} not found at {path}; {SETUP_HINT} (set ${ENV_VAR} to use another folder)")
