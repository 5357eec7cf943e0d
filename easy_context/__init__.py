"""easy-context: exact sequence-parallel attention and training-free context extension for HuggingFace causal LMs.

The public API keeps EasyContext's names::

    from easy_context import apply_seq_parallel_monkey_patch, prepare_seq_parallel_inputs, prepare_dataloader
"""

from .checkpointing import enable_remat_aware_checkpointing
from .data import gather_seq_parallel, prepare_dataloader, prepare_seq_parallel_inputs
from .loss import chunked_cross_entropy_sum, seq_parallel_cross_entropy, token_weighted_loss
from .mesh import (
    data_parallel_rank,
    data_parallel_size,
    get_sequence_parallel_group,
    sequence_parallel_rank_and_size,
    set_sequence_parallel_group,
    setup_mesh,
)
from .methods import available_methods, get_method
from .offload import enable_checkpoint_offload
from .patch import apply_seq_parallel_monkey_patch, replace_with_chunkllama
from .tiling import enable_tiled_mlp

__version__ = "0.1.0"

__all__ = [
    "apply_seq_parallel_monkey_patch",
    "prepare_seq_parallel_inputs",
    "prepare_dataloader",
    "gather_seq_parallel",
    "seq_parallel_cross_entropy",
    "token_weighted_loss",
    "chunked_cross_entropy_sum",
    "setup_mesh",
    "sequence_parallel_rank_and_size",
    "data_parallel_rank",
    "data_parallel_size",
    "set_sequence_parallel_group",
    "get_sequence_parallel_group",
    "enable_remat_aware_checkpointing",
    "enable_tiled_mlp",
    "enable_checkpoint_offload",
    "replace_with_chunkllama",
    "available_methods",
    "get_method",
    "SeqParallelTrainer",
]


def __getattr__(name):
    if name == "SeqParallelTrainer":  # imported on first use: transformers.Trainer is heavy to import
        from .trainer import SeqParallelTrainer

        return SeqParallelTrainer
    raise AttributeError(f"module 'easy_context' has no attribute {name!r}")
