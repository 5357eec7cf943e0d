"""Checks that turn silent wrong answers into errors that name the fix.

Two kinds:

* :func:`check_config` reads a model's config when a method is bound to it and refuses every attention feature the
  method cannot compute exactly: sliding windows (however the config spells them), chunked attention, query scaling
  that depends on the position, logit softcapping, attention sinks and attention dropout. The attention function only
  sees what the modeling code passes it; several families express these features elsewhere (the mask, the module), so
  the config is the one place where they can all be read.
* :func:`check_shards` guards the seam between :func:`easy_context.prepare_seq_parallel_inputs` and the attention:
  user code calls them separately, so a wrong rank, a wrong world size, unsharded input, ranks with different lengths
  or packed documents would otherwise compute the attention of some other sequence. It runs once per forward (on the
  first attention layer), costs one all-gather of a few integers, and every rank raises the same error together, so
  no rank is left waiting in a collective.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from .kernels import document_ids
from .model_config import text_config

__all__ = ["reject_unsupported_features", "padding_mask_refuser", "check_config", "config_problems", "check_shards",
           "ShardMismatch", "positions_restart", "packing_problem"]


def reject_unsupported_features(name: str, dropout: float, kwargs: dict) -> None:
    """Raise for attention features no method here implements: dropout, logit softcapping, attention sinks."""
    if dropout:
        raise ValueError(f"{name} does not implement attention dropout ({dropout}): set config.attention_dropout=0")
    if kwargs.get("softcap"):
        raise ValueError(f"{name} does not implement attention logit softcapping (softcap={kwargs['softcap']})")
    if kwargs.get("s_aux") is not None:
        raise ValueError(f"{name} does not implement attention sinks (s_aux)")


def padding_mask_refuser(name: str, fix: str):
    """A mask function for transformers' ``AttentionMaskInterface`` that builds no mask (the method knows causality
    itself) and refuses a padding mask with zeros, naming ``fix``."""

    def mask_function(*args, attention_mask: Optional[torch.Tensor] = None, **kwargs):
        if attention_mask is not None and attention_mask.dim() == 2 and not bool(attention_mask.all()):
            raise ValueError(f"{name} cannot honour a padding attention_mask with zeros: {fix}")
        return None

    return mask_function


def _windows(config) -> List[Tuple[int, int]]:
    """``(layer, window)`` for every layer that attends within a sliding window."""
    window = getattr(config, "sliding_window", None)
    if not window or getattr(config, "use_sliding_window", True) is False:
        return []
    layers = int(getattr(config, "num_hidden_layers", 0) or 0)
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return [(i, window) for i, kind in enumerate(layer_types) if kind == "sliding_attention"]
    max_window_layers = getattr(config, "max_window_layers", None)
    if max_window_layers is not None and hasattr(config, "use_sliding_window"):
        return [(i, window) for i in range(layers) if i >= max_window_layers]  # Qwen2's older spelling
    return [(i, window) for i in range(layers)]


def config_problems(config) -> List[str]:
    """Every attention feature of ``config`` that a method computing plain (full causal) attention cannot honour,
    each as a sentence naming the setting and its fix."""
    config = text_config(config)
    problems = []
    windows = _windows(config)
    max_positions = getattr(config, "max_position_embeddings", None)
    if windows and not (max_positions and min(w for _, w in windows) >= max_positions):
        layers = [i for i, _ in windows]
        shown = ", ".join(map(str, layers[:8])) + (", ..." if len(layers) > 8 else "")
        problems.append(
            f"sliding-window attention (sliding_window={windows[0][1]} on layers {shown}): set "
            "config.sliding_window=None (and use_sliding_window=False, or every layer_types entry to "
            "'full_attention') to compute full attention, as long-context training does"
        )
    chunk = getattr(config, "attention_chunk_size", None)
    layer_types = getattr(config, "layer_types", None) or []
    if chunk and (not layer_types or "chunked_attention" in layer_types):
        problems.append(
            f"chunked attention (attention_chunk_size={chunk}): set config.attention_chunk_size=None to compute full "
            "attention"
        )
    if getattr(config, "attn_temperature_tuning", False) and any(
        not bool(r) for r in (getattr(config, "no_rope_layers", None) or [])
    ):
        problems.append(
            "query scaling that depends on the position (attn_temperature_tuning on NoPE layers is computed from "
            "each rank's local positions): set config.attn_temperature_tuning=False"
        )
    if getattr(config, "attn_logit_softcapping", None):
        problems.append(
            f"attention logit softcapping (attn_logit_softcapping={config.attn_logit_softcapping}): no fused kernel "
            "returns the log-sum-exp of capped logits; set config.attn_logit_softcapping=None or use data_parallel"
        )
    return problems


def _module_problems(model) -> List[str]:
    for module in model.modules():
        if isinstance(getattr(module, "sinks", None), torch.Tensor):
            return ["attention sinks (the attention layers have a 'sinks' parameter): use data_parallel"]
    return []


def check_config(method_name: str, config, model=None) -> None:
    """Raise ``ValueError`` listing every attention feature ``method_name`` cannot compute exactly for ``config``."""
    problems = config_problems(config) + (_module_problems(model) if model is not None else [])
    if problems:
        raise ValueError(f"{method_name} computes plain causal attention and cannot honour this model's "
                         + "; ".join(problems))


# ------------------------------------------------------------------------------------------------- the shard guard
OK, MISMATCH, PACKED = 0, 1, 2
_EXPECTED: Dict[tuple, torch.Tensor] = {}


class ShardMismatch(ValueError):
    """The inputs of a sequence-parallel forward are not consistent shards of one sequence."""


def positions_restart(position_ids: torch.Tensor) -> bool:
    """Whether the positions of a full ``(B, S)`` sequence restart somewhere (packed documents)."""
    return position_ids.shape[-1] > 1 and bool((position_ids.diff(dim=-1) != 1).any())


def _expected(layout, rank: int, world_size: int, local_len: int, device) -> torch.Tensor:
    key = (id(layout), rank, world_size, local_len, str(device))
    found = _EXPECTED.get(key)
    if found is None:
        if len(_EXPECTED) > 256:
            _EXPECTED.clear()
        found = layout.indices(local_len * world_size, rank, world_size, device=device)
        _EXPECTED[key] = found
    return found


def _local_status(layout, rank, world_size, local_len, position_ids) -> Tuple[int, int]:
    if position_ids is None:  # nothing to compare: the shape checks still run
        return OK, 0
    pos = position_ids.reshape(-1, position_ids.shape[-1])
    if pos.shape[-1] != local_len:
        return MISMATCH, 0
    expected = _expected(layout, rank, world_size, local_len, pos.device)
    offset = pos[:, :1] - expected[:1]
    if bool((pos == expected + offset).all()) and bool((offset == offset[:1]).all()):
        return OK, int(offset[0, 0])
    gaps = expected.diff()
    steps = pos.diff(dim=-1)
    if local_len > 1 and bool(((steps != gaps) & (steps <= 0)).any()):
        return PACKED, 0
    return MISMATCH, 0


def check_shards(method, layout, group, rank: int, world_size: int, query: torch.Tensor, position_ids,
                 documents: bool = False) -> Optional[torch.Tensor]:
    """Raise :class:`ShardMismatch` on every rank unless every rank holds its own shard of one sequence; return the
    document ids of the full sequence when its positions restart (packed documents), else ``None``.

    Each rank compares its ``position_ids`` (global positions, as :func:`prepare_seq_parallel_inputs` returns them)
    with the positions ``layout`` assigns to it in a group of ``world_size``, up to one offset shared by all ranks; the
    ranks then exchange ``(local length, batch, status, offset, checksum)`` with one all-gather. When the positions
    are not one run (packed documents) and the method takes ``documents``, a second all-gather brings every rank's
    positions: the full sequence's positions must count up by one and restart at 0 at each document, and no two ranks
    may hold the same shard (the same positions and the same queries: a rank passed twice). Modeling code that passes
    no ``position_ids`` to the attention (Llama-4) gets the shape checks only.
    """
    batch, local_len = query.shape[0], query.shape[2]
    status, offset = _local_status(layout, rank, world_size, local_len, position_ids)
    checksum = 0
    if world_size > 1:  # tells a rank passed twice from documents that repeat: the same queries at the same positions
        checksum = int(torch.sum(query.detach(), dtype=torch.float64).reshape(1).cpu().view(torch.int64))
    mine = torch.tensor([local_len, batch, status, offset, checksum], dtype=torch.int64)
    table = [row.tolist() for row in _all_gather(mine, group, world_size, query.device)]
    message = _diagnose_shapes(method, world_size, table)
    if message:
        raise ShardMismatch(message)
    if all(row[2] == OK for row in table) and len({row[3] for row in table}) == 1:
        return None  # one sequence, sharded as the layout places it
    if not documents or position_ids is None:
        raise ShardMismatch(_diagnose(method, world_size, table))
    pos = position_ids.reshape(-1, local_len).expand(batch, local_len).to(torch.int64).contiguous()
    shards = _all_gather(pos, group, world_size, query.device)
    full = layout.unshard(shards, dim=1)
    if packing_problem(full):
        raise ShardMismatch(
            f"{method} over {world_size} ranks: the ranks' positions do not make one sequence of packed documents "
            "(positions count up by one and restart at 0 at each document): a wrong rank or world size, input that "
            "was not sharded, or local positions instead of global ones: " + _FIX)
    for r in range(world_size):
        for first in range(r):
            if table[first][4] == table[r][4] and torch.equal(shards[first], shards[r]):
                raise ShardMismatch(
                    f"{method} over {world_size} ranks: ranks {first} and {r} hold the same shard (the same positions "
                    "and the same tokens), so the sequence they make is not the one that was sharded: " + _FIX)
    ids = document_ids(full)
    return ids[0] if bool((ids == ids[:1]).all()) else ids


def _all_gather(x: torch.Tensor, group, world_size: int, device) -> List[torch.Tensor]:
    if world_size == 1:
        return [x.cpu()]
    device = device if dist.get_backend(group) == "nccl" else torch.device("cpu")
    gathered = [torch.empty_like(x, device=device) for _ in range(world_size)]
    dist.all_gather(gathered, x.to(device), group=group)
    return [g.cpu() for g in gathered]


def packing_problem(position_ids: torch.Tensor) -> bool:
    """Whether the positions of a full ``(B, S)`` sequence break somewhere other than by restarting at 0."""
    steps = position_ids.diff(dim=-1)
    return bool(((steps != 1) & (position_ids[..., 1:] != 0)).any()) or bool((position_ids < 0).any())


_FIX = ("shard each batch with easy_context.prepare_seq_parallel_inputs(method, input_ids, position_ids, target_ids, "
        "rank, world_size, device) using this group's rank and size, and pass position_ids=local_position_ids to the "
        "model (with transformers.Trainer, use easy_context.SeqParallelTrainer)")


def _diagnose_shapes(method: str, world_size: int, table: List[List[int]]) -> Optional[str]:
    if len({row[0] for row in table}) > 1 or len({row[1] for row in table}) > 1:
        shapes = ", ".join(f"rank {r}: {b}x{n}" for r, (n, b, *_rest) in enumerate(table))
        return (f"{method} over {world_size} ranks: the ranks hold inputs of different shapes ({shapes}), so they are "
                "not shards of one sequence: " + _FIX)
    return None


def _diagnose(method: str, world_size: int, table: List[List[int]]) -> Optional[str]:
    lengths = [row[0] for row in table]
    statuses = [row[2] for row in table]
    head = f"{method} over {world_size} ranks: "
    if PACKED in statuses:
        ranks = [r for r, s in enumerate(statuses) if s == PACKED]
        return (head + f"position_ids restart inside the sequence on rank(s) {ranks} (packed documents): "
                f"{method} computes one causal span per row, so packed documents would attend to each other. Use a "
                "method that takes packed documents (one whose Method.documents is true), pack without resetting "
                "positions, or put one document per row")
    if MISMATCH in statuses:
        ranks = [r for r, s in enumerate(statuses) if s == MISMATCH]
        return (head + f"the positions on rank(s) {ranks} are not that rank's shard of a {lengths[0] * world_size}-"
                "token sequence (a wrong rank or world size, input that was not sharded, or local positions instead "
                "of global ones): " + _FIX)
    offsets = {row[3] for row in table}
    if len(offsets) > 1:
        return (head + "the ranks' positions start from different offsets, so they are not shards of one sequence "
                "(packed documents whose boundaries fall on shard boundaries, or a wrong rank): " + _FIX)
    return None
