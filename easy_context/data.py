"""Placing a batch on the ranks of a sequence-parallel group, and putting results back together."""

from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.distributed as dist

from .checks import packing_problem, positions_restart
from .comm import group_rank, group_size
from .layout import padded_length
from .loss import IGNORE_INDEX
from .mesh import (
    check_mesh,
    data_parallel_rank,
    data_parallel_size,
    get_mesh,
    get_sequence_parallel_group,
    sequence_parallel_size,
)
from .methods import document_methods, get_method

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
    group=None,
) -> Dict[str, torch.Tensor]:
    """This rank's share of a ``(B, S)`` batch, as EasyContext returns it.

    Returns ``local_input_ids``, ``local_position_ids`` (global positions, so rotary embeddings rotate each token by
    its true position) and ``local_target_ids``. ``rank``/``world_size`` are the rank and size of the
    *sequence-parallel* group. The sequence length must be divisible by the method's layout multiple; ``pad=True``
    (or ``pad_to_multiple_of``) pads at the end with ``-100`` targets instead of raising. ``group``, when given, is
    the sequence-parallel group, and ``rank``/``world_size`` must be this process's rank in it and its size.

    Refused with an error that names the fix: a rank outside ``world_size``, ``world_size > 1`` with no process group,
    a ``world_size`` larger than the process group, and ``position_ids`` that restart inside a row (packed documents)
    for a method that does not take them. Methods with ``documents`` (every sequence-parallel method but ``dca``) take
    packed documents: positions restart at 0 at each document, and the attention then keeps every document to itself
    (the document boundaries are read from the positions at the first attention layer of each forward).
    The attention checks the rest at the first layer of every forward (:func:`easy_context.checks.check_shards`).
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
        _check_rank(rank, world_size)
        if positions_restart(position_ids):
            _check_packing(method, position_ids)
        multiple = layout.multiple(world_size)
        if pad_to_multiple_of is not None and pad_to_multiple_of % multiple:
            raise ValueError(f"pad_to_multiple_of={pad_to_multiple_of} is not a multiple of {multiple}, which "
                             f"{method.name} needs with world_size={world_size}")
        if pad or pad_to_multiple_of is not None:
            input_ids, position_ids, target_ids = pad_to_multiple(
                input_ids, position_ids, target_ids, pad_to_multiple_of or multiple, pad_token_id
            )
        layout.check_length(input_ids.shape[-1], world_size, method.name)
        _check_process_group(method.name, rank, world_size, group)
        shard = lambda x: None if x is None else layout.shard(x, rank, world_size, dim=-1)  # noqa: E731
        input_ids, position_ids, target_ids = shard(input_ids), shard(position_ids), shard(target_ids)
    to = lambda x: None if x is None else x.to(device)  # noqa: E731
    return {
        "local_input_ids": to(input_ids),
        "local_position_ids": to(position_ids),
        "local_target_ids": to(target_ids),
    }


def _check_packing(method, position_ids: torch.Tensor) -> None:
    """Positions that restart inside a row are packed documents: refused unless ``method`` takes them, and then only
    when every break restarts at 0."""
    if not method.documents:
        raise ValueError(
            f"position_ids do not count up by one inside the sequence (packed documents restart them): {method.name} "
            f"computes one causal span per row, so packed documents would attend to each other. Use a method that "
            f"takes packed documents ({', '.join(document_methods())}), pack without resetting positions "
            "(position_ids=None), or put one document per row")
    if packing_problem(position_ids.reshape(-1, position_ids.shape[-1])):
        raise ValueError("position_ids break somewhere other than by restarting at 0: packed documents must count "
                         "0, 1, 2, ... within each document (as DataCollatorWithFlattening writes them)")


def _check_rank(rank: int, world_size: int) -> None:
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive integer, got {world_size!r}")
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank!r} is outside the group of {world_size}: pass the rank and size of the "
                         "sequence-parallel group")


def _check_process_group(name: str, rank: int, world_size: int, group) -> None:
    if not (dist.is_available() and dist.is_initialized()):
        if world_size > 1:
            raise ValueError(
                f"{name}: world_size={world_size} but torch.distributed is not initialised, so the attention would "
                "run on one process over a fraction of the sequence: launch with torchrun or accelerate launch (or "
                "call torch.distributed.init_process_group) before sharding, or pass rank=0, world_size=1"
            )
        return
    if group is not None:
        if (world_size, rank) != (group_size(group), group_rank(group)):
            raise ValueError(f"{name}: rank={rank}, world_size={world_size} do not match the group given (rank "
                             f"{group_rank(group)} of {group_size(group)}): pass the group's own rank and size")
    elif world_size > dist.get_world_size():
        raise ValueError(f"{name}: world_size={world_size} is larger than the {dist.get_world_size()} processes of "
                         "torch.distributed: pass the size of the sequence-parallel group")


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


def prepare_dataloader(seq_algo, dataloader, accelerator, *, sp_size: Optional[int] = None, mesh=None):
    """EasyContext's dataloader preparation, for a (data × sequence) parallel world.

    The loader is split over the *data-parallel replicas* only: every process of one sequence-parallel group gets the
    same batches in the same order (each then takes its slice with :func:`prepare_seq_parallel_inputs`), and
    different groups get disjoint batches. With ``data_parallel`` every process is its own replica.

    Args:
        seq_algo: the method name (as for :func:`prepare_seq_parallel_inputs`).
        dataloader: a ``torch.utils.data.DataLoader``; its ``batch_size`` is the per-replica batch.
        accelerator: an ``accelerate.Accelerator`` (plain, multi-CPU/GPU, or DeepSpeed); its batch placement,
            ``even_batches``, seedable-sampler and RNG-synchronisation settings apply.
        sp_size: processes per sequence-parallel group; checked against the mesh or group already set up (see
            :func:`easy_context.mesh.setup_mesh`), it never creates groups itself.
        mesh: a ``("dp", "sp")`` device mesh to take the replicas from (default: the one from
            :func:`easy_context.mesh.setup_mesh`, else the current sequence-parallel group).

    The returned loader is accelerate's own ``DataLoaderShard``, registered with ``accelerator`` for
    ``save_state``/``load_state``. Resume mid-epoch with ``accelerator.skip_first_batches(loader, step)`` (same epoch,
    same ``set_epoch``): the order continues where it stopped. Do not pass the result to ``accelerator.prepare``
    again, which would split it over every process. Shuffling samplers get the same order on every process through
    accelerate's RNG synchronisation (or ``DataLoaderConfiguration(use_seedable_sampler=True)`` + ``set_epoch``);
    an ``IterableDataset`` must yield the same stream on every process (batches are not dispatched from rank 0).
    """
    from accelerate.data_loader import prepare_data_loader

    method = get_method(seq_algo)
    world = group_size(None)
    if accelerator.num_processes != world:
        raise ValueError(f"the accelerator has {accelerator.num_processes} processes but torch.distributed has "
                         f"{world}: create the Accelerator in the same processes as the process group")
    if not method.is_sequence_parallel:
        if sp_size not in (None, 1):
            raise ValueError(f"sp_size={sp_size} needs a sequence-parallel method; {method.name} shards no sequence")
        return accelerator.prepare(dataloader)  # every process is its own replica
    mesh = mesh if mesh is not None else get_mesh()
    if mesh is not None:
        check_mesh(mesh, sp_size)
        dp_rank, dp_size = mesh.get_local_rank("dp"), mesh.size(0)
    else:
        current = sequence_parallel_size()
        if sp_size is not None and sp_size != current:
            raise ValueError(
                f"sp_size={sp_size} does not match the sequence-parallel group, which has {current} processes: "
                f"call easy_context.mesh.setup_mesh(sp_size={sp_size}) on every process first"
            )
        dp_rank, dp_size = data_parallel_rank(), data_parallel_size()
    data_seed = _synchronise_shuffling(dataloader, accelerator)
    prepared = prepare_data_loader(
        dataloader,
        device=accelerator.device,
        num_processes=dp_size,
        process_index=dp_rank,
        split_batches=accelerator.split_batches,
        put_on_device=accelerator.device_placement,
        rng_types=list(accelerator.rng_types or []),
        dispatch_batches=False,
        even_batches=accelerator.even_batches,
        use_seedable_sampler=accelerator.use_seedable_sampler,
        data_seed=data_seed,
        non_blocking=accelerator.non_blocking,
        use_stateful_dataloader=accelerator.use_stateful_dataloader,
    )
    if hasattr(accelerator, "_dataloaders"):  # what accelerator.prepare does: save_state/load_state track it
        accelerator._dataloaders.append(prepared)
    _fill_deepspeed_batch_size(accelerator, dataloader)
    return prepared


def _broadcast_from_rank0(t: torch.Tensor, device) -> torch.Tensor:
    if group_size(None) == 1:
        return t
    t = t.to(device).contiguous()
    dist.broadcast(t, src=0)
    return t.cpu()


def _synchronise_shuffling(dataloader, accelerator) -> Optional[int]:
    """Make a shuffling sampler produce the same permutation on every process; returns the ``data_seed`` for
    accelerate's seedable sampler.

    Every process starts with its own random torch seed, and accelerate synchronises sampler generators only when it
    splits the data (``num_processes > 1``), so with one replica the ranks of a group would shuffle differently. The
    sampler's generator (created if missing) gets global rank 0's state, and the seedable sampler rank 0's seed.
    """
    from accelerate.data_loader import get_sampler

    sampler = get_sampler(dataloader)
    data_seed = accelerator.dataloader_config.data_seed
    if not isinstance(sampler, torch.utils.data.RandomSampler):
        return data_seed
    if sampler.generator is None:
        sampler.generator = torch.Generator()
    state = _broadcast_from_rank0(sampler.generator.get_state(), accelerator.device)
    sampler.generator.set_state(state)
    if data_seed is None:
        seed = torch.tensor([torch.initial_seed() % 2**62], dtype=torch.int64)
        data_seed = int(_broadcast_from_rank0(seed, accelerator.device).item())
    return data_seed


def _fill_deepspeed_batch_size(accelerator, dataloader) -> None:
    """DeepSpeed's ``train_micro_batch_size_per_gpu: "auto"`` is resolved from loaders given to
    ``accelerator.prepare``; this loader is not, so resolve it here from the per-replica batch size."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    batch_size = getattr(dataloader, "batch_size", None)
    if plugin is None or batch_size is None:
        return
    config = plugin.deepspeed_config
    if config.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        config["train_micro_batch_size_per_gpu"] = batch_size

