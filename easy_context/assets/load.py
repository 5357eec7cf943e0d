"""Loading the fetched assets: Jane Austen's novels as text, SmolLM2-135M-Instruct as a model and tokenizer."""

from __future__ import annotations

from pathlib import Path

import torch

from ..model_config import get_rope_theta
from .paths import austen_complete, austen_dir, austen_files, not_found, smollm2_complete, smollm2_path

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


def austen_texts() -> dict[str, str]:
    """The six novels as ``{slug: text}`` in publication order (slugs as in :data:`NOVELS`).

    Each text has one line per element of the original R character vector (chapter headings and blank
    paragraph separators included). Raises :class:`FileNotFoundError` naming the setup command when missing.
    """
    folder = austen_dir()
    if not austen_complete(folder):
        raise not_found("Jane Austen novels", folder)
    return {p.stem: p.read_text(encoding="utf-8") for p in austen_files(folder)}


def austen_text() -> str:
    """All six novels in publication order joined with a blank line (about 4.0M characters, ~1M tokens)."""
    return "\n\n".join(austen_texts().values())


def _require_smollm2() -> Path:
    path = smollm2_path()
    if not smollm2_complete(path):
        raise not_found("converted SmolLM2-135M-Instruct model", path)
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
    from transformers import AutoModelForCausalLM

    path = _require_smollm2()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32, **kwargs)
    model.eval()
    return model, load_tokenizer()


def check_smollm2_config(config) -> None:
    """Raise ``ValueError`` unless ``config`` describes SmolLM2-135M (see :data:`SMOLLM2_ARCH`)."""
    found = {key: getattr(config, key, None) for key in SMOLLM2_ARCH if key != "rope_theta"}
    found["rope_theta"] = get_rope_theta(config)
    if found != SMOLLM2_ARCH:
        raise ValueError(f"unexpected SmolLM2 architecture: {found}, expected {SMOLLM2_ARCH}")

