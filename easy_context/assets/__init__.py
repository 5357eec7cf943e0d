"""Real assets for tests, evaluations and training: SmolLM2-135M-Instruct and Jane Austen's novels.

This package holds what the library and the scripts use: where the assets are (:mod:`~easy_context.assets.paths`)
and how to load them (:mod:`~easy_context.assets.load`). Fetching them, with the R-serialization reader it needs,
lives in :mod:`~easy_context.assets.fetch` and :mod:`~easy_context.assets.rdata`, which nothing imports unless asked:
``bash scripts/setup.sh`` runs ``python -m easy_context.assets fetch``.
"""

from .load import SMOLLM2_ARCH, austen_text, austen_texts, check_smollm2_config, load_smollm2, load_tokenizer
from .paths import ENV_VAR, NOVELS, SETUP_HINT, assets_dir, austen_dir, have_assets, smollm2_path

__all__ = ["ENV_VAR", "NOVELS", "SETUP_HINT", "SMOLLM2_ARCH", "assets_dir", "austen_dir", "smollm2_path",
           "have_assets", "austen_texts", "austen_text", "load_tokenizer", "load_smollm2", "check_smollm2_config"]
