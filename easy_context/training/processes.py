"""Process setup of ``train.py``: the parallel options, and the sequence- and data-parallel groups."""

from __future__ import annotations

import contextlib
import datetime
from typing import Optional, Union

import torch.distributed.distributed_c10d as c10d

from ..comm import group_rank, group_size
from ..mesh import setup_mesh
from ..methods import Method, document_methods, get_method

__all__ = ["check_parallel_options", "group_timeout", "setup_sequence_parallel"]


def check_parallel_options(method: Union[str, Method], world_size: int, sp_size: Optional[int], seq_length: int,
                           pad_to_multiple: bool = False, reset_position_ids: bool = False) -> int:
    """Validate the parallel options before anything heavy runs; returns the sequence-parallel size.

    ``sp_size`` defaults to the world size for sequence-parallel methods and is 1 otherwise.
    """
    m = get_method(method)
    if not m.is_sequence_parallel:
        if sp_size not in (None, 1):
            raise ValueError(f"--sp-size {sp_size} needs a sequence-parallel --parallel-mode; {m.name} shards no "
                             "sequence (use --sp-size 1 or e.g. --parallel-mode zigzag_ring_attn)")
        return 1
    sp_size = world_size if sp_size is None else sp_size
    if sp_size < 1 or world_size % sp_size:
        raise ValueError(f"--sp-size {sp_size} does not divide the world size {world_size} (the number of "
                         f"processes): choose a divisor of {world_size}, or launch a multiple of {sp_size} processes")
    if reset_position_ids and not m.documents:
        raise ValueError(f"--reset-position-ids needs attention masked across packed documents, which {m.name} "
                         f"cannot do: use --parallel-mode {' or '.join(['data_parallel', *document_methods()])}, or "
                         "drop --reset-position-ids")
    multiple = m.layout.multiple(sp_size)
    if seq_length % multiple and not pad_to_multiple:
        up = -(-seq_length // multiple) * multiple
        raise ValueError(f"--seq-length {seq_length} is not divisible by {multiple}, which {m.name} needs with "
                         f"--sp-size {sp_size}: use --seq-length {up} (or {up - multiple}), or pass "
                         "--pad-to-multiple to pad each sample with -100 targets")
    return sp_size


@contextlib.contextmanager
def group_timeout(seconds: Optional[float]):
    """Process groups created inside get ``seconds`` as their timeout instead of torch's default (30 minutes for
    gloo, 10 for NCCL).

    A group's timeout is fixed when it is created: gloo's point-to-point operations (the ring's ``batch_isend_irecv``)
    wait as long as the group's creation timeout, whatever is set later, so the sequence- and data-parallel groups
    must be born with ``--dist-timeout``.
    """
    if seconds is None:
        yield
        return
    saved = c10d.default_pg_timeout, getattr(c10d, "default_pg_nccl_timeout", None)
    c10d.default_pg_timeout = datetime.timedelta(seconds=seconds)
    if saved[1] is not None:
        c10d.default_pg_nccl_timeout = c10d.default_pg_timeout
    try:
        yield
    finally:
        c10d.default_pg_timeout = saved[0]
        if saved[1] is not None:
            c10d.default_pg_nccl_timeout = saved[1]


def setup_sequence_parallel(method: Union[str, Method], sp_size: int, timeout: Optional[float] = None):
    """Split the processes into data-parallel replicas of ``sp_size`` consecutive ranks, make this process's replica
    the sequence-parallel group, and return ``(dp_rank, dp_size, sp_rank)``.

    The groups are the rows of a named (data × sequence) device mesh (:func:`easy_context.mesh.setup_mesh`). New
    groups wait at most ``timeout`` seconds for the other processes (:func:`group_timeout`).
    """
    world, rank = group_size(), group_rank()
    if get_method(method).is_sequence_parallel and world > 1:
        with group_timeout(timeout):
            setup_mesh(sp_size)
    return rank // sp_size, world // sp_size, rank % sp_size

