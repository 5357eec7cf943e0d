"""Context-extension adapters: extract a LoRA from a long-context fine-tune, and merge it into another model with
the long-context config carried along.

A model fine-tuned for long context (for instance with ``train.py`` at a raised RoPE base) differs from its base in
two ways: its weights, and a few config values (``rope_theta`` / ``rope_parameters``, rope scaling,
``max_position_embeddings``). :func:`extract_lora` turns the weight difference into a PEFT LoRA adapter (truncated
SVD per linear layer, the LM head included) and stores the config values beside it; :func:`apply_adapter` merges the
adapter into a model of the same architecture (the base, or another fine-tune of it) and writes those values into
the merged config, so the extension is not lost.

Command line::

    python -m easy_context.adapters extract --base BASE --tuned TUNED --out ADAPTER --rank R [options]
    python -m easy_context.adapters apply --model MODEL --adapter ADAPTER --out MERGED

Needs ``safetensors`` weights; ``peft`` to load the adapter with PEFT (``pip install 'easy-context[adapters]'``).
"""

from .extract import extract_lora, format_report, truncated_svd
from .merge import apply_adapter
from .plan import AdapterError, AdapterWarning

__all__ = ["extract_lora", "apply_adapter", "truncated_svd", "format_report", "AdapterError", "AdapterWarning"]
