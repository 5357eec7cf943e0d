"""Reading and writing a transformers model config the same way on every supported transformers version."""

from __future__ import annotations

import functools
from typing import Optional, Tuple

__all__ = ["text_config", "attention_heads", "get_rope_theta", "set_rope_theta"]


def text_config(config):
    """The config of the text decoder: ``config.get_text_config()`` where it exists (multimodal configs nest it),
    else ``config``."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def attention_heads(config) -> Tuple[int, int]:
    """``(query heads, key/value heads)`` of the text decoder; a config without ``num_key_value_heads`` has as many
    key/value heads as query heads."""
    config = text_config(config)
    heads = config.num_attention_heads
    return heads, getattr(config, "num_key_value_heads", None) or heads


def get_rope_theta(config) -> Optional[float]:
    """RoPE base of a config: ``rope_parameters['rope_theta']`` (transformers 5) or ``rope_theta`` (4.x). ``config``
    is a config object or the dict of a ``config.json``."""
    get = config.get if isinstance(config, dict) else functools.partial(getattr, config)
    params = get("rope_parameters", None)
    if isinstance(params, dict) and "rope_theta" in params:
        return float(params["rope_theta"])
    value = get("rope_theta", None)
    return None if value is None else float(value)


def set_rope_theta(config, theta: float) -> None:
    """Set the RoPE base where this transformers version reads it (both places when both exist)."""
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict):
        params["rope_theta"] = float(theta)
    if hasattr(config, "rope_theta") or not isinstance(params, dict):
        config.rope_theta = float(theta)
