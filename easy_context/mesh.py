"""Which processes work together: the sequence-parallel group and the 2-D (data × sequence) process mesh.

By default the sequence-parallel group is the whole default process group (or a single process when
torch.distributed is not initialised): every process holds a slice of the same sequences. :func:`setup_mesh`
splits the world into ``dp`` data-parallel replicas of ``sp`` sequence-parallel processes each, with
``torch.distributed.device_mesh`` (``"cpu"``/gloo or ``"cuda"``/NCCL)::

    world 8, setup_mesh(sp_size=4)          mesh_dim_names = ("dp", "sp")
        sp ->   0  1  2  3                  sequence-parallel groups: rows    {0,1,2,3} {4,5,6,7}
        dp      4  5  6  7                  data-parallel groups:     columns {0,4} {1,5} {2,6} {3,7}

Attention traffic stays inside a row: :func:`setup_mesh` makes the row this process's sequence-parallel group, which
the attention functions read at every call. Each row reads its own samples (:func:`easy_context.prepare_dataloader`),
and the rows are data-parallel replicas of each other.

Gradients: :func:`easy_context.seq_parallel_cross_entropy` divides by the valid-token count of the whole *world*
(every row's batch), so averaging parameter gradients over the world, which DDP, DeepSpeed and accelerate do, gives
exactly the gradient of the global token-weighted mean. Nothing extra is reduced over the ``dp`` dimension.

:func:`set_sequence_parallel_group` narrows the group directly, for a group you built yourself.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.distributed as dist

from .comm import group_rank, group_size

__all__ = [
    "get_sequence_parallel_group",
    "set_sequence_parallel_group",
    "setup_mesh",
    "get_mesh",
    "check_mesh",
    "sequence_parallel_rank",
    "sequence_parallel_size",
    "sequence_parallel_rank_and_size",
    "data_parallel_rank",
    "data_parallel_size",
    "get_data_parallel_group",
    "MESH_DIM_NAMES",
]

MESH_DIM_NAMES = ("dp", "sp")

_SP_GROUP = None
_MESH = None


def set_sequence_parallel_group(group) -> None:
    """Run sequence-parallel attention over ``group`` (``None``: the default process group).

    Setting a group other than the mesh's ``sp`` row forgets the mesh made by :func:`setup_mesh`.
    """
    global _SP_GROUP, _MESH
    if _MESH is not None and group is not _MESH.get_group("sp"):
        _MESH = None
    _SP_GROUP = group


def get_sequence_parallel_group():
    """The sequence-parallel process group; ``None`` stands for the default group."""
    return _SP_GROUP


def get_mesh():
    """The ``("dp", "sp")`` device mesh made by :func:`setup_mesh`, or ``None``."""
    return _MESH


def _divisors(n: int):
    return [d for d in range(1, n + 1) if n % d == 0]


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _default_device_type() -> str:
    backend = str(dist.get_backend()).lower()
    if "nccl" in backend and torch.cuda.is_available():
        return "cuda"
    return "cpu"


def check_mesh(mesh, sp_size: Optional[int] = None) -> None:
    """Raise ``ValueError`` unless ``mesh`` is a ``("dp", "sp")`` mesh over the whole world (and ``sp`` is
    ``sp_size``, when given)."""
    names = tuple(getattr(mesh, "mesh_dim_names", None) or ())
    if names != MESH_DIM_NAMES:
        raise ValueError(
            f"expected a 2-D device mesh with mesh_dim_names={MESH_DIM_NAMES}, got {names or 'no names'} "
            f"(shape {tuple(getattr(mesh, 'shape', ()))}): build it with easy_context.mesh.setup_mesh(sp_size) or "
            f"init_device_mesh(device_type, (dp, sp), mesh_dim_names={MESH_DIM_NAMES})"
        )
    world = _world_size()
    if mesh.size() != world:
        raise ValueError(
            f"the device mesh {tuple(mesh.shape)} covers {mesh.size()} processes but the world has {world}: "
            "the (dp, sp) mesh must span every process"
        )
    mesh_sp = mesh.size(1)
    if sp_size is not None and sp_size != mesh_sp:
        raise ValueError(
            f"sp_size={sp_size} does not match the device mesh, whose 'sp' dimension has size {mesh_sp} "
            f"(mesh shape {tuple(mesh.shape)}): pass sp_size={mesh_sp} or build the mesh with sp_size={sp_size}"
        )


def _check_sp_size(sp_size: int, world: int) -> None:
    if not isinstance(sp_size, int) or sp_size < 1 or world % sp_size:
        raise ValueError(
            f"sp_size={sp_size!r} does not divide the world size {world}: choose one of "
            f"{', '.join(map(str, _divisors(world)))} (the world splits into world/sp_size data-parallel replicas)"
        )


def setup_mesh(sp_size: Optional[int] = None, device_type: Optional[str] = None):
    """Build the ``(dp, sp)`` device mesh, make its ``sp`` row this process's sequence-parallel group, and return it.

    Args:
        sp_size: processes per sequence-parallel group (default: the whole world, i.e. no data parallelism). Must
            divide the world size; ``dp = world_size // sp_size``.
        device_type: ``"cpu"`` (gloo) or ``"cuda"`` (NCCL); default: ``"cuda"`` when the default process group
            runs NCCL, else ``"cpu"``.

    torch.distributed must be initialised first (``torch.distributed.init_process_group``, ``torchrun``, or
    ``accelerate.Accelerator()``). Every process must call it, with the same arguments.
    """
    global _SP_GROUP, _MESH
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "setup_mesh needs an initialised torch.distributed: call torch.distributed.init_process_group() (or "
            "create accelerate.Accelerator(), or start under torchrun) before setup_mesh"
        )
    from torch.distributed.device_mesh import init_device_mesh

    world = dist.get_world_size()
    sp_size = world if sp_size is None else sp_size
    _check_sp_size(sp_size, world)
    device_type = device_type or _default_device_type()
    mesh = init_device_mesh(device_type, (world // sp_size, sp_size), mesh_dim_names=MESH_DIM_NAMES)
    _SP_GROUP = mesh.get_group("sp")
    _MESH = mesh
    return mesh


def sequence_parallel_rank() -> int:
    """This process's rank inside its sequence-parallel group: the ``rank`` for
    :func:`easy_context.prepare_seq_parallel_inputs`."""
    return group_rank(_SP_GROUP)


def sequence_parallel_size() -> int:
    """The size of the sequence-parallel group: the ``world_size`` for
    :func:`easy_context.prepare_seq_parallel_inputs`."""
    return group_size(_SP_GROUP)


def sequence_parallel_rank_and_size() -> Tuple[int, int]:
    """``(sequence_parallel_rank(), sequence_parallel_size())``."""
    return sequence_parallel_rank(), sequence_parallel_size()


def _sp_global_ranks():
    if _SP_GROUP is None:
        return list(range(_world_size()))
    return dist.get_process_group_ranks(_SP_GROUP)


def _data_parallel_layout() -> Tuple[int, int]:
    """``(dp_rank, dp_size)``: from the mesh, or, for a group set by hand, from consecutive-rank groups."""
    if _MESH is not None:
        return _MESH.get_local_rank("dp"), _MESH.size(0)
    world = _world_size()
    ranks = _sp_global_ranks()
    sp = len(ranks)
    if world % sp or ranks != list(range(ranks[0], ranks[0] + sp)) or ranks[0] % sp:
        raise ValueError(
            f"cannot tell the data-parallel layout of the sequence-parallel group {ranks} in a world of {world}: "
            "without a mesh, sequence-parallel groups must be consecutive ranks [k*sp, (k+1)*sp); use "
            "easy_context.mesh.setup_mesh(sp_size) instead"
        )
    return ranks[0] // sp, world // sp


def data_parallel_rank() -> int:
    """Which data-parallel replica (row of the mesh) this process belongs to."""
    return _data_parallel_layout()[0]


def data_parallel_size() -> int:
    """The number of data-parallel replicas: ``world_size // sequence_parallel_size()``."""
    return _data_parallel_layout()[1]


def get_data_parallel_group():
    """The processes holding the same sequence slice in every replica (a column of the mesh)."""
    if _MESH is None:
        raise ValueError("there is no data-parallel group without a mesh: call easy_context.mesh.setup_mesh(sp_size)")
    return _MESH.get_group("dp")
