"""RoPE base for a longer context.

RoPE rotates channel pair i (of d/2) by position * base^(-2i/d). Raising the base slows every rotation, so the slowest
channels stay inside the angles they saw in pre-training for longer inputs. ``python -m easy_context.training
rope-base`` prints the base these formulas give.
"""

from __future__ import annotations

import argparse
import math
from typing import List, Optional

__all__ = ["ntk_rope_base", "scaling_law_rope_base", "rope_base", "ROPE_FORMULAS"]


def ntk_rope_base(base: float, original_length: int, target_length: int, head_dim: int) -> float:
    """NTK-aware base (bloc97, 2023): ``base · s^(d/(d-2))`` with ``s = target_length / original_length``.

    Chosen so the slowest channel pair (i = d/2 - 1) is interpolated by exactly ``s`` (it turns by the same angle at
    ``target_length`` as before at ``original_length``) while the fastest pair is left untouched.
    """
    if head_dim <= 2:
        raise ValueError(f"head_dim must be > 2, got {head_dim}")
    scale = target_length / original_length
    return base * scale ** (head_dim / (head_dim - 2))


def scaling_law_rope_base(base: float, original_length: int, target_length: int) -> float:
    """Base from the scaling laws of RoPE extrapolation (Liu et al., 2023, arXiv:2310.05209).

    ``base' = base · (T/T₀)^(ln base / ln(T₀/2π))``, which equals ``base^(ln(T/2π) / ln(T₀/2π))``.

    Derivation: pre-training at length T₀ fully trains the channel pairs whose period ``2π·base^(2i/d)`` is at most
    T₀; the last of them (the *critical dimension*) sits at ``2i/d = log_base(T₀/2π)``. With a new base the period of
    that same channel becomes ``2π·base'^(log_base(T₀/2π))``; setting it equal to the target length T and solving
    for ``base'`` gives the formula. It is the smallest base whose trained channels cover T; EasyContext's empirical
    schedule uses larger bases (see train_scripts/).
    """
    if original_length <= 2 * math.pi:
        raise ValueError(f"original_length must exceed 2π, got {original_length}")
    return base ** (math.log(target_length / (2 * math.pi)) / math.log(original_length / (2 * math.pi)))


ROPE_FORMULAS = ("ntk", "scaling-law")


def rope_base(formula: str, base: float, original_length: int, target_length: int,
              head_dim: Optional[int] = None) -> float:
    """The RoPE base for ``target_length`` by ``formula`` (one of :data:`ROPE_FORMULAS`)."""
    if formula == "ntk":
        if head_dim is None:
            raise ValueError("the ntk formula needs --head-dim (hidden_size / num_attention_heads)")
        return ntk_rope_base(base, original_length, target_length, head_dim)
    if formula == "scaling-law":
        return scaling_law_rope_base(base, original_length, target_length)
    raise ValueError(f"unknown RoPE formula {formula!r}: choose one of {', '.join(ROPE_FORMULAS)}")


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m easy_context.training rope-base ...``: print the base."""
    parser = argparse.ArgumentParser(prog="python -m easy_context.training")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("rope-base", help="print the RoPE base for a target context length")
    p.add_argument("--formula", choices=ROPE_FORMULAS, default="scaling-law")
    p.add_argument("--original-base", type=float, required=True, help="the model's pre-training RoPE base")
    p.add_argument("--original-length", type=int, required=True, help="the model's pre-training context length")
    p.add_argument("--target-length", type=int, required=True)
    p.add_argument("--head-dim", type=int, default=None, help="attention head dimension (ntk only)")
    args = parser.parse_args(argv)
    base = rope_base(args.formula, args.original_base, args.original_length, args.target_length, args.head_dim)
    print(f"{base:.6g}")
    return 0

