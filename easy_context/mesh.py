"""Which process group sequence parallelism runs over.

By default the sequence-parallel group is the whole default process group (or a single process when
torch.distributed is not initialised). :func:`set_sequence_parallel_group` narrows it, for example to one row of a
(data × sequence) device mesh; the attention functions read it at every call.
"""

from __future__ import annotations

__all__ = ["get_sequence_parallel_group", "set_sequence_parallel_group"]

_SP_GROUP = None


def set_sequence_parallel_group(group) -> None:
    """Run sequence-parallel attention over ``group`` (``None``: the default process group)."""
    global _SP_GROUP
    _SP_GROUP = group


def get_sequence_parallel_group():
    """The sequence-parallel process group; ``None`` stands for the default group."""
    return _SP_GROUP
