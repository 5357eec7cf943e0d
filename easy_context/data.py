"""Placing a batch on the ranks of a sequence-parallel group, and putting results back together."""

from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.distributed as dist

from .comm import group_rank, group_size
from .layout import padded_length
from .loss import IGNORE_INDEX
from .mesh import get_sequence_parallel_group
from .methods import get_method

__all__ = ["prepare_seq_parallel_inputs", "gather_seq_parallel", "prepare_dataloader", "pad_to_multiple"]


def pad_to_multiple(input_ids, position_ids, target_ids, multiple: int, pad_token_id: int = 0):
    """Pad ``(B, S)`` tensors at the end to a multiple of ``multiple``.

    Padded inputs get ``pad_token_id``, padded targets ``-100`` and padded positions continue counting, so causal
    attention never lets a real token see the padding and the loss ignores it.
    """
    seq_len = input_ids.shape[-1]
    extra = padded_length(seq_len, multiple) - seq_len
    if extra == 0:
        return input_ids, position_ids, target_ids
    pad = lambda x, value: torch.nn.functional.pad(x, (0, extra), value=value)  # noqa: E731
    last = position_ids[..., -1:]
    more = last + torch.arange(1, extra + 1, device=position_ids.device, dtype=position_ids.dtype)
    position_ids = torch.cat([position_ids, more.expand(*position_ids.shape[:-1], extra)], dim=-1)
    target_ids = None if target_ids is None else pad(target_ids, IGNORE_INDEX)
    return pad(input_ids, pad_token_id), position_ids, target_ids


def prepare_seq_parallel_inputs(
    seq_algo,
    input_ids: torch.Tensor,
    position_ids: Optional[torch.Tensor],
    target_ids: Optional[torch.Tensor],
    rank: int,
    world_size: int,
    device,
    *,
    pad: bool = False,
    pad_to_multiple_of: Optional[int] = None,
    pad_token_id: int = 0,
) -> Dict[str, torch.Tensor]:
    """This rank's share of a ``(B, S)`` batch, as EasyContext returns it.

    Returns ``local_input_ids``, ``local_position_ids`` (global positions, so rotary embeddings rotate each token by
    its true position) and ``local_target_ids``. ``rank``/``world_size`` are the rank and size of the
    *sequence-parallel* group. The sequence length must be divisible by the method's layout multiple; ``pad=True``
    (or ``pad_to_multiple_of``) pads at the end with ``-100`` targets instead of raising.
    """
    method = get_method(seq_algo)
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, seq_len), got shape {tuple(input_ids.shape)}")
    if position_ids is None:
        position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    if position_ids.shape[-1] != input_ids.shape[-1] or (
        target_ids is not None and target_ids.shape != input_ids.shape
    ):
        raise ValueError(
            f"input_ids {tuple(input_ids.shape)}, position_ids {tuple(position_ids.shape)} and target_ids "
            f"{None if target_ids is None else tuple(target_ids.shape)} must have the same sequence length"
        )
    layout = method.layout
    if layout is not None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside the group of {world_size}: pass the rank and size of the "
                             "sequence-parallel group")
        multiple = layout.multiple(world_size)
        if pad_to_multiple_of is not None and pad_to_multiple_of % multiple:
            raise ValueError(f"pad_to_multiple_of={pad_to_multiple_of} is not a multiple of {multiple}, which "
                             f"{method.name} needs with world_size={world_size}")
        if pad or pad_to_multiple_of is not None:
            input_ids, position_ids, target_ids = pad_to_multiple(
                input_ids, position_ids, target_ids, pad_to_multiple_of or multiple, pad_token_id
            )
        layout.check_length(input_ids.shape[-1], world_size, method.name)
        shard = lambda x: None if x is None else layout.shard(x, rank, world_size, dim=-1)  # noqa: E731
        input_ids, position_ids, target_ids = shard(input_ids), shard(position_ids), shard(target_ids)
    to = lambda x: None if x is None else x.to(device)  # noqa: E731
    return {
        "local_input_ids": to(input_ids),
        "local_position_ids": to(position_ids),
        "local_target_ids": to(target_ids),
    }


def gather_seq_parallel(local: torch.Tensor, seq_algo, dim: int = 1, group=None) -> torch.Tensor:
    """Inverse of the sharding: gather every rank's ``local`` (for example logits) into the full sequence.

    Every rank of ``group`` (default: the sequence-parallel group) must call it; every rank receives the full tensor.
    Not differentiable; meant for evaluation.
    """
    method = get_method(seq_algo)
    group = get_sequence_parallel_group() if group is None else group
    world_size = group_size(group)
    if method.layout is None or world_size == 1:
        return local
    local = local.contiguous()
    shards = [torch.empty_like(local) for _ in range(world_size)]
    dist.all_gather(shards, local, group=group)
    return method.layout.unshard(shards, dim=dim)


def prepare_dataloader(seq_algo, dataloader, accelerator):
    """EasyContext's dataloader preparation.

    With ``data_parallel`` the loader is sharded across processes by ``accelerator``; with a sequence-parallel method
    every process of the group must see the same batches, so the loader is returned as is.
    """
    method = get_method(seq_algo)
    if not method.is_sequence_parallel:
        return accelerator.prepare(dataloader)
    return dataloader


def sequence_parallel_rank_and_size(group=None):
    """``(rank, world_size)`` inside the sequence-parallel group."""
    group = get_sequence_parallel_group() if group is None else group
    return group_rank(group), group_size(group)
