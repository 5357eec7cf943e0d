"""Long-context evaluation of (patched) causal LMs: the machinery of ``eval_ppl.py`` and ``eval_needle.py``.

* :mod:`~easy_context.evaluation.common`: model specs, processes, model loading and token data, which both share;
* :mod:`~easy_context.evaluation.results`: results keyed on content (fingerprints, keys, labels, JSONL records);
* :mod:`~easy_context.evaluation.perplexity`: perplexity by context length, its CSV and its plot;
* :mod:`~easy_context.evaluation.needle`: needle-in-a-haystack prompts, scoring and heatmaps.

Every name is importable from here (``from easy_context import evaluation as ev``).
"""

from .common import (PLAIN, ModelSpec, Runtime, TokenSamples, add_common_options, check_lengths, init_runtime,
                     load_config, load_model, load_token_samples, load_tokenizer, model_identity, parse_model_spec,
                     read_text_folder, resolve_dtype, shutdown_runtime, token_lengths)
from .needle import (Haystack, NeedleConfig, NeedleTrial, forced_answer_predictions, generate_answer,
                     needle_accuracy_grid, plot_needle_heatmaps)
from .perplexity import (PplResults, local_nll, perplexity_by_length, plot_perplexity, read_ppl_csv,
                         write_ppl_csv)
from .results import (config_fingerprint, file_sha256, read_trials, result_key, tokenizer_fingerprint,
                      tokens_fingerprint, unique_labels, weights_fingerprint)

__all__ = [
    "PLAIN",
    "ModelSpec",
    "parse_model_spec",
    "add_common_options",
    "check_lengths",
    "Runtime",
    "init_runtime",
    "shutdown_runtime",
    "resolve_dtype",
    "load_model",
    "load_config",
    "load_tokenizer",
    "file_sha256",
    "config_fingerprint",
    "weights_fingerprint",
    "tokenizer_fingerprint",
    "tokens_fingerprint",
    "model_identity",
    "result_key",
    "unique_labels",
    "TokenSamples",
    "PplResults",
    "token_lengths",
    "read_text_folder",
    "load_token_samples",
    "local_nll",
    "perplexity_by_length",
    "read_ppl_csv",
    "write_ppl_csv",
    "plot_perplexity",
    "NeedleConfig",
    "NeedleTrial",
    "Haystack",
    "forced_answer_predictions",
    "generate_answer",
    "read_trials",
    "needle_accuracy_grid",
    "plot_needle_heatmaps",
]
